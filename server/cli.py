"""`warmpod serve`: the inference server's command line (flags → ServerConfig → aiohttp on one port, signals)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from warmpod.cliargs import positive, quantile, size_arg
from warmpod.pods.lines import LISTENING_LINE_FORMAT, METRICS_LINE_FORMAT
from warmpod.server.app import ServerConfig, process_start_time
from warmpod.server.limits import DEFAULT_MAX_ROWS, DEFAULT_MAX_TOKENS
from warmpod.server.quotas import QuotaSpec, parse_quota, parse_weight
from warmpod.store import DEFAULT_ROOT

if TYPE_CHECKING:
    from aiohttp import web

    from warmpod.server.source import ModelSource

log = logging.getLogger("warmpod.server")


def build_parser(*, allow_abbrev: bool = True) -> argparse.ArgumentParser:
    """`warmpod serve`'s flags; `allow_abbrev=False` for `warmpod up`, which must see every flag spelled out."""
    p = argparse.ArgumentParser(
        prog="warmpod serve",
        description="Serve a staged model over Open Inference Protocol v2 (and OpenAI /v1/embeddings).",
        allow_abbrev=allow_abbrev,
    )
    p.add_argument("--model", required=True, help="model name in the store (as given to `warmpod load --model`)")
    p.add_argument(
        "--store",
        type=Path,
        default=Path(os.environ.get("WARMPOD_STORE", DEFAULT_ROOT)),
        help=f"store root (default $WARMPOD_STORE or {DEFAULT_ROOT})",
    )
    add_serving_arguments(p, default_port=8080)
    p.add_argument("--threads", type=positive(int), default=1, help="torch intra-op threads per forward (default 1)")
    p.add_argument("--factory", help="serve any nn.Module: package.module:function (receives config.json's dict)")
    return p


def add_serving_arguments(p: argparse.ArgumentParser, *, default_port: int) -> None:
    """The flags `warmpod serve` and `warmpod edge serve` share: address, batching, limits, drain."""
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 in a pod)")
    p.add_argument(
        "--port",
        type=positive(int, 0),
        default=default_port,
        help=f"port (default {default_port}; 0 picks a free one)",
    )
    p.add_argument("--max-batch-size", type=positive(int), default=32, help="rows per forward pass (default 32)")
    p.add_argument(
        "--max-batch-delay-ms",
        type=positive(float, 0),
        default=2.0,
        help="how long a batch waits for more requests after its first one arrives (default 2 ms)",
    )
    p.add_argument("--max-queue", type=positive(int), default=256, help="requests waiting before 503s (default 256)")
    p.add_argument(
        "--workers", type=positive(int), default=1, help="forward passes that run at once, on threads (default 1)"
    )
    p.add_argument("--max-body-bytes", type=size_arg, default=32 << 20, help="request body limit (default 32MiB)")
    p.add_argument(
        "--max-request-rows", type=positive(int), default=DEFAULT_MAX_ROWS,
        help=f"rows (texts, or V2 tensor rows) one request may have; more is 413 (default {DEFAULT_MAX_ROWS}, "
        "OpenAI's embeddings limit). A request larger than --max-batch-size runs in chunks of that many rows",
    )  # fmt: skip
    p.add_argument(
        "--max-request-tokens", type=positive(int), default=DEFAULT_MAX_TOKENS,
        help=f"tokens one request's texts may have in total; more is 413 (default {DEFAULT_MAX_TOKENS}, OpenAI's)",
    )  # fmt: skip
    p.add_argument(
        "--request-timeout", type=positive(float, 0.001), default=30.0, help="per-request deadline, seconds (30)"
    )
    p.add_argument(
        "--drain-grace", type=positive(float, 0), default=25.0, help="seconds to finish requests on SIGTERM (25)"
    )
    p.add_argument(
        "--no-truncate",
        dest="truncate",
        action="store_false",
        default=None,
        help="text longer than the model's limit → 400, instead of truncating as the model's files say",
    )
    p.add_argument("--reuse-port", action="store_true", help="SO_REUSEPORT: several servers share one port")
    p.add_argument(
        "--slo-target-ms", type=positive(float, 0.001), default=100.0,
        help="latency SLO target for the warmpod_scale_factor gauge (default 100 ms)",
    )  # fmt: skip
    p.add_argument(
        "--slo-quantile", type=quantile, default=0.95, help="the SLO's latency quantile, in (0, 1) (default 0.95)"
    )
    p.add_argument(
        "--signal-window", type=positive(float, 1), default=30.0,
        help="seconds of traffic the warmpod_scale_factor gauge looks back over (default 30)",
    )  # fmt: skip
    p.add_argument(
        "--tls-cert", type=Path, metavar="PEM",
        help="serve HTTPS on --host:--port with this certificate (PEM, its chain after it; needs --tls-key). Re-read "
        "when it changes (a rotated Secret or podCertificate volume): new handshakes present the new one, open "
        "connections are left alone. --metrics-port stays plain HTTP",
    )  # fmt: skip
    p.add_argument("--tls-key", type=Path, metavar="PEM", help="the certificate's private key (PEM, unencrypted)")
    p.add_argument(
        "--metrics-port", type=positive(int, 0), metavar="P",
        help="also serve on --metrics-host:P, a port of this process alone (0 picks one), plain HTTP: health and "
        "/metrics without a key (Prometheus, a supervisor; a shared --reuse-port port reaches any of the servers). "
        "Other routes there need the same credential as on --port. With --reuse-port, the shared port is joined only "
        "once the model is ready and left first on SIGTERM, so the other servers take new connections",
    )  # fmt: skip
    p.add_argument(
        "--metrics-host", default="127.0.0.1", metavar="ADDR",
        help="address the --metrics-port site binds (default 127.0.0.1; 0.0.0.0 in a pod scraped by Prometheus)",
    )  # fmt: skip
    p.add_argument(
        "--api-key-file", type=Path, metavar="PATH",
        help="require an API key: 'Authorization: Bearer KEY' with a key of this file, one TENANT:KEY per line "
        "(# comments; several keys per tenant for an overlapping rotation). Re-read when it changes (a rotated "
        "Secret), no restart. The health routes stay open; see docs/security.md",
    )  # fmt: skip
    p.add_argument(
        "--allow-unauthenticated", action="store_true",
        help="serve without a key or client certificate on a --host (or --metrics-host) other than loopback, "
        "which is refused otherwise",
    )  # fmt: skip
    p.add_argument(
        "--audit-log", metavar="PATH",
        help="append one JSON line per inference request (and per request refused for its credential): time, "
        "request id, tenant, model, version, route, rows, status, latency; '-' for stderr. Never a key or a body",
    )  # fmt: skip
    p.add_argument(
        "--tls-client-ca", type=Path, metavar="PEM",
        help="mutual TLS: require a client certificate signed by one of these CAs (PEM); its subject's common name "
        "is the request's tenant",
    )  # fmt: skip
    p.add_argument(
        "--tenant-weight", type=tenant_weight, action=TenantSpecs, default=(), metavar="TENANT=W",
        help="the tenant's weight in the fair queue (repeatable; default 1 each): tenants that wait get rows in "
        "proportion to their weights, and a full queue is shared in that proportion",
    )  # fmt: skip
    p.add_argument(
        "--tenant-quota", type=tenant_quota, action=TenantSpecs, default=(), metavar="SPEC",
        help="rate limits of a tenant, TENANT:requests=R,rows=N per second (either or both; repeatable; '*' for "
        "every tenant without its own line): over them is 429 with Retry-After. Per server process",
    )  # fmt: skip


def tenant_weight(text: str) -> tuple[str, float]:
    """`--tenant-weight TENANT=W` as an argparse type (a bad one is a usage error that says why)."""
    try:
        return parse_weight(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def tenant_quota(text: str) -> QuotaSpec:
    """`--tenant-quota TENANT:requests=R,rows=N` as an argparse type."""
    try:
        return parse_quota(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class TenantSpecs(argparse.Action):
    """A repeatable per-tenant flag: collects its values, refusing a second one for the same tenant (exit 2)."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, value: Any, option: str | None = None
    ) -> None:
        specs = tuple(getattr(namespace, self.dest) or ())
        tenant = value.tenant if isinstance(value, QuotaSpec) else value[0]
        if any((s.tenant if isinstance(s, QuotaSpec) else s[0]) == tenant for s in specs):
            parser.error(f"argument {option}: tenant {tenant!r} is given twice; give each tenant one {option}")
        setattr(namespace, self.dest, (*specs, value))


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    return serving_config(args, model=args.model, store=args.store, threads=args.threads, factory=args.factory)


def serving_config(args: argparse.Namespace, **fields: Any) -> ServerConfig:
    """A ServerConfig from the shared serving flags (add_serving_arguments), plus the caller's own fields."""
    return ServerConfig(
        host=args.host,
        port=args.port,
        max_batch_size=args.max_batch_size,
        max_batch_delay_ms=args.max_batch_delay_ms,
        max_queue=args.max_queue,
        workers=args.workers,
        max_body_bytes=args.max_body_bytes,
        max_request_rows=args.max_request_rows,
        max_request_tokens=args.max_request_tokens,
        request_timeout_s=args.request_timeout,
        drain_grace_s=args.drain_grace,
        truncate=args.truncate,
        slo_target_s=args.slo_target_ms / 1000,
        slo_quantile=args.slo_quantile,
        signal_window_s=args.signal_window,
        process_start=process_start_time(),
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        api_key_file=args.api_key_file,
        allow_unauthenticated=args.allow_unauthenticated,
        audit_log=args.audit_log,
        metrics_host=args.metrics_host,
        tenant_weights=tuple(args.tenant_weight),
        tenant_quotas=tuple(args.tenant_quota),
        **fields,
    )


async def serve(
    config: ServerConfig,
    *,
    reuse_port: bool = False,
    metrics_port: int | None = None,
    source: ModelSource | None = None,
    prog: str = "warmpod serve",
    description: str = "",
) -> int:
    """Run until SIGTERM/SIGINT (drain, exit 0) or a model that cannot be served (exit 5).

    With `metrics_port`, the same app is also served on config.metrics_host:metrics_port (the door leaves health
    and /metrics open there, warmpod.server.auth). With `reuse_port` as well (one
    server of several on a shared port, as `warmpod up` runs them), the shared port is joined only once the model is
    ready and left first on SIGTERM: a server still starting or draining never takes a new connection there.
    """
    from aiohttp import web

    from warmpod.errors import UsageError
    from warmpod.server.app import METRICS, STATE, create_app, drain
    from warmpod.server.audit import AuditLog
    from warmpod.server.auth import Door, exposure_problem
    from warmpod.server.tls import ServerTls, TlsError, tls_files

    try:  # before anything starts: bad certificate files, key file or audit log are usage errors (exit 2)
        files = tls_files(config.tls_cert, config.tls_key, config.tls_client_ca)
        tls = ServerTls.load(files) if files is not None else None
        door = Door.load(config.api_key_file, mutual_tls=config.tls_client_ca is not None)
        problem = exposure_problem(config.host, config.metrics_host if metrics_port is not None else None,
                                   door=door.closed, allow_unauthenticated=config.allow_unauthenticated)  # fmt: skip
        if problem is not None:
            raise UsageError(problem)
        audit_log = AuditLog.open(config.audit_log) if config.audit_log is not None else None
    except (TlsError, UsageError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return 2
    app = create_app(config, source=source, door=door, audit_log=audit_log)
    if tls is not None:
        tls.attach(app[METRICS].registry)
        log.info("%s", tls.describe())
    # handler_cancellation: a client that disconnects cancels its handler, and with it the request's chunks that have
    # not started (the batcher drops them), instead of computing answers nobody reads.
    runner = web.AppRunner(app, handle_signals=False, access_log=None, handler_cancellation=True)
    await runner.setup()
    handoff = reuse_port and metrics_port is not None
    public: web.TCPSite | None = None  # the --host:--port site, once listening
    watcher = asyncio.create_task(tls.watch(), name="tls reload") if tls is not None else None
    try:
        if metrics_port is not None:
            private = web.TCPSite(runner, config.metrics_host, metrics_port)
            if not await _listen(private, prog, config.metrics_host, metrics_port):
                return 2
            port = runner.addresses[-1][1]
            door.metrics_ports.add(port)
            print(f"{prog}: {METRICS_LINE_FORMAT.format(host=config.metrics_host, port=port)}", file=sys.stderr,
                  flush=True)  # fmt: skip
        state = app[STATE]
        left = False  # the shared port was left (handoff)

        async def leave_then_drain() -> None:
            nonlocal left
            if handoff and not left:
                left = True
                if public is not None:
                    await public.stop()  # the kernel sends new connections on the shared port to the other servers
                    # Connections accepted just before still send their request: serve it rather than refuse it.
                    await asyncio.sleep(HANDOFF_S)
            await drain(app)

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(leave_then_drain()))
        if handoff:
            while not state.ready and not state.exit_code.done():
                await asyncio.sleep(0.02)
        if not state.exit_code.done():
            site = web.TCPSite(runner, config.host, config.port, reuse_port=reuse_port or None,
                               ssl_context=tls.context if tls is not None else None)  # fmt: skip
            if not await _listen(site, prog, config.host, config.port):
                return 2
            public = site
            host, port = runner.addresses[-1][:2]
            what = description or f"model {config.model}, store {config.store}"
            scheme = "https" if tls is not None else "http"
            print(
                f"{prog}: {LISTENING_LINE_FORMAT.format(scheme=scheme, host=host, port=port, what=what)}",
                file=sys.stderr,
                flush=True,
            )
            if left:  # a signal came while it was joining
                await public.stop()
        code = await state.exit_code
        # Stop accepting first, then give connections accepted in the meantime a moment to get their answer (503
        # while draining) before the runner closes every connection.
        if public is not None and not left:
            await public.stop()
        await asyncio.sleep(0.2)
        if state.fatal:
            print(f"{prog}: error: {state.fatal}", file=sys.stderr, flush=True)
        return code
    finally:
        if watcher is not None:
            watcher.cancel()
        await runner.cleanup()


HANDOFF_S = 0.2  # after leaving a shared port: how long requests on connections accepted just before may arrive


async def _listen(site: web.BaseSite, prog: str, host: str, port: int) -> bool:
    try:
        await site.start()
    except OSError as e:
        print(f"{prog}: error: cannot listen on {host}:{port}: {e.strerror}", file=sys.stderr)
        return False
    return True


def main(argv: Sequence[str] | None = None, *, source: Callable[[ServerConfig], ModelSource] | None = None) -> int:
    """`warmpod serve`. `source` makes the model source from the config (default: the store; a benchmark's
    baseline passes its own)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    config = config_from_args(args)
    made = source(config) if source is not None else None
    return asyncio.run(serve(config, reuse_port=args.reuse_port, metrics_port=args.metrics_port, source=made))
