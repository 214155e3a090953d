"""The controller's HTTP JSON API (FastAPI) over a ``ControllerFacade``, and its metrics listener.

Versioned paths under ``/v1``; ``/healthz``, ``/metrics`` and ``/openapi.json`` stay unversioned.
Every request goes through ``Gate`` (a plain ASGI middleware) before FastAPI reads anything:

1. ``Host`` must be one of the server's names (DNS-rebinding defence) -> else 400;
2. a request id (the client's ``X-Request-Id`` if well-formed, else a new one), echoed back;
3. authentication, always: a bearer token, else the operator certificate of the TLS handshake
   (fleet.controller.auth) -> else 401; ``/healthz`` and ``/openapi.json`` are public;
4. the body is read (at most ``MAX_BODY`` bytes -> else 413) only for an authenticated caller.

Each route then requires a role (``viewer`` reads, ``operator`` changes the fleet, ``admin`` manages
tokens and identities) -> else 403. Every change is written to the audit trail (fleet.controller.audit)
before the answer is sent; POSTs that create something take an ``Idempotency-Key``.

Errors are one line: ``{"error": "..."}``, with the facade's typed errors mapped to 400, 401, 403,
404, 409, 422 and 503. ``ApiServer`` runs uvicorn (TLS with the PKI's server certificate, client
certificates optional and verified against the PKI root) in one owned, named thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any, TypeVar

import uvicorn
from fastapi import Body, Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from certs import AccessRole
from fleet.controller.audit import (
    DENIED,
    FAILED,
    MAX_PAGE,
    OK,
    REPLAY,
    AuditLog,
    AuditRecord,
    IdempotencyStore,
    KeyReused,
    decode_cursor,
    encode_cursor,
)
from fleet.controller.auth import CertificateAuthenticator, HostCheck, Principal, TokenStore
from fleet.controller.facade import (
    AccessRoleName,
    AuditEntry,
    BadRequest,
    CommandView,
    Conflict,
    ControllerFacade,
    Forbidden,
    HealthView,
    IdentityView,
    NodeDetail,
    NodeEvent,
    NodeView,
    NotFound,
    Page,
    ReleaseView,
    RolloutPlan,
    RolloutRequest,
    RolloutState,
    RolloutView,
    TokenCreated,
    TokenRequest,
    TokenView,
    Unauthorized,
    select,
)
from fleet.controller.metrics import CONTENT_TYPE, ControllerMetrics
from fleet.controller.selectors import Selector
from fleet.protocol.errors import ConfigError, FleetError, InvalidMessage, Rejected, TransportError

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_BODY = 1024 * 1024
"""Largest request body read, in bytes (a command's args or a rollout request are a few hundred)."""
PEER_CERT = "fleet.peer_cert"  # scope["state"] key: the client certificate (DER) of the TLS connection
PUBLIC_PATHS = frozenset({"/healthz", "/openapi.json"})
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")

# Most specific first: the facade's own errors, then the generic ones a controller may let through.
_STATUS_BY_ERROR: tuple[tuple[type[FleetError], int], ...] = (
    (Unauthorized, 401),
    (Forbidden, 403),
    (NotFound, 404),
    (Conflict, 409),
    (KeyReused, 422),
    (BadRequest, 400),
    (InvalidMessage, 400),
    (Rejected, 400),
    (TransportError, 503),  # the broker is away: the request may succeed later
)


class ErrorBody(BaseModel):
    """Every error response: one line saying what is wrong."""

    error: str = Field(description="What is wrong, in one line.")


class CommandRequest(BaseModel):
    """Body of ``POST /v1/nodes/{node_id}/commands``."""

    model_config = {"extra": "forbid"}

    action: str = Field(min_length=1, max_length=64, description="ping, report, restart, reload or rollback")
    args: dict[str, Any] = Field(default_factory=dict, description="the action's arguments (JSON values)")
    expires_in: float = Field(
        default=3600.0, gt=0, le=30 * 86400, description="seconds until the command expires unacknowledged"
    )


class WhoAmI(BaseModel):
    """The caller as the API sees it."""

    name: str = Field(description="certificate CN or token name")
    via: str = Field(description="certificate or token")
    role: AccessRoleName = Field(description="viewer, operator or admin")


@dataclass
class ApiSecurity:
    """What the API needs besides the controller: credentials, the audit trail, idempotency keys,
    which Host headers to answer and the metrics to count in."""

    tokens: TokenStore
    audit: AuditLog
    idempotency: IdempotencyStore
    metrics: ControllerMetrics
    certificates: CertificateAuthenticator | None = None  # None: no TLS (tokens only)
    hosts: HostCheck | None = None  # None: any Host (in-process tests)


# ---- errors ------------------------------------------------------------------------------------


def status_for(exc: FleetError) -> int:
    for kind, status in _STATUS_BY_ERROR:
        if isinstance(exc, kind):
            return status
    return 500


def one_line(text: str) -> str:
    """Error bodies are read by people and by ``fleet`` as one line."""
    return " ".join(text.split()) or "error"


def error_response(status: int, reason: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": one_line(reason)[:1000]}, headers=headers)


def _validation_reason(exc: RequestValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return "invalid request"
    first = errors[0]
    where = ".".join(str(part) for part in first.get("loc", ()))
    reason = f"{where}: {first.get('msg', 'invalid')}" if where else str(first.get("msg", "invalid"))
    if len(errors) > 1:
        reason += f" (and {len(errors) - 1} more)"
    return reason


def _install_error_handlers(app: FastAPI) -> None:
    # Starlette's handler signature is (Request, Exception); each handler narrows for itself.
    async def fleet_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, FleetError)
        status = status_for(exc)
        if status >= 500:
            log.warning("request failed with %s: %s", type(exc).__name__, exc)
        headers = {"WWW-Authenticate": 'Bearer realm="fleet"'} if status == 401 else None
        return error_response(status, str(exc), headers)

    async def validation_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(422, _validation_reason(exc))

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        # Routing errors (unknown path, wrong method) come from Starlette, not from the facade.
        assert isinstance(exc, StarletteHTTPException)
        return error_response(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}")

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Starlette logs and re-raises after this; the handler only keeps the body's shape.
        log.error("unhandled %s on %s %s: %s", type(exc).__name__, request.method, request.url.path, exc)
        return error_response(500, f"internal error: {type(exc).__name__}")

    app.add_exception_handler(FleetError, fleet_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)


# ---- the gate: host, request id, authentication, body size ---------------------------------------


class Gate:
    """Plain ASGI middleware in front of the API (see the module docstring)."""

    def __init__(self, app: ASGIApp, security: ApiSecurity, *, public: frozenset[str] = PUBLIC_PATHS) -> None:
        self.app = app
        self.security = security
        self.public = public

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        state: dict[str, Any] = scope.setdefault("state", {})
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        offered = headers.get("x-request-id", "")
        request_id = offered if _REQUEST_ID.match(offered) else uuid.uuid4().hex
        state["request_id"] = request_id
        status_seen: list[int] = []

        async def tagged_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_seen.append(int(message["status"]))
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            refusal = await self._admit(scope, state, headers)
            if refusal is not None:
                await refusal(scope, receive, tagged_send)
                return
            if scope["path"] in self.public:
                await self.app(scope, receive, tagged_send)
                return
            body = await _read_body(receive, headers)
            if body is None:
                await error_response(413, f"request body larger than {MAX_BODY} bytes")(scope, receive, tagged_send)
                return
            await self.app(scope, _replay(body, receive), tagged_send)
        except Exception:
            if not status_seen:  # answered by the outermost error handler, after this middleware
                status_seen.append(500)
            raise
        finally:
            metrics = self.security.metrics
            if status_seen:
                metrics.api_responses.labels(code=str(status_seen[0])).inc()
            route = scope.get("route")
            operation = getattr(route, "operation_id", None) or "none"
            metrics.api_requests.labels(operation=operation).observe(time.perf_counter() - started)

    async def _admit(self, scope: Scope, state: dict[str, Any], headers: dict[str, str]) -> ASGIApp | None:
        """None to go on, or the response refusing the request."""
        metrics = self.security.metrics
        hosts = self.security.hosts
        if hosts is not None and not hosts.permits(headers.get("host")):
            metrics.auth_failures.labels(reason="bad_host").inc()
            return error_response(400, f"Host {headers.get('host', '')[:100]!r} is not a name of this controller")
        if scope["path"] in self.public:
            return None
        authorization = headers.get("authorization")
        der = state.get(PEER_CERT)
        if authorization is None and der is None:
            metrics.auth_failures.labels(reason="no_credentials").inc()
            return _unauthorized(
                "no credentials: present an operator certificate or send Authorization: Bearer <token>"
            )
        try:
            principal = await run_in_threadpool(self._authenticate, authorization, der)
        except Unauthorized as exc:
            metrics.auth_failures.labels(reason="bad_token" if authorization else "bad_certificate").inc()
            return _unauthorized(str(exc))
        except Forbidden as exc:
            metrics.auth_failures.labels(reason="bad_certificate").inc()
            return error_response(403, str(exc))
        state["principal"] = principal
        return None

    def _authenticate(self, authorization: str | None, der: bytes | None) -> Principal:
        """A bearer token decides alone when present; else the certificate of the TLS handshake."""
        if authorization is not None:
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthorized("Authorization must be 'Bearer <token>'")
            return self.security.tokens.authenticate(token.strip())
        certificates = self.security.certificates
        if certificates is None or der is None:
            raise Unauthorized("client certificates are not accepted on this listener")
        return certificates.authenticate(der)


def _unauthorized(reason: str) -> JSONResponse:
    return error_response(401, reason, {"WWW-Authenticate": 'Bearer realm="fleet"'})


async def _read_body(receive: Receive, headers: dict[str, str]) -> bytes | None:
    """The whole body, or None past MAX_BODY (announced or actual)."""
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY:
        return None
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: the disconnect, when it comes

    return replay


# ---- roles, audit, idempotency -----------------------------------------------------------------


def principal_of(request: Request) -> Principal:
    principal = getattr(request.state, "principal", None)
    if not isinstance(principal, Principal):  # only when the gate is not in front (a bug)
        raise Unauthorized("not authenticated")
    return principal


def _operation(request: Request) -> str:
    route = request.scope.get("route")
    return str(getattr(route, "operation_id", None) or request.url.path)


def requires(role: AccessRole) -> Callable[[Request], Principal]:
    """A dependency: the caller, if its role allows ``role``; else 403 (audited for changes)."""

    def dependency(request: Request) -> Principal:
        principal = principal_of(request)
        if principal.allows(role):
            return principal
        changes: Changes = request.app.state.changes
        changes.security.metrics.auth_failures.labels(reason="forbidden").inc()
        reason = f"{principal.via} {principal.name!r} has role {principal.role.value}; this needs {role.value}"
        if request.method not in ("GET", "HEAD"):
            target = next(iter(request.path_params.values()), None)
            changes.record(request, principal, _operation(request), target, DENIED, 403, reason)
        raise Forbidden(reason)

    return dependency


Viewer = Annotated[Principal, Depends(requires(AccessRole.VIEWER))]
Operator = Annotated[Principal, Depends(requires(AccessRole.OPERATOR))]
Admin = Annotated[Principal, Depends(requires(AccessRole.ADMIN))]


class Changes:
    """Runs the operations that change something: audit record, idempotency."""

    def __init__(self, security: ApiSecurity) -> None:
        self.security = security

    def run(
        self,
        request: Request,
        principal: Principal,
        work: Callable[[], T],
        *,
        target: str | Callable[[T], str] | None = None,
        status: int = 200,
        present: Callable[[T], BaseModel] | None = None,
        idempotency_key: str | None = None,
        body: object = None,
    ) -> Response:
        """Do ``work``, audit it, answer its result as JSON (``present`` may add to it once audited)."""
        action = _operation(request)
        stored_for: tuple[str, str] | None = None
        if idempotency_key is not None:
            if not _IDEMPOTENCY_KEY.match(idempotency_key):
                raise BadRequest("Idempotency-Key: 1-255 printable ASCII characters without spaces")
            actor = f"{principal.via}:{principal.name}"
            fingerprint = hashlib.sha256(
                json.dumps([request.url.path, body], sort_keys=True, default=str).encode()
            ).hexdigest()
            stored = self.security.idempotency.claim(actor, idempotency_key, action, fingerprint)
            if stored is not None:
                replayed_target = target if isinstance(target, str) else _created_id(stored.body, stored.status)
                self.record(request, principal, action, replayed_target, OK, stored.status, REPLAY)
                return Response(
                    stored.body, status_code=stored.status, media_type="application/json",
                    headers={"Idempotent-Replayed": "true"},
                )  # fmt: skip
            stored_for = (actor, idempotency_key)
        fixed_target = target if isinstance(target, str) else None
        try:
            result = work()
        except FleetError as exc:
            code = status_for(exc)
            self.record(request, principal, action, fixed_target, FAILED, code, one_line(str(exc)))
            if stored_for is not None:
                if code < 500:
                    self.security.idempotency.finish(*stored_for, code, json.dumps({"error": one_line(str(exc))}))
                else:
                    self.security.idempotency.release(*stored_for)
            raise
        except BaseException:
            self.record(request, principal, action, fixed_target, FAILED, 500, "internal error")
            if stored_for is not None:
                self.security.idempotency.release(*stored_for)
            raise
        resolved = target(result) if callable(target) else target
        self.record(request, principal, action, resolved, OK, status, None)
        shown = present(result) if present is not None else result
        content = json.dumps(_jsonable(shown), separators=(",", ":"))
        if stored_for is not None:
            self.security.idempotency.finish(*stored_for, status, content)
        return Response(content, status_code=status, media_type="application/json")

    def record(
        self,
        request: Request,
        principal: Principal,
        action: str,
        target: str | None,
        outcome: str,
        status: int,
        detail: str | None,
    ) -> None:
        self.security.audit.record(
            AuditRecord(
                actor=principal.name,
                via=principal.via,
                role=principal.role.value,
                action=action,
                target=target,
                request_id=str(getattr(request.state, "request_id", "-")),
                outcome=outcome,
                status=status,
                detail=detail,
            )
        )


def _created_id(body: str, status: int) -> str | None:
    """The ``id`` of what a stored answer created (an idempotent replay names the same target)."""
    if status >= 400:
        return None
    try:
        created = json.loads(body)
    except ValueError:
        return None
    return str(created["id"]) if isinstance(created, dict) and isinstance(created.get("id"), str) else None


def _jsonable(value: object) -> object:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [_jsonable(item) for item in value]
    return value


# ---- the app -----------------------------------------------------------------------------------

_ERRORS: dict[int, str] = {
    400: "invalid request (bad selector, cursor, unknown action, ...)",
    401: "no credentials, or an unknown, expired or revoked token or certificate",
    403: "the caller's role does not allow this",
    404: "unknown node, command, rollout, release or token",
    409: "conflicts with current state (or a request with this Idempotency-Key is still running)",
    413: f"request body larger than {MAX_BODY} bytes",
    422: "request does not match the schema (or an Idempotency-Key reused for another request)",
    503: "the broker is unreachable; the request may succeed later",
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    every = sorted({*codes, 400, 401, 403, 422})
    return {code: {"model": ErrorBody, "description": _ERRORS[code]} for code in every}


def _version() -> str:
    try:
        return metadata.version("fleet-mqtt")
    except metadata.PackageNotFoundError:  # running from a source tree without installing
        return "0.0.0"


LimitQuery = Annotated[int, Query(ge=1, le=MAX_PAGE, description="entries per page (1-1000)")]
CursorQuery = Annotated[
    str | None, Query(max_length=512, description="next_cursor of the previous page; none for the first")
]
IdempotencyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        description="a client-chosen key (1-255 printable characters); a retry with the same key and body"
        " returns the first answer and changes nothing",
    ),
]


def create_app(controller: ControllerFacade, security: ApiSecurity) -> FastAPI:
    """The HTTP API over ``controller``; the OpenAPI document is at ``/openapi.json`` (no interactive
    docs: they would load their assets from the internet)."""
    app = FastAPI(
        title="fleet controller",
        version=_version(),
        description="Registry, commands with delivery tracking and staged rollouts of an MQTT fleet. Every request"
        " needs an operator client certificate (TLS) or an API token (Authorization: Bearer); see the roles in"
        " each operation's description.",
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    _install_error_handlers(app)
    changes = Changes(security)
    app.state.changes = changes
    _add_node_routes(app, controller, changes)
    _add_rollout_routes(app, controller, changes, security.audit)
    _add_admin_routes(app, controller, changes, security)
    _add_service_routes(app, controller, changes, security.metrics)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    app.add_middleware(Gate, security=security)
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        schema.setdefault("components", {})["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer", "description": "an API token (fleet token create)"},
            "operatorCertificate": {
                "type": "mutualTLS",
                "description": "an operator certificate of the fleet PKI (fleet certs operator)",
            },
        }
        schema["security"] = [{"bearer": []}, {"operatorCertificate": []}]
        for path in PUBLIC_PATHS:
            for operation in schema["paths"].get(path, {}).values():
                operation["security"] = []
        app.openapi_schema = schema
    return app.openapi_schema


def _page(items: list[T], key: Callable[[T], Any], limit: int, cursor: str | None, kind: type) -> Page[T]:
    """The page after ``cursor`` of ``items`` (sorted by ``key``)."""
    after = decode_cursor(cursor, kind)
    if after is not None:
        items = [item for item in items if key(item) > (tuple(after) if kind is list else after)]
    page = items[:limit]
    more = len(items) > limit
    next_cursor = encode_cursor(list(key(page[-1])) if kind is list else key(page[-1])) if more and page else None
    return Page[T](items=page, next_cursor=next_cursor)


def _add_node_routes(app: FastAPI, controller: ControllerFacade, changes: Changes) -> None:

    # Plain ``def`` routes: the facade is synchronous (SQLite, locks), so FastAPI runs them in its threadpool.
    @app.get("/v1/nodes", tags=["nodes"], operation_id="list_nodes", responses=_errors())
    def list_nodes(
        _who: Viewer,
        selector: Annotated[
            str | None,
            Query(
                max_length=4096,
                description="kubectl-style label selector: ring=canary, site!=plant-7, tier in (a,b), tier notin"
                " (c), key, !key; comma-joined requirements must all hold",
            ),
        ] = None,
        status: Annotated[
            str | None, Query(pattern="^(online|stale|offline)$", description="online, stale, offline")
        ] = None,
        version: Annotated[str | None, Query(max_length=128, description="the version the node reports")] = None,
        health: Annotated[
            str | None, Query(pattern="^(healthy|unhealthy|unknown)$", description="healthy, unhealthy, unknown")
        ] = None,
        limit: LimitQuery = 100,
        cursor: CursorQuery = None,
    ) -> Page[NodeView]:
        """Nodes matching every filter, by id. Role: viewer."""
        found = select(controller.nodes(), Selector.parse(selector))
        if status is not None:
            found = [node for node in found if node.status.value == status]
        if version is not None:
            found = [node for node in found if node.version == version]
        if health is not None:
            wanted = {"healthy": True, "unhealthy": False, "unknown": None}[health]
            found = [node for node in found if node.healthy is wanted]
        return _page(sorted(found, key=lambda node: node.id), lambda node: node.id, limit, cursor, str)

    @app.get("/v1/nodes/{node_id}", tags=["nodes"], operation_id="get_node", responses=_errors(404))
    def get_node(_who: Viewer, node_id: str) -> NodeDetail:
        """One node: reported state, health history, recent commands and update events. Role: viewer."""
        return controller.node(node_id)

    @app.get("/v1/nodes/{node_id}/events", tags=["nodes"], operation_id="list_node_events", responses=_errors(404))
    def list_node_events(
        _who: Viewer, node_id: str, limit: LimitQuery = 100, cursor: CursorQuery = None
    ) -> Page[NodeEvent]:
        """The update events the node reported recently (download, verify, install, switch, rollback), oldest
        first; the controller keeps the last few per node in memory. Role: viewer."""
        events = controller.node_events(node_id)
        numbered = list(enumerate(events))
        page = _page(numbered, lambda item: item[0], limit, cursor, int)
        return Page[NodeEvent](items=[event for _, event in page.items], next_cursor=page.next_cursor)

    @app.put(
        "/v1/nodes/{node_id}/labels", tags=["nodes"], operation_id="replace_node_labels", responses=_errors(404, 413)
    )
    def replace_node_labels(
        request: Request,
        who: Operator,
        node_id: str,
        labels: Annotated[dict[str, str], Body(description="the node's new operator labels; {} removes them all")],
    ) -> NodeView:
        """Replace the node's operator labels (``{}`` removes them all). Operator labels are kept by the
        controller, never sent by the node, and win over the labels it reports: selectors match both, the
        canary ring (``ring=canary``) is operator-only. Role: operator."""
        return changes.run(  # type: ignore[return-value]
            request, who, lambda: controller.set_labels(node_id, dict(labels), replace_all=True), target=node_id
        )

    @app.patch(
        "/v1/nodes/{node_id}/labels", tags=["nodes"], operation_id="change_node_labels", responses=_errors(404, 413)
    )
    def change_node_labels(
        request: Request,
        who: Operator,
        node_id: str,
        label_changes: Annotated[
            dict[str, str | None], Body(description="label: value sets it, label: null removes it")
        ],
    ) -> NodeView:
        """Change some operator labels (a JSON merge patch): ``{"ring": "canary", "site": null}`` sets ``ring``
        and removes ``site``; labels not named stay as they are. Role: operator."""
        return changes.run(  # type: ignore[return-value]
            request, who, lambda: controller.set_labels(node_id, label_changes), target=node_id
        )

    @app.post(
        "/v1/nodes/{node_id}/commands",
        status_code=201,
        tags=["commands"],
        operation_id="send_command",
        responses=_errors(404, 409, 413, 503),
    )
    def send_command(
        request: Request,
        who: Operator,
        node_id: str,
        command: Annotated[CommandRequest, Body()],
        idempotency_key: IdempotencyHeader = None,
    ) -> CommandView:
        """Send a command; the controller resends it until acknowledged or expired. With an Idempotency-Key,
        a retry returns the first answer and sends nothing. Role: operator."""
        return changes.run(  # type: ignore[return-value]
            request,
            who,
            lambda: controller.send_command(node_id, command.action, command.args, command.expires_in),
            target=lambda view: view.id,
            status=201,
            idempotency_key=idempotency_key,
            body=command.model_dump(mode="json"),
        )

    @app.get("/v1/commands/{command_id}", tags=["commands"], operation_id="get_command", responses=_errors(404))
    def get_command(_who: Viewer, command_id: str) -> CommandView:
        """A command with its ack trail. Role: viewer."""
        return controller.command(command_id)

    @app.post(
        "/v1/commands/{command_id}/cancel",
        tags=["commands"],
        operation_id="cancel_command",
        responses=_errors(404, 409),
    )
    def cancel_command(request: Request, who: Operator, command_id: str) -> CommandView:
        """Stop resending a command that has no ack yet (409 once the node acknowledged it). A copy the broker
        already queued for an offline node may still arrive; the agent refuses it after its expiry. Role: operator."""
        return changes.run(  # type: ignore[return-value]
            request, who, lambda: controller.cancel_command(command_id), target=command_id
        )


def _add_rollout_routes(app: FastAPI, controller: ControllerFacade, changes: Changes, audit: AuditLog) -> None:

    def with_actions(view: RolloutView) -> RolloutView:
        return view.model_copy(update={"actions": audit.rollout_actions([view.id])[view.id]})

    @app.post(
        "/v1/rollouts",
        status_code=201,
        tags=["rollouts"],
        operation_id="start_rollout",
        responses=_errors(404, 409, 413, 503),
    )
    def start_rollout(
        request: Request,
        who: Operator,
        rollout: Annotated[RolloutRequest, Body()],
        idempotency_key: IdempotencyHeader = None,
    ) -> RolloutView:
        """Start a staged, health-gated rollout of a release to the nodes matching the selector. With an
        Idempotency-Key, a retry returns the first answer and starts nothing. Role: operator."""
        return changes.run(  # type: ignore[return-value]
            request,
            who,
            lambda: controller.start_rollout(rollout),
            target=lambda view: view.id,
            status=201,
            present=with_actions,
            idempotency_key=idempotency_key,
            body=rollout.model_dump(mode="json"),
        )

    @app.post("/v1/rollouts/plan", tags=["rollouts"], operation_id="plan_rollout", responses=_errors(404, 413))
    def plan_rollout(_who: Viewer, rollout: Annotated[RolloutRequest, Body()]) -> RolloutPlan:
        """What starting this rollout would do now (which nodes land in which wave), changing nothing.
        Role: viewer."""
        return controller.plan_rollout(rollout)

    @app.get("/v1/rollouts", tags=["rollouts"], operation_id="list_rollouts", responses=_errors())
    def list_rollouts(
        _who: Viewer,
        state: Annotated[RolloutState | None, Query(description="only rollouts in this state")] = None,
        release: Annotated[str | None, Query(max_length=200, description="only rollouts of this name@version")] = None,
        limit: LimitQuery = 100,
        cursor: CursorQuery = None,
    ) -> Page[RolloutView]:
        """Rollouts, oldest first, with who started, paused, resumed or aborted them. Role: viewer."""
        views = [
            view
            for view in controller.rollouts()
            if (state is None or view.state is state) and (release is None or view.release == release)
        ]
        views.sort(key=lambda view: (view.created, view.id))
        page = _page(views, lambda view: (view.created, view.id), limit, cursor, list)
        actions = audit.rollout_actions([view.id for view in page.items])
        items = [view.model_copy(update={"actions": actions[view.id]}) for view in page.items]
        return Page[RolloutView](items=items, next_cursor=page.next_cursor)

    @app.get("/v1/rollouts/{rollout_id}", tags=["rollouts"], operation_id="get_rollout", responses=_errors(404))
    def get_rollout(_who: Viewer, rollout_id: str) -> RolloutView:
        """A rollout's progress per wave and per node, and who acted on it. Role: viewer."""
        return with_actions(controller.rollout(rollout_id))

    def transition(name: str, run: Callable[[str], RolloutView], doc: str) -> None:
        def route(request: Request, who: Operator, rollout_id: str) -> RolloutView:
            return changes.run(  # type: ignore[return-value]
                request, who, lambda: run(rollout_id), target=rollout_id, present=with_actions
            )

        route.__doc__ = doc + " Role: operator."
        app.post(
            f"/v1/rollouts/{{rollout_id}}/{name}",
            tags=["rollouts"],
            operation_id=f"{name}_rollout",
            responses=_errors(404, 409),
            response_model=RolloutView,
        )(route)

    transition("pause", controller.pause_rollout, "Start no more nodes; nodes already updating carry on.")
    transition("resume", controller.resume_rollout, "Continue a paused rollout where it stopped.")
    transition(
        "abort", controller.abort_rollout, "Stop the rollout and roll every node it touched back to its baseline."
    )


def _add_admin_routes(app: FastAPI, controller: ControllerFacade, changes: Changes, security: ApiSecurity) -> None:

    @app.get("/v1/releases", tags=["releases"], operation_id="list_releases", responses=_errors())
    def list_releases(
        _who: Viewer,
        name: Annotated[str | None, Query(max_length=128, description="only releases of this name")] = None,
        limit: LimitQuery = 100,
        cursor: CursorQuery = None,
    ) -> Page[ReleaseView]:
        """The signed releases in the controller's release store, by name and version. Role: viewer."""
        releases = [release for release in controller.list_releases() if name is None or release.name == name]
        return _page(releases, lambda release: release.label, limit, cursor, str)

    @app.get("/v1/audit", tags=["audit"], operation_id="list_audit", responses=_errors())
    def list_audit(
        _who: Viewer,
        since: Annotated[float | None, Query(ge=0, description="only entries at or after (unix seconds)")] = None,
        actor: Annotated[str | None, Query(max_length=128, description="certificate CN or token name")] = None,
        action: Annotated[str | None, Query(max_length=64, description="an operation id, e.g. start_rollout")] = None,
        target: Annotated[str | None, Query(max_length=256, description="a node, command, rollout or token")] = None,
        outcome: Annotated[str | None, Query(pattern="^(ok|failed|denied)$", description="ok, failed, denied")] = None,
        limit: LimitQuery = 100,
        cursor: CursorQuery = None,
    ) -> Page[AuditEntry]:
        """The audit trail, oldest first: every change asked through the API, who asked, when, the request
        id and the outcome. Role: viewer."""
        entries, next_cursor = security.audit.page(
            since=since, actor=actor, action=action, target=target, outcome=outcome, limit=limit, cursor=cursor
        )
        return Page[AuditEntry](items=entries, next_cursor=next_cursor)

    @app.get("/v1/tokens", tags=["tokens"], operation_id="list_tokens", responses=_errors())
    def list_tokens(
        _who: Admin,
        revoked: Annotated[bool, Query(description="include revoked tokens")] = False,
    ) -> list[TokenView]:
        """API tokens: name, role, expiry, who made them (never the secret). Role: admin."""
        return security.tokens.list(include_revoked=revoked)

    @app.post("/v1/tokens", status_code=201, tags=["tokens"], operation_id="create_token", responses=_errors(409, 413))
    def create_token(request: Request, who: Admin, token: Annotated[TokenRequest, Body()]) -> TokenCreated:
        """Create an API token; the answer holds the secret, shown this once (stored only as a salted hash).
        Role: admin."""

        def create() -> TokenCreated:
            view, secret = security.tokens.create(token.name, AccessRole(token.role.value), token.expires_in, who.name)
            return TokenCreated(info=view, token=secret)

        return changes.run(request, who, create, target=token.name, status=201)  # type: ignore[return-value]

    @app.delete("/v1/tokens/{name}", tags=["tokens"], operation_id="revoke_token", responses=_errors(404))
    def revoke_token(request: Request, who: Admin, name: str) -> TokenView:
        """Revoke an API token at once (every controller sharing the database within a second). Role: admin."""
        return changes.run(request, who, lambda: security.tokens.revoke(name), target=name)  # type: ignore[return-value]

    @app.get("/v1/identities", tags=["identities"], operation_id="list_identities", responses=_errors())
    def list_identities(_who: Admin) -> list[IdentityView]:
        """The certificates the controller knows (CAs, its own, operators and controllers in its PKI
        directory, operators seen on the API) with expiry and revocation. Role: admin."""
        return controller.identities()


def _add_service_routes(
    app: FastAPI, controller: ControllerFacade, changes: Changes, metrics: ControllerMetrics
) -> None:

    @app.get("/v1/whoami", tags=["service"], operation_id="whoami", responses=_errors())
    def whoami(who: Viewer) -> WhoAmI:
        """The caller as the API sees it: name, how it authenticated, role. Role: viewer."""
        return WhoAmI(name=who.name, via=who.via, role=AccessRoleName(who.role.value))

    @app.get(
        "/metrics",
        tags=["service"],
        operation_id="metrics",
        response_class=Response,
        responses={**_errors(), 200: {"content": {CONTENT_TYPE: {}}, "description": "Prometheus text format 0.0.4"}},
    )
    def metrics_route(_who: Viewer) -> Response:
        """Prometheus metrics (text format 0.0.4); the same as the --metrics listener serves without
        credentials. Role: viewer."""
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get(
        "/healthz",
        tags=["service"],
        operation_id="healthz",
        responses={503: {"model": HealthView, "description": "something the controller needs is not working"}},
    )
    def healthz() -> JSONResponse:
        """Whether the controller works: broker connected, database answering, periodic loop running
        (503 if not). Cheap; no credentials needed."""
        return health_response(controller.health())


def health_response(view: HealthView) -> JSONResponse:
    return JSONResponse(status_code=200 if view.ok else 503, content=view.model_dump(mode="json"))


# ---- the metrics listener ----------------------------------------------------------------------


def create_metrics_app(
    metrics: ControllerMetrics, health: Callable[[], HealthView], hosts: HostCheck | None = None
) -> Starlette:
    """``GET /metrics`` and ``GET /healthz`` without credentials, nothing else: a scraper gets no way to
    change or read anything beyond the metrics."""

    async def render(_request: Any) -> Response:
        body = await run_in_threadpool(metrics.render)
        return Response(body, media_type=CONTENT_TYPE)

    async def healthz(_request: Any) -> Response:
        return health_response(await run_in_threadpool(health))

    async def not_found(request: Any, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        return error_response(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}")

    app = Starlette(
        routes=[Route("/metrics", render, methods=["GET"]), Route("/healthz", healthz, methods=["GET"])],
        exception_handlers={StarletteHTTPException: not_found},
    )
    if hosts is not None:
        checked = hosts

        async def host_gate(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http":
                headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
                if not checked.permits(headers.get("host")):
                    metrics.auth_failures.labels(reason="bad_host").inc()
                    host = headers.get("host", "")[:100]
                    await error_response(400, f"Host {host!r} is not a name of this listener")(scope, receive, send)
                    return
            await app(scope, receive, send)

        return _Wrapped(host_gate)
    return app


class _Wrapped(Starlette):
    """A Starlette app whose calls go to an ASGI callable (so the return type stays Starlette)."""

    def __init__(self, inner: Callable[[Scope, Receive, Send], Any]) -> None:
        super().__init__()
        self._inner = inner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._inner(scope, receive, send)


# ---- serving -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    """The server's certificate and key, and the CA that client certificates must chain to."""

    cert: Path
    key: Path
    ca: Path


class _PeerCertificateProtocol(H11Protocol):
    """uvicorn's h11 protocol, putting the client certificate of the TLS connection into each request's
    ``scope["state"]`` (uvicorn offers no ASGI TLS extension)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if der:
            self.app_state = {**self.app_state, PEER_CERT: der}  # this connection's own copy


class ApiServer:
    """uvicorn in one named daemon thread on a socket bound before it starts (so port 0 works)."""

    def __init__(
        self,
        app: ASGIApp,
        host: str,
        port: int,
        *,
        tls: TlsFiles | None = None,
        name: str = "api",
        option: str = "--http",
    ) -> None:
        self.host = host
        self.tls = tls
        self._requested_port = port
        self._name = name
        self._option = option
        tls_options: dict[str, Any] = {}
        if tls is not None:
            tls_options = {
                "ssl_certfile": str(tls.cert),
                "ssl_keyfile": str(tls.key),
                "ssl_ca_certs": str(tls.ca),
                "ssl_cert_reqs": ssl.CERT_OPTIONAL,  # a certificate, or a bearer token
            }
        # log_config=None: leave logging to the process (the CLI configures it), not to uvicorn.
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_config=None,
            access_log=False,
            lifespan="off",
            http=_PeerCertificateProtocol,
            server_header=False,
            proxy_headers=False,
            limit_concurrency=256,
            **tls_options,
        )
        self._server = uvicorn.Server(config)
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.port = port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://{host}:{self.port}"

    def start(self, timeout: float = 10.0) -> ApiServer:
        """Bind, start serving and return once uvicorn accepts connections; ``ConfigError`` if it cannot.

        Idempotent, so a caller may start a server that ``serve_in_thread`` already started.
        """
        if self._thread is not None:
            return self
        try:
            self._server.config.load()  # here, so a bad certificate or key is an error the caller sees
        except (OSError, ssl.SSLError) as exc:
            files = f" ({self.tls.cert}, {self.tls.key})" if self.tls is not None else ""
            raise ConfigError(f"{self._option}: cannot load the TLS certificate and key{files}: {exc}") from exc
        sock = self._bind()
        self._socket = sock
        self.port = int(sock.getsockname()[1])
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name=f"fleet-{self._name}-{self.port}", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() >= deadline:
                self.stop()
                raise ConfigError(f"{self._option} {self.host}:{self.port}: did not start within {timeout:.0f}s")
            time.sleep(0.01)
        log.info("%s listening on %s", self._name, self.url)
        return self

    def _bind(self) -> socket.socket:
        # Bound here, in the caller's thread, so "address in use" is an exception the caller sees.
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        # IPPROTO_TCP, not 0: asyncio turns TCP_NODELAY on for accepted sockets only when the proto
        # says TCP; without it every answer waited ~40 ms for the client's delayed ACK (Nagle).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self._requested_port))
        except OSError as exc:
            sock.close()
            where = f"{self._option} {self.host}:{self._requested_port}"
            raise ConfigError(f"{where}: cannot listen: {exc.strerror}") from exc
        return sock

    def stop(self, timeout: float = 5.0) -> None:
        """Ask uvicorn to finish open requests and exit; force it if that takes longer than ``timeout``."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._server.should_exit = True
            thread.join(timeout)
            if thread.is_alive():
                self._server.force_exit = True
                thread.join(timeout)
            if thread.is_alive():
                log.warning("%s thread did not stop within %.1fs", self._name, 2 * timeout)
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def serve_in_thread(
    app: ASGIApp, host: str, port: int, *, tls: TlsFiles | None = None, name: str = "api", option: str = "--http"
) -> ApiServer:
    """Start serving ``app`` on ``host:port`` (0: any free port, see ``ApiServer.port``)."""
    return ApiServer(app, host, port, tls=tls, name=name, option=option).start()


def allowed_hosts(host: str, tls: TlsFiles | None, extra: Iterable[str]) -> HostCheck:
    """The Host check of an API listener: its TLS certificate's names (what a verifying client can use)."""
    from fleet.controller.auth import certificate_names

    names = certificate_names(tls.cert) if tls is not None else []
    return HostCheck.for_listener(host, names, extra)
