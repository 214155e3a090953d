"""The controller's HTTP JSON API: a thin FastAPI layer over a ``ControllerFacade``.

Everything here is translation: query strings and JSON bodies into facade calls, the facade's
typed errors into status codes with a one-line ``{"error": ...}`` body, and its flat metrics dict
into the Prometheus text format. No controller state lives here except an error counter.

``serve_in_thread`` runs the app under uvicorn in one owned, named thread, so the controller
process (and the tests) can start and stop the API next to their other services.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from collections.abc import Iterable
from importlib import metadata
from typing import Annotated, Any

import uvicorn
from fastapi import Body, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from fleet.controller.facade import (
    BadRequest,
    CommandView,
    Conflict,
    ControllerFacade,
    NodeDetail,
    NodeView,
    NotFound,
    RolloutRequest,
    RolloutView,
    parse_selector,
)
from fleet.protocol.errors import ConfigError, FleetError, InvalidMessage, Rejected, TransportError

log = logging.getLogger(__name__)

ERROR_METRIC = "fleet_api_errors_total"


# Most specific first: the facade's own errors, then the generic ones a controller may let through.
_STATUS_BY_ERROR: tuple[tuple[type[FleetError], int], ...] = (
    (NotFound, 404),
    (Conflict, 409),
    (BadRequest, 400),
    (InvalidMessage, 400),
    (Rejected, 400),
    (TransportError, 503),  # the broker is away: the request may succeed later
)

_METRIC_KEY = re.compile(r"(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})?")
_LABEL = re.compile(r'\s*(?P<key>[a-zA-Z_][a-zA-Z0-9_]*)="(?P<value>(?:[^"\\]|\\.)*)"\s*(?:,|$)')


class ErrorBody(BaseModel):
    """Every error response: one line saying what is wrong."""

    error: str


class CommandRequest(BaseModel):
    """Body of ``POST /nodes/{id}/commands``."""

    action: str = Field(min_length=1, max_length=64)
    args: dict[str, Any] = Field(default_factory=dict)
    expires_in: float = Field(default=3600.0, gt=0, description="seconds until the command expires unacknowledged")


class Health(BaseModel):
    ok: bool


# ---- selectors ---------------------------------------------------------------------------------


# ---- errors ------------------------------------------------------------------------------------


class ErrorCounter:
    """Error responses by status code, for ``fleet_api_errors_total``; safe across server threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[int, int] = {}

    def add(self, status: int) -> None:
        with self._lock:
            self._counts[status] = self._counts.get(status, 0) + 1

    def snapshot(self) -> dict[int, int]:
        with self._lock:
            return dict(self._counts)


def status_for(exc: FleetError) -> int:
    for kind, status in _STATUS_BY_ERROR:
        if isinstance(exc, kind):
            return status
    return 500


def one_line(text: str) -> str:
    """Error bodies are read by people and by ``fleet`` as one line."""
    return " ".join(text.split()) or "error"


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


def _install_error_handlers(app: FastAPI, counter: ErrorCounter) -> None:
    def respond(status: int, reason: str) -> JSONResponse:
        counter.add(status)
        return JSONResponse(status_code=status, content=ErrorBody(error=one_line(reason)).model_dump())

    # Starlette's handler signature is (Request, Exception); each handler narrows for itself.
    async def fleet_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, FleetError)
        status = status_for(exc)
        if status >= 500:
            log.warning("request failed with %s: %s", type(exc).__name__, exc)
        return respond(status, str(exc))

    async def validation_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return respond(422, _validation_reason(exc))

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        # Routing errors (unknown path, wrong method) come from Starlette, not from the facade.
        assert isinstance(exc, StarletteHTTPException)
        return respond(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}")

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Starlette logs and re-raises after this; the handler only keeps the body's shape and the count.
        log.error("unhandled %s on %s %s: %s", type(exc).__name__, request.method, request.url.path, exc)
        return respond(500, f"internal error: {type(exc).__name__}")

    app.add_exception_handler(FleetError, fleet_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)


# ---- metrics -----------------------------------------------------------------------------------


def parse_metric_key(key: str) -> tuple[str, dict[str, str]]:
    """``fleet_nodes{status="online"}`` -> (``fleet_nodes``, {"status": "online"}); ValueError if malformed."""
    match = _METRIC_KEY.fullmatch(key.strip())
    if match is None:
        raise ValueError(f'metric key {key!r}: not name or name{{label="value",...}}')
    labels: dict[str, str] = {}
    text = match.group("labels") or ""
    position = 0
    while position < len(text):
        label = _LABEL.match(text, position)
        if label is None or label.end() == position:
            raise ValueError(f"metric key {key!r}: malformed labels at {text[position:]!r}")
        labels[label.group("key")] = _unescape(label.group("value"))
        position = label.end()
    return match.group("name"), labels


def _unescape(value: str) -> str:
    """The text format's label escapes: ``\\\\``, ``\\"`` and ``\\n``."""
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


class FacadeCollector(Collector):
    """Turns the facade's flat dict and the API's error counts into metric families at scrape time.

    Mapping: the part of a key before ``{`` is the family, the labels pass through; a family whose
    name ends in ``_total`` is a counter, every other one a gauge.
    """

    def __init__(self, controller: ControllerFacade, errors: ErrorCounter) -> None:
        self._controller = controller
        self._errors = errors

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        for key, value in self._controller.metrics().items():
            try:
                name, labels = parse_metric_key(key)
            except ValueError as exc:
                log.warning("skipping controller metric: %s", exc)
                continue
            self._family(families, name).add_sample(name, labels, float(value))
        errors = self._family(families, ERROR_METRIC, "HTTP API error responses by status code.")
        for status, count in sorted(self._errors.snapshot().items()):
            errors.add_sample(ERROR_METRIC, {"code": str(status)}, float(count))
        return families.values()

    @staticmethod
    def _family(families: dict[str, Metric], name: str, documentation: str | None = None) -> Metric:
        family = families.get(name)
        if family is None:
            counter = name.endswith("_total")
            # prometheus_client names a counter family without ``_total`` and appends it on output.
            family = Metric(
                name.removesuffix("_total") if counter else name,
                documentation or f"{name} as reported by the fleet controller.",
                "counter" if counter else "gauge",
            )
            families[name] = family
        return family


# ---- the app -----------------------------------------------------------------------------------

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "invalid request (bad selector, unknown action, ...)"},
    404: {"model": ErrorBody, "description": "unknown node, command, rollout or release"},
    409: {"model": ErrorBody, "description": "conflicts with current state"},
    422: {"model": ErrorBody, "description": "request does not match the schema"},
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: _ERRORS[code] for code in (*codes, 422)}


def _version() -> str:
    try:
        return metadata.version("fleet-mqtt")
    except metadata.PackageNotFoundError:  # running from a source tree without installing
        return "0.0.0"


def create_app(controller: ControllerFacade) -> FastAPI:
    """The HTTP API over ``controller``; the OpenAPI description is at ``/openapi.json``."""
    app = FastAPI(
        title="fleet controller",
        version=_version(),
        description="Registry, commands with delivery tracking and staged rollouts of an MQTT fleet.",
    )
    counter = ErrorCounter()
    app.state.errors = counter
    _install_error_handlers(app, counter)
    _add_node_routes(app, controller)
    _add_rollout_routes(app, controller)
    _add_service_routes(app, controller, counter)
    return app


def _add_node_routes(app: FastAPI, controller: ControllerFacade) -> None:
    # Plain ``def`` routes: the facade is synchronous (SQLite, locks), so FastAPI runs them in its threadpool.
    @app.get("/nodes", tags=["nodes"], responses=_errors(400))
    def list_nodes(
        selector: Annotated[str | None, Query(description="label equality, e.g. ring=canary,site=plant-3")] = None,
    ) -> list[NodeView]:
        """Nodes matching the selector (every node without one)."""
        return controller.nodes(parse_selector(selector) or None)

    @app.get("/nodes/{node_id}", tags=["nodes"], responses=_errors(404))
    def get_node(node_id: str) -> NodeDetail:
        """One node: reported state, health history, recent commands and their acks."""
        return controller.node(node_id)

    @app.put("/nodes/{node_id}/labels", tags=["nodes"], responses=_errors(400, 404))
    def put_labels(node_id: str, labels: Annotated[dict[str, str], Body()]) -> NodeView:
        """Replace the node's operator labels with ``labels`` (``{}`` removes them all).

        Operator labels are kept by the controller, never sent by the node, and win over the labels
        the node reports: selectors match both, the canary ring (``ring=canary``) is operator-only.
        """
        return controller.set_labels(node_id, dict(labels), replace_all=True)

    @app.patch("/nodes/{node_id}/labels", tags=["nodes"], responses=_errors(400, 404))
    def patch_labels(node_id: str, changes: Annotated[dict[str, str | None], Body()]) -> NodeView:
        """Change some operator labels (a JSON merge patch): ``{"ring": "canary", "site": null}``
        sets ``ring`` and removes ``site``; labels not named stay as they are."""
        return controller.set_labels(node_id, changes)

    @app.post("/nodes/{node_id}/commands", status_code=201, tags=["commands"], responses=_errors(400, 404))
    def send_command(node_id: str, request: Annotated[CommandRequest, Body()]) -> CommandView:
        """Send a command; the controller resends it until acknowledged or expired."""
        return controller.send_command(node_id, request.action, request.args, request.expires_in)

    @app.get("/commands/{command_id}", tags=["commands"], responses=_errors(404))
    def get_command(command_id: str) -> CommandView:
        """A command with its ack trail."""
        return controller.command(command_id)


def _add_rollout_routes(app: FastAPI, controller: ControllerFacade) -> None:
    @app.post("/rollouts", status_code=201, tags=["rollouts"], responses=_errors(400, 404, 409))
    def start_rollout(request: RolloutRequest) -> RolloutView:
        """Start a staged, health-gated rollout of a release to the nodes matching the selector."""
        return controller.start_rollout(request)

    @app.get("/rollouts", tags=["rollouts"])
    def list_rollouts() -> list[RolloutView]:
        return controller.rollouts()

    @app.get("/rollouts/{rollout_id}", tags=["rollouts"], responses=_errors(404))
    def get_rollout(rollout_id: str) -> RolloutView:
        return controller.rollout(rollout_id)

    @app.post("/rollouts/{rollout_id}/pause", tags=["rollouts"], responses=_errors(404, 409))
    def pause_rollout(rollout_id: str) -> RolloutView:
        return controller.pause_rollout(rollout_id)

    @app.post("/rollouts/{rollout_id}/resume", tags=["rollouts"], responses=_errors(404, 409))
    def resume_rollout(rollout_id: str) -> RolloutView:
        return controller.resume_rollout(rollout_id)

    @app.post("/rollouts/{rollout_id}/abort", tags=["rollouts"], responses=_errors(404, 409))
    def abort_rollout(rollout_id: str) -> RolloutView:
        """Stop the rollout and roll every node it touched back to the baseline release."""
        return controller.abort_rollout(rollout_id)


def _add_service_routes(app: FastAPI, controller: ControllerFacade, counter: ErrorCounter) -> None:
    collector = FacadeCollector(controller, counter)

    @app.get("/metrics", tags=["service"], response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        """Prometheus text exposition (format 0.0.4)."""
        return PlainTextResponse(generate_latest(collector), media_type=CONTENT_TYPE_PLAIN_0_0_4)

    @app.get("/healthz", tags=["service"])
    def healthz() -> Health:
        return Health(ok=True)


# ---- serving -----------------------------------------------------------------------------------


class ApiServer:
    """uvicorn in one named daemon thread on a socket bound before it starts (so port 0 works)."""

    def __init__(self, app: FastAPI, host: str, port: int, *, access_log: bool = False) -> None:
        self.host = host
        self._requested_port = port
        # log_config=None: leave logging to the process (the CLI configures it), not to uvicorn.
        config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=access_log, lifespan="off")
        self._server = uvicorn.Server(config)
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.port = port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 10.0) -> ApiServer:
        """Bind, start serving and return once uvicorn accepts connections; ``ConfigError`` if it cannot.

        Idempotent, so a caller may start a server that ``serve_in_thread`` already started.
        """
        if self._thread is not None:
            return self
        sock = self._bind()
        self._socket = sock
        self.port = int(sock.getsockname()[1])
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name=f"fleet-api-{self.port}", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() >= deadline:
                self.stop()
                raise ConfigError(f"HTTP API on {self.host}:{self.port} did not start within {timeout:.0f}s")
            time.sleep(0.01)
        log.info("HTTP API listening on %s", self.url)
        return self

    def _bind(self) -> socket.socket:
        # Bound here, in the caller's thread, so "address in use" is an exception the caller sees.
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self._requested_port))
        except OSError as exc:
            sock.close()
            raise ConfigError(f"--http {self.host}:{self._requested_port}: cannot listen: {exc.strerror}") from exc
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
                log.warning("HTTP API thread did not stop within %.1fs", 2 * timeout)
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def serve_in_thread(app: FastAPI, host: str, port: int) -> ApiServer:
    """Start serving ``app`` on ``host:port`` (0: any free port, see ``ApiServer.port``)."""
    return ApiServer(app, host, port).start()
