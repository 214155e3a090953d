"""What the agent checks before it stores a desired state, and where probe targets come from (issue 11)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

from agent.backoff import BackoffPolicy
from agent.config import AgentSettings
from agent.desired import DesiredRefused, check_desired, release_probe
from agent.probes import HealthMonitor, run_probe
from agent.runas import prepare_state_dir
from agent.store import Store
from agent.update.install import Installer
from agent.update.releases import Release, Releases, UpdateFailed, check_release_ref
from agent.workload import Supervisor
from fleet.protocol.messages import DesiredState, ProbeSpec, ReleaseRef
from fleet.releases import build_payload

DIGEST = "sha256:" + "ab" * 32
_NO_WAIT = BackoffPolicy(0.05, 0.05, 0.0)


def settings(tmp_path: Path, **extra: Any) -> AgentSettings:
    return AgentSettings.model_validate(
        {"node_id": "gw-a", "server_addr": "127.0.0.1:1", "tls_enabled": False, "state_dir": str(tmp_path)} | extra
    )


def ref(name: str = "app", version: str = "1.0.0") -> ReleaseRef:
    return ReleaseRef(name=name, version=version, digest=DIGEST, size=1, chunk_size=1024)


def refused(tmp_path: Path, desired: DesiredState, installed: str | None = None, **extra: Any) -> str:
    with pytest.raises(DesiredRefused) as caught:
        check_desired(settings(tmp_path, **extra), desired, installed)
    return str(caught.value)


# ---- probes ----------------------------------------------------------------------------------


def test_an_exec_probe_from_the_network_is_refused(tmp_path: Path) -> None:
    reason = refused(tmp_path, DesiredState(generation=1, health=ProbeSpec(kind="exec", target="rm -rf /")))
    assert "exec" in reason


def test_http_and_tcp_probes_are_taken_when_their_targets_parse(tmp_path: Path) -> None:
    for probe in (
        ProbeSpec(kind="http", target="http://127.0.0.1:8080/healthz"),
        ProbeSpec(kind="tcp", target="db:5432"),
    ):
        runtime = check_desired(settings(tmp_path), DesiredState(generation=1, health=probe), None)
        assert runtime.probe == probe
    assert "target" in refused(tmp_path, DesiredState(generation=1, health=ProbeSpec(kind="tcp", target="no port")))


def release_with(probe: ProbeSpec, env: list[str]) -> Release:
    return Release("app", "1.0.0", DIGEST, Path("/nonexistent"), ["./run"], probe, frozenset(env))


def test_only_a_release_probe_expands_and_only_the_variables_it_declares() -> None:
    env = {"APP_PORT": "8080", "API_TOKEN": "s3cret"}
    template = "http://127.0.0.1:${APP_PORT}/healthz?token=${API_TOKEN}"
    release = release_with(ProbeSpec(kind="http", target=template), ["APP_PORT"])
    probe = release_probe(None, release, None, env)
    assert probe is not None and probe.target == "http://127.0.0.1:8080/healthz?token=${API_TOKEN}"
    # Not declared: nothing is expanded.
    assert release_probe(None, release_with(ProbeSpec(kind="http", target=template), []), None, env) == ProbeSpec(
        kind="http", target=template
    )
    # The desired state's and the local file's probes are taken literally.
    literal = ProbeSpec(kind="http", target="http://127.0.0.1:${APP_PORT}/")
    assert release_probe(DesiredState(generation=1, health=literal), release, None, env) == literal
    assert release_probe(None, None, literal, env) == literal


def test_probe_targets_are_logged_and_reported_as_their_template(caplog: pytest.LogCaptureFixture) -> None:
    template = "127.0.0.1:${DB_PORT}"
    spec = ProbeSpec(kind="tcp", target="127.0.0.1:s3cret-port")  # the expanded target, unparseable here
    monitor = HealthMonitor("gw-a", None, on_change=lambda _state: None)
    with caplog.at_level(logging.DEBUG):
        monitor.set_spec(spec, shown=template)
    assert "s3cret" not in caplog.text and template in caplog.text
    result = asyncio.run(run_probe(spec, shown=template))
    assert not result.ok and "s3cret" not in (result.detail or "")


# ---- config ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"heartbeat_interval": "bogus"}, "heartbeat_interval"),
        ({"heartbeat_interval": True}, "heartbeat_interval"),
        ({"heartbeat_interval": float("inf")}, "heartbeat_interval"),
        ({"labels": ["ring", "canary"]}, "labels"),
        ({"labels": {"ring": {"nested": 1}}}, "labels"),
        ({"labels": {"": "x"}}, "labels"),
        ({"labels": {f"k{i}": "v" for i in range(100)}}, "labels"),
        ({"allow_release_change": "yes"}, "allow_release_change"),
    ],
)
def test_config_the_agent_cannot_apply_is_refused(tmp_path: Path, config: dict[str, Any], field: str) -> None:
    assert field in refused(tmp_path, DesiredState(generation=1, config=config))


def test_a_good_config_yields_its_runtime(tmp_path: Path) -> None:
    desired = DesiredState(generation=1, config={"heartbeat_interval": "5s", "labels": {"ring": "canary", "n": 3}})
    runtime = check_desired(settings(tmp_path), desired, None)
    assert runtime.heartbeat_interval == 5.0
    assert runtime.labels == {"ring": "canary", "n": "3"}


# ---- releases --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "version"), [("app", "../../etc"), ("app", ".hidden"), ("a/b", "1.0"), ("app", "1..0"), ("..", "1")]
)
def test_names_and_versions_must_be_safe_path_components(tmp_path: Path, name: str, version: str) -> None:
    with pytest.raises(UpdateFailed):
        check_release_ref(ref(name, version))
    reason = refused(tmp_path, DesiredState(generation=1, release=ref(name, version)))
    assert "name" in reason or "version" in reason


def test_releases_never_look_outside_their_directory(tmp_path: Path) -> None:
    (tmp_path / "releases").mkdir()
    (tmp_path / ".fleet").mkdir()
    (tmp_path / ".fleet" / "manifest.json").write_text('{"digest": "x"}')
    store = Store(tmp_path / "agent.db")
    try:
        assert Releases(tmp_path, store).get("..") is None
    finally:
        store.close()


def test_another_release_name_is_refused_unless_the_desired_state_allows_it(tmp_path: Path) -> None:
    other = DesiredState(generation=2, release=ref("other"))
    reason = refused(tmp_path, other, installed="app")
    assert "other" in reason and "app" in reason and "allow_release_change" in reason
    allowed = other.model_copy(update={"config": {"allow_release_change": True}})
    check_desired(settings(tmp_path), allowed, "app")
    check_desired(settings(tmp_path), DesiredState(generation=2, release=ref("app", "0.9.0")), "app")  # a downgrade
    check_desired(settings(tmp_path), other, None)  # the first release of a node without workload.release


def test_the_local_config_names_the_release_and_outranks_the_desired_state(tmp_path: Path) -> None:
    local = {"workload": {"command": ["/bin/true"], "release": "app"}}
    other = DesiredState(generation=1, release=ref("other"), config={"allow_release_change": True})
    assert "workload.release" in refused(tmp_path, other, None, **local)
    check_desired(settings(tmp_path, **local), DesiredState(generation=1, release=ref("app")), None)


# ---- file modes ------------------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_agent_db_and_its_journal_are_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        (tmp_path / "old.db").write_bytes(b"")
        (tmp_path / "old.db").chmod(0o644)  # made by an older agent
        for name in ("agent.db", "old.db"):
            store = Store(tmp_path / name)
            store.put("k", b"v")
            paths = [tmp_path / name] + [p for p in (tmp_path / f"{name}-wal", tmp_path / f"{name}-shm") if p.exists()]
            assert {p.name: oct(mode(p)) for p in paths} == {p.name: oct(0o600) for p in paths}
            store.close()
    finally:
        os.umask(old)


def test_the_workload_log_is_0600(tmp_path: Path) -> None:
    log = tmp_path / "workload.log"
    log.write_bytes(b"")
    log.chmod(0o644)

    async def main() -> None:
        supervisor = Supervisor("gw-a", ["/bin/sh", "-c", "echo hi"], log_file=log, backoff=_NO_WAIT)
        task = asyncio.create_task(supervisor.run())
        for _ in range(100):
            if log.read_bytes():
                break
            await asyncio.sleep(0.05)
        await supervisor.stop()
        await task

    old = os.umask(0o022)
    try:
        asyncio.run(main())
    finally:
        os.umask(old)
    assert log.read_bytes().startswith(b"hi")
    assert mode(log) == 0o600


# ---- what a release declares -----------------------------------------------------------------


def test_a_release_declares_the_variables_its_probe_may_use(tmp_path: Path) -> None:
    fleet = tmp_path / "releases" / "1.0.0" / ".fleet"
    fleet.mkdir(parents=True)
    health = {"kind": "http", "target": "http://127.0.0.1:${APP_PORT}/?k=${KEY}", "env": ["APP_PORT"]}
    manifest = {"name": "app", "version": "1.0.0", "digest": DIGEST, "entry": ["./run"], "health": health}
    (fleet / "manifest.json").write_text(json.dumps(manifest))
    store = Store(tmp_path / "agent.db")
    try:
        store.put("version", b"1.0.0")
        release = Releases(tmp_path, store).current()
        assert release is not None and release.name == "app" and release.health_env == {"APP_PORT"}
        probe = release_probe(None, release, None, {"APP_PORT": "8080", "KEY": "s3cret"})
        assert probe is not None and probe.target == "http://127.0.0.1:8080/?k=${KEY}"
        assert Releases(tmp_path, store).installed_name() == "app"
    finally:
        store.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="reading as another user needs root to set it up")
def test_an_unpacked_release_is_readable_by_the_workload_user_and_its_payload_is_not(tmp_path: Path) -> None:
    root = Path(tempfile.mkdtemp(prefix="fleet-unpack-"))
    old = os.umask(0o077)  # the shipped unit's
    try:
        root.chmod(0o755)
        tree = tmp_path / "tree"
        tree.mkdir()
        (tree / "run").write_text("#!/bin/sh\necho hi\n")
        (tree / "run").chmod(0o755)
        agent_settings = settings(root / "state", workload={"command": ["/bin/true"], "user": "nobody"})
        prepare_state_dir(agent_settings)
        store = Store(root / "state" / "agent.db")
        payload = root / "state" / "payload"
        payload.write_bytes(build_payload(tree))
        installer = Installer(agent_settings, store, Releases(root / "state", store), None, None)  # type: ignore[arg-type]
        release = installer.unpack(ref(), {"name": "app", "version": "1.0.0", "digest": DIGEST}, payload)
        store.close()

        def as_nobody(*argv: str) -> int:
            return subprocess.run(argv, user="nobody", group="nogroup", extra_groups=[], check=False).returncode

        assert as_nobody("/bin/cat", str(release.directory / "run")) == 0
        assert as_nobody("/bin/cat", str(release.directory / ".fleet" / "payload.tar")) != 0
        assert as_nobody("/bin/cat", str(root / "state" / "agent.db")) != 0
        assert as_nobody("/bin/ls", str(root / "state")) != 0  # it may pass through, not list
        with pytest.raises(UpdateFailed, match="version"):
            installer.unpack(ref("app", "../escape"), {}, payload)
        assert not (root / "state" / "escape").exists()
    finally:
        os.umask(old)
        shutil.rmtree(root, ignore_errors=True)
