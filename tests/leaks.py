"""Catch what a test leaves running: threads it started that are still alive after its teardown,
and asyncio tasks still pending when an ``asyncio.run`` of the test's own thread returned.

Used by the autouse fixture in ``tests/conftest.py``. Threads started before the test (by session
or module fixtures, or by an earlier test that leaked them) are not counted; a thread that is just
ending gets a short grace period. Tasks are seen where ``asyncio.run`` closes its loop (it cancels
them silently otherwise); a task that was already cancelled, but not awaited, is not counted.
"""

from __future__ import annotations

import asyncio
import asyncio.runners
import contextlib
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from typing import Any

THREAD_GRACE = 2.0  # seconds a thread started by the test may take to end after its teardown


def started_threads(before: set[threading.Thread], grace: float = THREAD_GRACE) -> list[threading.Thread]:
    """Threads alive now that were not alive in ``before``, after waiting up to ``grace`` seconds
    for them to end."""
    deadline = time.monotonic() + grace
    while True:
        new = [thread for thread in threading.enumerate() if thread not in before and thread.is_alive()]
        if not new or time.monotonic() >= deadline:
            return new
        time.sleep(0.02)


def describe_thread(thread: threading.Thread) -> str:
    frame = sys._current_frames().get(thread.ident or -1)
    where = ""
    if frame is not None:
        stack = traceback.extract_stack(frame)
        last = ([entry for entry in stack if entry.filename != threading.__file__] or stack)[-3:]
        where = " at " + " <- ".join(f"{entry.filename}:{entry.lineno} {entry.name}" for entry in reversed(last))
    return f"{thread.name} (daemon={thread.daemon}){where}"


@contextlib.contextmanager
def pending_tasks_at_asyncio_run_exit(found: list[str]) -> Iterator[None]:
    """While active, ``asyncio.run`` on this thread appends to ``found`` every task still pending
    (and not being cancelled) when its main coroutine returned, before it cancels them."""
    original: Any = getattr(asyncio.runners, "_cancel_all_tasks", None)
    if original is None:  # a Python without the hook: tasks are not checked
        yield
        return
    owner = threading.current_thread()

    def cancel_all_tasks(loop: asyncio.AbstractEventLoop) -> None:
        if threading.current_thread() is owner:
            found.extend(repr(task) for task in asyncio.all_tasks(loop) if not task.done() and not task.cancelling())
        original(loop)

    asyncio.runners._cancel_all_tasks = cancel_all_tasks  # type: ignore[attr-defined]
    try:
        yield
    finally:
        asyncio.runners._cancel_all_tasks = original  # type: ignore[attr-defined]


def leak_report(threads: list[threading.Thread], tasks: list[str]) -> str | None:
    lines = [f"thread still running after the test: {describe_thread(thread)}" for thread in threads]
    lines += [f"task pending when asyncio.run() returned: {task}" for task in tasks]
    return "\n".join(lines) if lines else None
