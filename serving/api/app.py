"""The Quart application: OpenAI routes plus health, metrics, auth, CORS and gzip."""

from __future__ import annotations

import gzip
import hmac
import importlib.metadata
import json
import logging
import re
import uuid

from prometheus_client import CONTENT_TYPE_LATEST
from quart import Quart, Response, g, request
from quart.wrappers.response import DataBody
from quart_schema import document_response, hide
from werkzeug.exceptions import HTTPException

from serving.api import lora_routes, ollama_api
from serving.api.errors import APIError
from serving.api.messages_api import MESSAGES_PATH
from serving.api.messages_api import error_body as messages_error_body
from serving.api.openapi import DOCS_PATH, OPENAPI_PATH, add_openapi, documented
from serving.api.responses import HealthResponse, VersionResponse
from serving.api.routes import bp
from serving.api.state import AppState
from serving.api.tracking import RequestTracker

log = logging.getLogger("fleetlm.api")

# Routes for probes and scrapers: no API key, served while loading and draining.
_OPEN_PATHS = frozenset({"/", "/health", "/version", "/metrics", OPENAPI_PATH, DOCS_PATH})
GENERATION_PATHS = {
    "/v1/completions": "completions",
    "/v1/chat/completions": "chat.completions",
    "/v1/responses": "responses",
    "/v1/embeddings": "embeddings",
    "/v1/messages": "messages",
    "/api/chat": "ollama.chat",
    "/api/generate": "ollama.generate",
    "/api/embed": "ollama.embed",
    "/api/embeddings": "ollama.embeddings",
}
_GZIP_MIN_BYTES = 1024
# A client's X-Request-Id is kept when it is a plain token (it goes into logs and response ids);
# anything else is replaced by a generated one.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


def _json_error(exc: APIError) -> Response:
    if (tracker := g.get("tracker")) is not None:
        tracker.error = exc.message
    if request.path.startswith(MESSAGES_PATH):  # Anthropic's API, Anthropic's errors; Ollama's, Ollama's
        body = messages_error_body(exc)
    elif request.path.startswith(ollama_api.PREFIX):
        body = ollama_api.error_body(exc)
    else:
        body = exc.body()
    response = Response(json.dumps(body), status=exc.status, mimetype="application/json")
    for key, value in exc.headers.items():
        response.headers[key] = value
    return response


def _version() -> str:
    try:
        return importlib.metadata.version("fleetlm")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def create_app(state: AppState) -> Quart:
    app = Quart("fleetlm")
    app.extensions["fleetlm"] = state
    # Generations can stream for minutes; the API's own limits (max tokens, drain) bound them.
    app.config["RESPONSE_TIMEOUT"] = None
    app.config["MAX_CONTENT_LENGTH"] = 32 * 1024 * 1024
    app.register_blueprint(bp)
    app.register_blueprint(lora_routes.bp)
    app.register_blueprint(ollama_api.bp)
    add_openapi(app, _version(), api_key=state.config.api_key is not None)
    cfg = state.config
    origins = [o.strip() for o in cfg.cors_origins.split(",") if o.strip()]

    @app.before_request
    async def request_id():
        given = request.headers.get("X-Request-Id", "")
        g.request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex

    @app.before_request
    async def gate():
        if request.method == "OPTIONS" and origins:
            return Response("", status=204)  # CORS preflight; headers added below
        if request.path in _OPEN_PATHS:
            return None
        if request.path in GENERATION_PATHS and request.method == "POST":
            # Opened before anything can refuse the request, so that every refusal is counted
            # and logged by the tracker like any other ending.
            g.tracker = RequestTracker(state, g.request_id, GENERATION_PATHS[request.path])
        if cfg.api_key is not None:
            # The scheme is case-insensitive (RFC 7235: "bearer x" is "Bearer x"); the token is not. The
            # anthropic SDK sends its key as X-Api-Key instead.
            scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
            if "X-Api-Key" in request.headers and "Authorization" not in request.headers:
                scheme, token = "bearer", request.headers["X-Api-Key"]
            # The header's bytes as sent (HTTP headers arrive decoded as Latin-1), against the key's UTF-8.
            sent = token.strip().encode("latin-1", errors="replace")
            if scheme.lower() != "bearer" or not hmac.compare_digest(sent, cfg.api_key.encode()):
                raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
        if state.draining:
            raise APIError(503, "The server is shutting down.", type="service_unavailable", code="draining")
        if state.model is None:
            reason = state.load_error or "The model is still loading."
            raise APIError(503, reason, type="service_unavailable", code="model_loading")
        return None

    @app.errorhandler(APIError)
    async def api_error(exc: APIError):
        if g.get("tracker") is None:  # a generation request's tracker logs its own ending
            log.info(
                "request refused",
                extra={
                    "request_id": g.get("request_id"),
                    "path": request.path,
                    "status": exc.status,
                    "code": exc.code,
                    "error": exc.message[:200],
                },
            )
        return _json_error(exc)

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.code or 0)
        message = exc.description or exc.name
        if exc.code == 404:
            message = f"Unknown route: {request.method} {request.path}"
        elif exc.code == 405:
            allowed = sorted(getattr(exc, "valid_methods", None) or ())
            message = f"Method {request.method} is not allowed on {request.path}" + (
                f"; allowed: {', '.join(allowed)}" if allowed else ""
            )
        response = _json_error(APIError(exc.code or 500, message, code=code))
        if exc.code == 405 and getattr(exc, "valid_methods", None):
            response.headers["Allow"] = ", ".join(sorted(exc.valid_methods))
        return response

    @app.errorhandler(Exception)
    async def unexpected(exc: Exception):
        log.exception("unhandled error", extra={"request_id": g.get("request_id"), "path": request.path})
        return _json_error(APIError(500, f"internal error: {type(exc).__name__}", type="internal_error"))

    @app.after_request
    async def close_tracker(response: Response) -> Response:
        """Every generation response but a stream ends here: its tracker closes with its status."""
        tracker: RequestTracker | None = g.get("tracker")
        if tracker is not None and not tracker.streaming:
            tracker.close(response.status_code)
        return response

    @app.teardown_request
    async def close_abandoned_tracker(exc: BaseException | None) -> None:
        """A request that ended without a response (the client left while it was read or while its
        answer was built) still closes its tracker, or the drain would wait for it forever."""
        tracker: RequestTracker | None = g.get("tracker")
        if tracker is not None and not tracker.streaming and not tracker.closed:
            tracker.close(499, "client disconnected" if exc is None else f"{type(exc).__name__}: {exc}")

    @app.after_request
    async def decorate(response: Response) -> Response:
        if "request_id" in g:
            response.headers["X-Request-Id"] = g.request_id
        if origins:
            origin = request.headers.get("Origin")
            if "*" in origins:
                response.headers["Access-Control-Allow-Origin"] = "*"
            elif origin in origins:
                response.headers["Access-Control-Allow-Origin"] = origin
                response.vary.add("Origin")
            response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
            # Any header a preflight asks for: the openai JS SDK sends X-Stainless-* ones, others their own.
            asked = request.headers.get("Access-Control-Request-Headers")
            response.headers["Access-Control-Allow-Headers"] = asked or "Authorization, Content-Type, X-Request-Id"
            if asked:
                response.vary.add("Access-Control-Request-Headers")
            response.headers["Access-Control-Expose-Headers"] = "X-Request-Id"
        # Compress whole JSON bodies only: a compressed SSE stream would be buffered by the encoder.
        if (
            isinstance(response.response, DataBody)
            and "gzip" in request.headers.get("Accept-Encoding", "")
            and "Content-Encoding" not in response.headers
        ):
            data = await response.get_data()
            if len(data) >= _GZIP_MIN_BYTES:
                response.set_data(gzip.compress(data, compresslevel=5))
                response.headers["Content-Encoding"] = "gzip"
                response.vary.add("Accept-Encoding")
        return response

    @app.get("/health")
    @documented(None, HealthResponse, gated=False)
    @document_response(HealthResponse, 503)
    async def health():
        """Readiness: 200 once the model serves, 503 while loading, draining or failed"""
        if state.ready:
            return {"status": "ok", "model": state.model.name if state.model else None}
        status = "draining" if state.draining else "failed" if state.load_error else "loading"
        if state.engine is not None and not state.engine.healthy and not state.draining:
            status = "failed"
        return {"status": status}, 503

    @app.get("/metrics")
    @hide
    async def metrics():
        return Response(state.metrics.render(), content_type=CONTENT_TYPE_LATEST)

    @app.get("/version")
    @documented(None, VersionResponse, gated=False)
    async def version():
        """The server's version (vLLM's route)"""
        return {"version": _version()}

    @app.route("/", methods=["GET", "HEAD"])
    @hide
    async def root():
        """Alive (Ollama's clients check a server's root before using it, as `ollama` itself does)."""
        return Response("FleetLM is running", content_type="text/plain")

    return app
