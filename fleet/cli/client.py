"""The controller's HTTPS API as the CLI uses it: credentials, exit codes, retries, pages, output.

Where things come from, like kubectl's kubeconfig but from flags and the environment:

* the URL: ``--controller`` / ``FLEET_CONTROLLER`` (default ``https://127.0.0.1:8080``);
* the CA that signed the controller's certificate: ``--certs DIR`` / ``FLEET_CERTS`` (its
  ``ca.pem``); without it the system's trust store;
* the credential: ``FLEET_TOKEN`` (an API token from ``fleet token create``; never a flag, so it
  stays out of shell history and process lists), else the operator certificate in ``--certs``
  (``operator.pem``, or ``operators/NAME/`` with ``--identity NAME`` / ``FLEET_IDENTITY``).

Every failure is one line on stderr and an exit code (fleet.cli: 1 failed, 2 usage, 3 unreachable or
refused). POSTs that create something carry an ``Idempotency-Key``; a request that failed in
transit (timeout, connection reset) is sent once more with the same key, so nothing happens twice.
"""

from __future__ import annotations

import json
import os
import ssl
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, TypeVar, get_args, get_origin

import httpx
import typer
import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError

from certs import PkiPaths
from fleet.cli import EXIT_FAILED, EXIT_UNREACHABLE, EXIT_USAGE, fail
from fleet.controller.facade import MOMENT

T = TypeVar("T")

DEFAULT_CONTROLLER = "https://127.0.0.1:8080"
HTTP_TIMEOUT = httpx.Timeout(10.0, connect=5.0)
RETRY_PAUSE = 0.5


class Output(StrEnum):
    TABLE = "table"
    WIDE = "wide"
    JSON = "json"
    YAML = "yaml"


ControllerOption = Annotated[
    str,
    typer.Option(
        "--controller", envvar="FLEET_CONTROLLER", help="Controller API URL (https://HOST:PORT).", metavar="URL"
    ),
]
CertsOption = Annotated[
    Path | None,
    typer.Option(
        "--certs",
        envvar="FLEET_CERTS",
        help="PKI directory: ca.pem verifies the controller, operator.pem (or --identity) is the credential"
        " unless FLEET_TOKEN is set.",
        metavar="DIR",
    ),
]
IdentityOption = Annotated[
    str | None,
    typer.Option(
        "--identity", envvar="FLEET_IDENTITY", help="Use operators/NAME/ of --certs instead of operator.pem.",
        metavar="NAME",
    ),
]  # fmt: skip
OutputOption = Annotated[
    Output,
    typer.Option(
        "-o",
        "--output",
        case_sensitive=False,
        help="table or wide for people; json or yaml (ISO-8601 times) for scripts.",
    ),
]


@dataclass(frozen=True)
class Target:
    """Where the controller is and how to prove who we are."""

    url: str
    certs: Path | None = None
    identity: str | None = None


def target(controller: str, certs: Path | None, identity: str | None) -> Target:
    return Target(controller, certs, identity)


class ApiError(Exception):
    """An error answer: its status and the controller's one-line reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def exit_code_for(status: int) -> int:
    """401/403: 3 (refused credentials); 409 and 5xx: 1 (the operation failed); other 4xx: 2 (usage)."""
    if status in (401, 403):
        return EXIT_UNREACHABLE
    if status == 409 or status >= 500:
        return EXIT_FAILED
    return EXIT_USAGE


class ControllerClient:
    """The controller's HTTP API; every failure ends the command with one line and its exit code."""

    def __init__(self, where: Target) -> None:
        self.url = where.url.rstrip("/")
        token = os.environ.get("FLEET_TOKEN", "").strip()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        verify: ssl.SSLContext | bool = True
        pki = PkiPaths(where.certs) if where.certs is not None else None
        if pki is not None and self.url.startswith("https:"):
            verify = self._context(pki, where.identity, use_certificate=not token)
        elif where.identity is not None and pki is None:
            fail("--identity needs --certs (the PKI directory holding operators/NAME/)")
        try:
            self._http = httpx.Client(base_url=self.url, timeout=HTTP_TIMEOUT, verify=verify, headers=headers)
        except (httpx.InvalidURL, ValueError) as exc:
            fail(f"--controller {where.url!r}: not a URL ({exc})")

    @staticmethod
    def _context(pki: PkiPaths, identity: str | None, *, use_certificate: bool) -> ssl.SSLContext:
        if not pki.ca_cert.is_file():
            fail(f"{pki.ca_cert}: no such file (--certs must name a PKI directory with ca.pem)")
        context = ssl.create_default_context(cafile=str(pki.ca_cert))
        client = pki.default_operator if identity is None else pki.operator(identity)
        if identity is not None and not client.cert.is_file():
            fail(f"{client.cert}: no such file (run `fleet certs operator {pki.root} {identity}`)")
        if use_certificate and client.cert.is_file() and client.key.is_file():
            try:
                context.load_cert_chain(str(client.cert), str(client.key))
            except (OSError, ssl.SSLError) as exc:
                fail(f"{client.cert}: cannot load the operator certificate: {exc}")
        return context

    def close(self) -> None:
        self._http.close()

    # ---- calls ------------------------------------------------------------------------------

    def get(self, path: str, model: type[T], params: dict[str, Any] | None = None) -> T:
        return self._call("GET", path, model, params=params)

    def post(self, path: str, model: type[T], body: dict[str, Any] | None = None, *, idempotent: bool = False) -> T:
        headers = {"Idempotency-Key": uuid.uuid4().hex} if idempotent else None
        return self._call("POST", path, model, body=body, headers=headers)

    def patch(self, path: str, model: type[T], body: dict[str, Any]) -> T:
        return self._call("PATCH", path, model, body=body)

    def delete(self, path: str, model: type[T]) -> T:
        return self._call("DELETE", path, model)

    def text(self, path: str) -> str:
        response = self._send("GET", path, None, None, None)
        self._check(response)
        return response.text

    def all_pages(self, path: str, model: type[T], params: dict[str, Any] | None = None) -> list[T]:
        """Every item of a paginated list (following ``next_cursor``)."""
        items: list[T] = []
        query = dict(params or {})
        query.setdefault("limit", 1000)
        while True:
            page = self._call("GET", path, _Page, params=query)
            items.extend(TypeAdapter(list[model]).validate_python(page.items))  # type: ignore[valid-type]
            if page.next_cursor is None:
                return items
            query["cursor"] = page.next_cursor

    def _call(
        self,
        method: str,
        path: str,
        model: type[T],
        *,
        params: dict[str, Any] | None = None,
        body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> T:
        response = self._send(method, path, params, body, headers)
        self._check(response)
        try:
            return TypeAdapter(model).validate_json(response.content)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            fail(f"unexpected answer from {self.url}{path}: {where}: {first['msg']}", EXIT_FAILED)

    def try_call(self, method: str, path: str, model: type[T], body: dict[str, Any] | None = None) -> T | ApiError:
        """Like the calls above, but an error answer is returned (transport errors still end the command)."""
        response = self._send(method, path, None, body, None)
        if response.is_error:
            return ApiError(response.status_code, _error_reason(response))
        return TypeAdapter(model).validate_json(response.content)

    def _check(self, response: httpx.Response) -> None:
        if response.is_error:
            reason = _error_reason(response)
            if response.status_code == 401:
                reason += " (set FLEET_TOKEN, or --certs with an operator certificate)"
            fail(reason, exit_code_for(response.status_code))

    def _send(
        self,
        method: str,
        path: str,
        params: dict[str, Any] | None,
        body: dict[str, Any] | None,
        headers: dict[str, str] | None,
    ) -> httpx.Response:
        # Reads are safe to repeat, and so are POSTs with an Idempotency-Key: one more try after a
        # failure in transit. Anything else is tried once.
        attempts = 2 if method == "GET" or (headers and "Idempotency-Key" in headers) else 1
        for attempt in range(1, attempts + 1):
            try:
                return self._http.request(method, path, params=params, json=body, headers=headers)
            except (httpx.TimeoutException, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
                if attempt == attempts:
                    self._transport_failure(exc)
                time.sleep(RETRY_PAUSE)
            except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
                fail(f"--controller {self.url!r}: not an http(s) URL ({exc})")
            except httpx.HTTPError as exc:
                self._transport_failure(exc)
        raise AssertionError("unreachable")  # pragma: no cover

    def _transport_failure(self, exc: httpx.HTTPError) -> None:
        if isinstance(exc, httpx.TimeoutException):
            fail(f"controller at {self.url} did not answer within {HTTP_TIMEOUT.read:.0f}s", EXIT_UNREACHABLE)
        text = str(exc)
        if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
            fail(
                f"controller at {self.url}: its certificate is not trusted ({text}); set --certs or FLEET_CERTS"
                " to the PKI directory",
                EXIT_UNREACHABLE,
            )
        if isinstance(exc, httpx.ConnectError):
            fail(
                f"cannot reach the controller at {self.url}: {exc} (set --controller or FLEET_CONTROLLER)",
                EXIT_UNREACHABLE,
            )
        fail(f"controller at {self.url}: {type(exc).__name__}: {exc}", EXIT_UNREACHABLE)


class _Page(BaseModel):
    items: list[Any]
    next_cursor: str | None = None


def _error_reason(response: httpx.Response) -> str:
    """The controller's ``{"error": ...}``, or the start of whatever else answered (a proxy, say)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return " ".join(body["error"].split())
    text = " ".join(response.text.split())[:200]
    return f"HTTP {response.status_code} from {response.request.url}" + (f": {text}" if text else "")


@contextmanager
def controller_client(where: Target) -> Iterator[ControllerClient]:
    client = ControllerClient(where)
    try:
        yield client
    finally:
        client.close()


# ---- machine output: ISO-8601 times ------------------------------------------------------------


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def for_output(value: object) -> object:
    """``value`` as JSON-ready data, with every ``Moment`` field of its models as an ISO-8601 string."""
    if isinstance(value, BaseModel):
        data: dict[str, Any] = {}
        for name, info in type(value).model_fields.items():
            item = getattr(value, name)
            if item is not None and _is_moment(info.metadata, info.annotation):
                data[name] = iso(float(item))
            else:
                data[name] = for_output(item)
        return data
    if isinstance(value, list | tuple):
        return [for_output(item) for item in value]
    if isinstance(value, dict):
        return {str(key): for_output(item) for key, item in value.items()}
    if isinstance(value, StrEnum):
        return value.value
    return value


def _is_moment(metadata: list[Any], annotation: object) -> bool:
    if MOMENT in metadata:
        return True
    return get_origin(annotation) is Annotated and MOMENT in get_args(annotation)[1:]


def print_json(value: object) -> None:
    typer.echo(json.dumps(for_output(value), indent=2, ensure_ascii=False))


def print_yaml(value: object) -> None:
    typer.echo(yaml.safe_dump(for_output(value), sort_keys=False, allow_unicode=True).rstrip())


def print_data(output: Output, value: object) -> None:
    if output is Output.YAML:
        print_yaml(value)
    else:
        print_json(value)
