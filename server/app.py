"""The aiohttp application: Open Inference Protocol v2 + OpenAI embeddings over the batcher, with drain and hot swap.

`create_app(config)` builds it; nothing runs at import. The model, the batcher and the version watcher live in
cleanup contexts. The model is loaded in the background so the server answers liveness (and "not ready") while the
loader is still streaming; readiness turns true only after the warm-up forward.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from warmpod import __version__
from warmpod.errors import WarmpodError
from warmpod.pods.policy import PolicyConfig, Snapshot, pod_scale_factor, sample_between, snapshot_from_families
from warmpod.server import audit, openai_api, openapi, v2
from warmpod.server.auth import DOOR, Door, door_ctx, door_middleware
from warmpod.server.batcher import BatchQueue
from warmpod.server.errors import (
    BadRequest,
    NotFound,
    PayloadTooLarge,
    ServerError,
    TooManyRequests,
    Unauthorized,
    Unavailable,
)
from warmpod.server.limits import DEFAULT_MAX_ROWS, DEFAULT_MAX_TOKENS, RequestLimits, request_rows
from warmpod.server.metrics import ServerMetrics, model_totals
from warmpod.server.model import ServedModel
from warmpod.server.quotas import QuotaSpec, TenantQuotas
from warmpod.server.source import ModelSource, StoreSource
from warmpod.server.tenancy import tenant_of
from warmpod.server.tensors import Tensor

log = logging.getLogger("warmpod.server")

# The protocol extensions /v2 lists: only what this server implements (Triton's names, and warmpod's own).
EXTENSIONS = ("binary_tensor_data", "model_configuration", "statistics", "openai_embeddings")
INFERENCE_ROUTES = ("infer", "embeddings")  # the routes whose latency, in-flight count and rejections are measured
REJECTED = "warmpod_rejected"  # key on an error response: the reason label of warmpod_requests_rejected_total


@dataclass(frozen=True)
class ServerConfig:
    model: str
    store: Path
    host: str = "127.0.0.1"
    port: int = 8080
    max_batch_size: int = 32
    max_batch_delay_ms: float = 2.0
    max_queue: int = 256
    threads: int = 1
    workers: int = 1
    max_body_bytes: int = 32 << 20
    max_request_rows: int = DEFAULT_MAX_ROWS
    max_request_tokens: int = DEFAULT_MAX_TOKENS
    request_timeout_s: float = 30.0
    drain_grace_s: float = 25.0
    poll_interval_s: float = 0.25
    factory: str | None = None
    truncate: bool | None = None
    slo_target_s: float = 0.1
    slo_quantile: float = 0.95
    signal_window_s: float = 30.0  # the scale-factor gauge looks back this far
    process_start: float = field(default_factory=lambda: process_start_time())
    # TLS on the public site (warmpod.server.tls): certificate + chain, its key, and for mutual TLS the client CAs.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    # The door (warmpod.server.auth) and the audit log (warmpod.server.audit); where the --metrics-port site binds.
    api_key_file: Path | None = None
    allow_unauthenticated: bool = False
    audit_log: str | None = None  # a path, or "-" for stderr
    metrics_host: str = "127.0.0.1"
    # Fairness between tenants (warmpod.server.fairqueue, warmpod.server.quotas): weights of the fair queue (default
    # 1 each) and rate limits per tenant (`*`: every tenant without its own).
    tenant_weights: tuple[tuple[str, float], ...] = ()
    tenant_quotas: tuple[QuotaSpec, ...] = ()


def process_start_time() -> float:
    """When this process started (wall clock), from /proc; now, where /proc is unavailable.

    The age comes from the boot-time clock and the start tick in /proc/self/stat (/proc/stat's btime is whole
    seconds, which would add up to a second to the cold start).
    """
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - max(0.0, age)
    except (OSError, ValueError, IndexError):
        return time.time()


class ServerState:
    """What the handlers read: the model being served, readiness, drain, and the process's exit code."""

    def __init__(self) -> None:
        self.model: ServedModel | None = None
        self.draining = False
        self.inflight = 0
        self.exit_code: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.fatal: str | None = None  # why the process stops with an error

    @property
    def ready(self) -> bool:
        return self.model is not None and not self.draining

    def stop(self, code: int, fatal: str | None = None) -> None:
        if not self.exit_code.done():
            self.fatal = fatal
            self.exit_code.set_result(code)


CONFIG = web.AppKey("config", ServerConfig)
METRICS = web.AppKey("metrics", ServerMetrics)
STATE = web.AppKey("state", ServerState)
BATCHER = web.AppKey("batcher", BatchQueue)
EXECUTOR = web.AppKey("executor", ThreadPoolExecutor)
SOURCE: web.AppKey[ModelSource] = web.AppKey("source")
OPENAPI: web.AppKey[dict[str, Any]] = web.AppKey("openapi")
QUOTAS = web.AppKey("quotas", TenantQuotas)


def create_app(
    config: ServerConfig,
    registry: CollectorRegistry | None = None,
    *,
    source: ModelSource | None = None,
    door: Door | None = None,
    audit_log: audit.AuditLog | None = None,
) -> web.Application:
    """The server. `source` is where the model comes from (default: the store, `config.model` in `config.store`);
    the edge passes its own, everything else — protocol, batching, metrics, drain, hot swap — is the same. `door` and
    `audit_log`: as `serve` opened them (default: opened here from the config; AuthError/AuditError if they cannot
    be)."""
    middlewares = [audit.audit_middleware(INFERENCE_ROUTES, REJECTED), errors_and_metrics, door_middleware]
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=middlewares)
    app[CONFIG] = config
    app[SOURCE] = source or StoreSource(
        config.store, config.model, threads=config.threads, factory=config.factory, truncate=config.truncate
    )
    app[METRICS] = ServerMetrics(registry if registry is not None else CollectorRegistry())
    app[OPENAPI] = openapi.document(__version__)
    app[QUOTAS] = TenantQuotas(config.tenant_quotas)
    app[DOOR] = door or Door.load(config.api_key_file, mutual_tls=config.tls_client_ca is not None)
    app[DOOR].attach(app[METRICS].registry)
    if audit_log is None and config.audit_log is not None:
        audit_log = audit.AuditLog.open(config.audit_log)
    app[audit.AUDIT] = audit_log
    if audit_log is not None:
        audit_log.attach(app[METRICS].registry)
    app.cleanup_ctx.extend([state_ctx, batcher_ctx, model_ctx, scale_signal_ctx, door_ctx, audit_ctx])
    app.router.add_get("/v2/health/live", live, name="live")
    app.router.add_get("/v2/health/ready", ready, name="ready")
    app.router.add_get("/v2", server_metadata, name="server_metadata")
    app.router.add_get("/v2/", server_metadata)
    app.router.add_get("/v2/models/stats", model_stats)  # before /v2/models/{model}: not a model named "stats"
    app.router.add_post("/v2/repository/index", repository_index)
    for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        app.router.add_get(prefix, model_metadata)
        app.router.add_get(prefix + "/ready", model_ready)
        app.router.add_get(prefix + "/config", model_config)
        app.router.add_get(prefix + "/stats", model_stats)
        app.router.add_post(prefix + "/infer", infer, name="infer" if "version" not in prefix else "infer_version")
    app.router.add_post("/v1/embeddings", embeddings, name="embeddings")
    app.router.add_get("/v1/models", openai_models)
    app.router.add_get("/v1/models/{model}", openai_model)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi_document)
    return app


# ------------------------------------------------------------------------------------------ resources


async def state_ctx(app: web.Application) -> AsyncIterator[None]:
    app[STATE] = ServerState()
    yield


async def audit_ctx(app: web.Application) -> AsyncIterator[None]:
    yield
    audit_log = app[audit.AUDIT]
    if audit_log is not None:
        audit_log.close()


async def batcher_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    # --workers forward passes at once, each with --threads intra-op threads: workers x threads = about the CPU cores.
    app[EXECUTOR] = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="forward")
    app[BATCHER] = batcher = BatchQueue(
        model_name=config.model,
        max_batch_size=config.max_batch_size,
        max_delay_s=config.max_batch_delay_ms / 1000,
        max_queue=config.max_queue,
        executor=app[EXECUTOR],
        workers=config.workers,
        metrics=app[METRICS],
        tenant_weights=dict(config.tenant_weights),
    )
    task = asyncio.create_task(batcher.run_forever(), name="batcher")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    app[EXECUTOR].shutdown(wait=True, cancel_futures=True)


async def scale_signal_ctx(app: web.Application) -> AsyncIterator[None]:
    """Keep `warmpod_scale_factor` current: this replica's demand over its capacity at the SLO (warmpod.pods.policy)."""
    config, metrics = app[CONFIG], app[METRICS]
    metrics.workers.set(config.workers)
    policy = PolicyConfig(slo_target_s=config.slo_target_s, slo_quantile=config.slo_quantile)
    task = asyncio.create_task(update_scale_factor(metrics, policy, config.signal_window_s), name="scale signal")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def update_scale_factor(metrics: ServerMetrics, policy: PolicyConfig, window_s: float) -> None:
    """Every few seconds: snapshot our own metrics, compare with the snapshot one window ago, set the gauge."""
    history: collections.deque[Snapshot] = collections.deque()
    interval = max(0.5, window_s / 10)
    while True:
        now = time.monotonic()
        history.append(snapshot_from_families(metrics.registry.collect(), now))  # no exposition text in between
        while len(history) > 2 and history[1].at <= now - window_s:
            history.popleft()
        if len(history) > 1:
            metrics.scale_factor.set(pod_scale_factor(sample_between("self", history[0], history[-1]), policy))
        await asyncio.sleep(interval)


async def model_ctx(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(serve_model(app), name="model")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    state = app[STATE]
    if state.model is not None:
        state.model.close()
        state.model = None


async def serve_model(app: web.Application) -> None:
    """Run the model task (put the model in place, report ready, keep it current).

    A model that cannot be served (a WarmpodError: ModelError, a broken store version, an engine that cannot start)
    stops the process with the error's exit code (5) and the reason; anything unexpected with exit 1 and the error,
    rather than leaving it "not ready" forever.
    """
    try:
        await follow_source(app)
    except asyncio.CancelledError:
        raise
    except WarmpodError as e:
        app[STATE].stop(e.exit_code, str(e))
    except Exception as e:
        log.exception("the model task failed")
        app[STATE].stop(1, f"serving {app[CONFIG].model!r} failed: {type(e).__name__}: {e}")


async def follow_source(app: web.Application) -> None:
    """Wait for the source's first version, serve it, swap each newer version in."""
    config, state, source = app[CONFIG], app[STATE], app[SOURCE]
    # Prepare (the torch import) while the loader may still be streaming: it overlaps the wait, not the cold start.
    prepared = asyncio.create_task(asyncio.to_thread(source.prepare), name="prepare")
    seen = await wait_published(config, source)
    await prepared
    mark_ready(app, await load_timed(app, lambda: source.load(seen)))
    while True:
        await asyncio.sleep(config.poll_interval_s)
        if state.draining:
            continue
        version = await asyncio.to_thread(source.latest)
        if version is not None and version != seen:
            seen = version
            await swap(app, version)


async def wait_published(config: ServerConfig, source: ModelSource) -> str:
    logged = -1e9
    while (version := await asyncio.to_thread(source.latest)) is None:
        if time.monotonic() - logged > 30:
            log.info("waiting for the loader to publish %s in %s", config.model, config.store)
            logged = time.monotonic()
        await asyncio.sleep(config.poll_interval_s)
    return version


def mark_ready(app: web.Application, model: ServedModel) -> None:
    """Serve `model` from now on and report ready, with the process's cold start (start → ready)."""
    config, state, metrics = app[CONFIG], app[STATE], app[METRICS]
    state.model = model
    cold = time.time() - config.process_start
    metrics.cold_start_seconds.labels(config.model).set(cold)
    metrics.ready.set(0 if state.draining else 1)
    log.info("ready: model %s version %s (%s), cold start %.2f s", config.model, model.version, model.family, cold)


async def load_timed(app: web.Application, make: Callable[[], ServedModel]) -> ServedModel:
    """Make a model on a thread (off the event loop), recording its load time, failures and version."""
    config, metrics = app[CONFIG], app[METRICS]
    started = time.monotonic()
    try:
        model = await asyncio.to_thread(make)
    except WarmpodError:
        metrics.model_load_failures.labels(config.model).inc()
        raise
    metrics.model_load_seconds.labels(config.model).observe(time.monotonic() - started)
    metrics.model_version.labels(config.model, model.version, model.family).set(1)
    precision = model.precision
    if precision is not None:
        metrics.weights_info.labels(config.model, model.version, precision.stored, precision.computed).set(1)
        metrics.private_weights_bytes.labels(config.model).set(precision.private_bytes)
        level = logging.WARNING if precision.upcast else logging.INFO
        log.log(level, "model %s version %s: %s", config.model, model.version, precision.describe())
    return model


async def swap(app: web.Application, version: str) -> None:
    """Build the newly published version beside the old one, switch between batches, then release the old one."""
    config, state, batcher, source = app[CONFIG], app[STATE], app[BATCHER], app[SOURCE]
    try:
        new = await load_timed(app, lambda: source.load(version))
    except WarmpodError as e:
        log.error("version %s of %s cannot be served, keeping version %s: %s", version, config.model,
                  state.model.version if state.model else "-", e)  # fmt: skip
        return
    old, state.model = state.model, new  # requests prepared from now on run on the new model
    log.info("swapped %s: version %s -> %s", config.model, old.version if old else "-", new.version)
    if old is None:
        return
    app[METRICS].model_version.labels(config.model, old.version, old.family).set(0)
    if old.precision is not None:
        app[METRICS].weights_info.labels(config.model, old.version, old.precision.stored, old.precision.computed).set(0)
    deadline = time.monotonic() + config.request_timeout_s
    while batcher.busy_with(old) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    old.close()
    del old
    gc.collect()  # unmap the old version now, not at some later collection


async def drain(app: web.Application) -> None:
    """Readiness false at once, new requests 503; queued and in-flight requests finish (up to the grace period)."""
    state, config = app[STATE], app[CONFIG]
    if state.draining:
        return
    state.draining = True
    app[METRICS].ready.set(0)
    log.info("draining: %d request(s) in flight, grace period %.0f s", state.inflight, config.drain_grace_s)
    deadline = time.monotonic() + config.drain_grace_s
    while (state.inflight or not app[BATCHER].idle()) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    if state.inflight:
        log.warning("grace period over with %d request(s) still in flight", state.inflight)
    state.stop(0)


# ------------------------------------------------------------------------------------------ middleware


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def errors_and_metrics(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one place errors become responses: `{"error": ...}` (OpenAI's shape on /v1); inference routes measured."""
    route = request.match_info.route.name
    measured = route is not None and route.startswith(INFERENCE_ROUTES)
    app = request.app
    config, metrics, state = app[CONFIG], app[METRICS], app[STATE]
    started = time.monotonic()
    if measured:
        state.inflight += 1
        metrics.inflight.labels(config.model).inc()
    try:
        response = await _handle(request, handler)
    finally:
        if measured:
            state.inflight -= 1
            metrics.inflight.labels(config.model).dec()
    if measured:
        endpoint = "embeddings" if route == "embeddings" else "infer"
        code = str(response.status)
        elapsed = time.monotonic() - started
        metrics.request_seconds.labels(config.model, endpoint, code).observe(elapsed)
        if response.status < 300:
            metrics.last_inference.labels(config.model).set_to_current_time()
        reason = response.get(REJECTED)
        if reason:
            metrics.rejected.labels(config.model, reason).inc()
        metrics.observe_tenant(tenant_of(request), config.model, response.status, elapsed, reason)
    return response


async def _handle(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ServerError as e:
        return error_response(request, e)
    except web.HTTPMethodNotAllowed as e:
        allowed = ", ".join(sorted(e.allowed_methods))
        err = ServerError(f"method {e.method} is not allowed on {request.path}; use {allowed}")
        err.status = 405
        response = error_response(request, err)
        response.headers["Allow"] = allowed
        return response
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[CONFIG].max_body_bytes
        return error_response(
            request,
            PayloadTooLarge(
                f"request body larger than the server's limit of {limit} bytes: send fewer rows per request, "
                "or raise the limit with --max-body-bytes"
            ),
        )
    except web.HTTPException as e:
        if e.status < 400:
            raise
        err = NotFound(f"no route {request.method} {request.path}") if e.status == 404 else ServerError(e.reason)
        err.status = e.status
        return error_response(request, err)
    except Exception as e:
        log.exception("unexpected error on %s %s", request.method, request.path)
        return error_response(request, ServerError(f"internal error: {type(e).__name__}: {e}"))


def error_response(request: web.Request, error: ServerError) -> web.Response:
    headers = {}
    if isinstance(error, Unavailable | TooManyRequests):
        headers["Retry-After"] = str(error.retry_after_s)
    if isinstance(error, Unauthorized):
        headers["WWW-Authenticate"] = error.challenge
    if request.path.startswith("/v1/"):
        kind = "invalid_request_error" if error.status < 500 else "server_error"
        body = openai_api.openai_error_body(str(error), kind, error.reason)
    else:
        body = v2.error_body(str(error))
    response = web.Response(status=error.status, body=body, content_type="application/json", headers=headers)
    response[REJECTED] = error.reason
    return response


# ------------------------------------------------------------------------------------------ handlers


def _json(payload: Any, status: int = 200) -> web.Response:
    return web.json_response(payload, status=status)


async def live(request: web.Request) -> web.Response:
    return _json({"live": True})


async def ready(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return _json({"ready": state.ready}, status=200 if state.ready else 503)


async def server_metadata(request: web.Request) -> web.Response:
    return _json({"name": "warmpod", "version": __version__, "extensions": list(EXTENSIONS)})


def served_model(request: web.Request, name: str | None = None) -> ServedModel:
    """The model a request names — the route's {model}[/versions/{version}], or `name` (the OpenAI `model`
    field): 404 if unknown, 503 if not ready yet."""
    config, state = request.app[CONFIG], request.app[STATE]
    name = request.match_info["model"] if name is None else name
    if name != config.model:
        raise NotFound(f"unknown model {name!r}; this server serves {config.model!r}")
    model = state.model
    if model is None:
        raise Unavailable(f"model {name!r} is not ready yet (waiting for the loader)", reason="not_ready")
    version = request.match_info.get("version")
    if version is not None and version != model.version:
        raise NotFound(f"model {name!r} has no version {version!r} being served; the served version is {model.version}")
    return model


async def model_metadata(request: web.Request) -> web.Response:
    return _json(served_model(request).metadata())


async def model_ready(request: web.Request) -> web.Response:
    try:
        served_model(request)
    except Unavailable:
        return _json({"name": request.match_info["model"], "ready": False}, status=503)
    state = request.app[STATE]
    return _json({"name": request.match_info["model"], "ready": state.ready}, status=200 if state.ready else 503)


def deadline_for(request: web.Request, parameters: dict[str, Any] | None = None) -> float:
    """Arrival + the server's request timeout, or less when the request asks (V2 `parameters.timeout`, in µs)."""
    timeout = request.app[CONFIG].request_timeout_s
    asked = (parameters or {}).get("timeout")
    if asked is not None:
        if not isinstance(asked, int) or isinstance(asked, bool) or asked <= 0:
            raise BadRequest(f"parameters.timeout must be a positive integer of microseconds, got {asked!r}")
        timeout = min(timeout, asked / 1e6)
    return time.monotonic() + timeout


def request_limits(request: web.Request) -> RequestLimits:
    config = request.app[CONFIG]
    return RequestLimits(max_rows=config.max_request_rows, max_tokens=config.max_request_tokens)


def check_quota(request: web.Request, rows: int) -> None:
    """The tenant's rate limits (--tenant-quota): 429 with Retry-After, before any tokenizing or forward pass."""
    refusal = request.app[QUOTAS].check(tenant_of(request), rows, time.monotonic())
    if refusal is not None:
        raise TooManyRequests(refusal.message(), retry_after_s=refusal.retry_after_s)


def refuse_while_draining(request: web.Request) -> None:
    if request.app[STATE].draining:
        raise Unavailable("the server is draining (shutting down); retry on another replica", reason="draining")


async def infer(request: web.Request) -> web.Response:
    refuse_while_draining(request)
    model = served_model(request)
    header_length = v2.parse_header_length(request.headers.get("Inference-Header-Content-Length"))
    body = await request.read()
    req = v2.parse_infer_request(body, header_length)
    deadline = deadline_for(request, req.parameters)
    limits = request_limits(request)
    rows = request_rows(req.inputs)
    audit.note(request, rows=rows)
    limits.check_rows(rows)  # before any tokenizing or forward pass
    check_quota(request, rows)
    prepared = model.prepare(req.inputs)
    limits.check_tokens(prepared.tokens)
    selected = v2.select_outputs(req, [s.name for s in model.outputs])
    outputs = await request.app[BATCHER].submit(prepared, deadline, tenant_of(request))
    runner = prepared.model or model  # after a hot swap the request still reports the version that ran it
    audit.note(request, version=runner.version)
    specs = {s.name: s for s in runner.outputs}
    tensors = [(Tensor(n, specs[n].datatype, outputs[n].shape, outputs[n]), binary) for n, binary in selected]
    try:
        payload, json_length = v2.encode_infer_response(runner.name, runner.version, req.id, tensors)
    except ValueError as e:  # NaN/Inf or non-UTF-8 bytes cannot be JSON: the message says to ask for binary_data
        raise BadRequest(str(e)) from None
    if json_length is None:
        return web.Response(body=payload, content_type="application/json")
    headers = {"Inference-Header-Content-Length": str(json_length)}
    return web.Response(body=payload, content_type="application/octet-stream", headers=headers)


async def embeddings(request: web.Request) -> web.Response:
    refuse_while_draining(request)
    req = openai_api.parse_embeddings_request(await request.read())
    audit.note(request, model=req.model, rows=len(req.texts))
    model = served_model(request, req.model)
    limits = request_limits(request)
    limits.check_rows(len(req.texts))
    check_quota(request, len(req.texts))
    prepared = model.prepare_texts(req.texts)  # a model that takes no text says so here (400)
    limits.check_tokens(prepared.tokens)
    openai_api.check_dimensions(req.dimensions, model.outputs[0].shape[-1])
    vectors = (await request.app[BATCHER].submit(prepared, deadline_for(request), tenant_of(request)))["embedding"]
    audit.note(request, version=(prepared.model or model).version)
    payload = openai_api.encode_embeddings_response(model.name, vectors, req.encoding_format, prepared.tokens)
    return web.Response(body=payload, content_type="application/json")


async def openai_models(request: web.Request) -> web.Response:
    config, state = request.app[CONFIG], request.app[STATE]
    data = [openai_api.model_object(config.model, config.process_start)]
    return _json({"object": "list", "data": data if state.model is not None else []})


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


# ------------------------------------------------------------------------------------------ protocol extensions


async def model_config(request: web.Request) -> web.Response:
    """Triton's model configuration extension: the model and the server's batching flags in Triton's form."""
    model, config = served_model(request), request.app[CONFIG]
    scheduling = v2.Scheduling(
        max_batch_size=config.max_batch_size,
        max_queue_delay_us=round(config.max_batch_delay_ms * 1000),
        max_queue_size=config.max_queue,
        timeout_us=round(config.request_timeout_s * 1e6),
        instances=config.workers,
    )
    return _json(v2.model_config(model.name, model.metadata()["platform"], model.inputs, model.outputs, scheduling))


async def model_stats(request: web.Request) -> web.Response:
    """Triton's statistics extension, from the counters /metrics shows: one model's (a version: the one served), or
    every model's (/v2/models/stats: the one this server serves, once it is loaded). Counts are this process's."""
    app = request.app
    loaded = app[STATE].model
    models = [served_model(request)] if "model" in request.match_info else [loaded] if loaded is not None else []
    totals = model_totals(app[METRICS].registry.collect(), app[CONFIG].model)
    return _json({"model_stats": [v2.model_statistics(m.name, m.version, totals) for m in models]})


async def repository_index(request: web.Request) -> web.Response:
    """Triton's repository index (POST, an empty body or `{"ready": true}`): the one model this server serves."""
    ready_only = v2.parse_repository_index_request(await request.read())
    config, state = request.app[CONFIG], request.app[STATE]
    model = state.model
    version = model.version if model is not None else None
    if state.draining:
        entry = v2.repository_entry(config.model, version, "UNLOADING", "the server is draining")
    elif model is None:
        entry = v2.repository_entry(config.model, None, "LOADING", "waiting for the loader to publish the model")
    else:
        entry = v2.repository_entry(config.model, version, "READY")
    return _json([entry] if state.ready or not ready_only else [])


async def openai_model(request: web.Request) -> web.Response:
    """OpenAI's GET /v1/models/{id}: the model object; 404 (code model_not_found) for a model not served here."""
    try:
        model = served_model(request)
    except NotFound as e:
        e.reason = "model_not_found"  # OpenAI's code for it
        raise
    return _json(openai_api.model_object(model.name, request.app[CONFIG].process_start))


async def openapi_document(request: web.Request) -> web.Response:
    return _json(request.app[OPENAPI])
