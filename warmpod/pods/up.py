"""`warmpod up`: stage a model with the loader, serve it with `warmpod serve` workers sharing one port, and scale
them on a latency SLO (the policy in `warmpod.pods.policy`, applied by `warmpod.pods.supervisor`). Ctrl-C drains and
stops all.

Exit codes: 0 stopped by Ctrl-C/SIGTERM; 2 usage (bad flags, invalid policy settings, the port taken); otherwise the
code of the loader, or of a worker that could not start (see `warmpod load` and `warmpod serve`). The source is
resolved as the loader resolves it before anything starts: a missing one is exit 3 with no worker started.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from warmpod.cliargs import positive, quantile
from warmpod.errors import UsageError
from warmpod.loader.convert import CHOICES, target_dtype
from warmpod.pods.policy import PolicyConfig, PolicyError
from warmpod.server.auth import exposure_problem
from warmpod.server.cli import build_parser as serve_parser
from warmpod.store import DEFAULT_ROOT

if TYPE_CHECKING:
    from warmpod.pods.supervisor import UpConfig

# The policy's setting → this command's flag, so its messages name what the user typed (PolicyError.render).
FLAGS = {
    "slo_quantile": "--slo-quantile",
    "min_replicas": "--min-replicas",
    "max_replicas": "--max-replicas",
    "stable_window_s": "--stable-window",
    "panic_window_s": "--panic-window",
    "scale_down_window_s": "--scale-down-window",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="warmpod up",
        usage="warmpod up SOURCE --model NAME [options] [-- warmpod serve options]",
        description="Stage a model (warmpod load), serve it with warmpod serve workers sharing one port "
        "(SO_REUSEPORT), and scale the workers on a latency SLO. Ctrl-C drains and stops everything.",
        epilog="Arguments after -- go to every worker's `warmpod serve`, e.g. -- --workers 2 --max-batch-size 16.",
    )
    p.add_argument(
        "source",
        metavar="SOURCE",
        help="what `warmpod load` stages: a local path, s3://, gs://, az:// or http(s):// URL",
    )
    p.add_argument("--model", required=True, metavar="NAME", help="model name in the store")
    p.add_argument(
        "--store",
        type=Path,
        metavar="DIR",
        default=Path(os.environ.get("WARMPOD_STORE", DEFAULT_ROOT)),
        help=f"store root (default $WARMPOD_STORE or {DEFAULT_ROOT})",
    )
    p.add_argument("--host", default="127.0.0.1", metavar="ADDR", help="address the workers bind (default 127.0.0.1)")
    p.add_argument(
        "--port", type=int, default=8080, metavar="P", help="the port the workers share (default 8080; 0 picks one)"
    )
    p.add_argument("--min-replicas", type=positive(int), default=1, metavar="N", help="fewest workers (default 1)")
    cpus = os.cpu_count() or 1
    p.add_argument(
        "--max-replicas",
        type=positive(int),
        default=cpus,
        metavar="N",
        help=f"most workers (default: the CPU count, {cpus})",
    )
    p.add_argument(
        "--slo-target-ms",
        type=positive(float, 0.001),
        default=100.0,
        metavar="MS",
        help="latency target at the quantile (default 100)",
    )
    p.add_argument(
        "--slo-quantile", type=quantile, default=0.95, metavar="Q", help="the SLO's quantile, in (0, 1) (default 0.95)"
    )
    p.add_argument(
        "--interval",
        type=positive(float, 0.001),
        default=1.0,
        metavar="SECONDS",
        help="seconds between scrapes and decisions (default 1: a spike fills queues in about a second)",
    )
    p.add_argument(
        "--stable-window", type=positive(float, 0), default=60.0, metavar="SECONDS", help="demand averaged over (60)"
    )
    p.add_argument(
        "--panic-window", type=positive(float, 0), default=6.0, metavar="SECONDS", help="bursts averaged over (6)"
    )
    p.add_argument(
        "--scale-down-window",
        type=positive(float, 0),
        default=300.0,
        metavar="SECONDS",
        help="scale down to the highest need of the last (300 s)",
    )
    p.add_argument(
        "--watch",
        type=positive(float, 0.001),
        metavar="SECONDS",
        help="keep the loader running: poll the source every SECONDS",
    )
    p.add_argument(
        "--dtype",
        choices=CHOICES,
        help="the loader's --dtype: stage floating-point tensors as bf16 (half the memory, faster on CPU); "
        "fp16 is refused (slower than fp32 on CPU). Default: as the source has them",
    )
    p.add_argument(
        "--status-port",
        type=int,
        default=0,
        metavar="P",
        help="GET /status and the fleet's /metrics on 127.0.0.1:P (default 0: picks one)",
    )
    return p


def policy_from_args(args: argparse.Namespace) -> PolicyConfig:
    """The policy's settings from the flags (each already valid alone: argparse checked it); UsageError naming the
    flags when they do not go together."""
    try:
        return PolicyConfig(
            slo_quantile=args.slo_quantile,
            slo_target_s=args.slo_target_ms / 1000,
            min_replicas=args.min_replicas,
            max_replicas=args.max_replicas,
            stable_window_s=args.stable_window,
            panic_window_s=args.panic_window,
            scale_down_window_s=args.scale_down_window,
        )
    except PolicyError as e:
        raise UsageError(e.render(FLAGS)) from None


def config_from_args(args: argparse.Namespace, serve_args: Sequence[str]) -> UpConfig:
    policy = policy_from_args(args)
    for name, port in (("--port", args.port), ("--status-port", args.status_port)):
        if not 0 <= port <= 65535:
            raise UsageError(f"{name} must be a port number (0 to 65535), got {port}")
    from warmpod.pods.supervisor import UpConfig
    from warmpod.store import check_model_name

    if args.dtype is not None:  # refused here (fp16) rather than by the loader once the supervisor runs
        target_dtype(args.dtype)

    config = UpConfig(
        source=args.source,
        model=args.model,
        store=args.store,
        policy=policy,
        host=args.host,
        port=args.port,
        interval_s=args.interval,
        watch_s=args.watch,
        dtype=args.dtype,
        status_port=args.status_port,
        flags=FLAGS,
    )
    own = {arg for arg in config.own_serve_args(config.port) if arg.startswith("--")}
    for arg in serve_args:
        if arg.split("=", 1)[0] in own:
            raise UsageError(f"{arg.split('=', 1)[0]} is set by warmpod up: give it before --, to warmpod up itself")
    check_model_name(args.model)
    # No abbreviations: the worker would read `--po 9000` as `--port 9000`, overriding the port warmpod up sets.
    parser = serve_parser(allow_abbrev=False)
    parser.prog, parser.usage = "warmpod up", "warmpod up SOURCE --model NAME [options] -- [warmpod serve options]"
    serve = parser.parse_args(["--model", args.model, "--store", str(args.store), *serve_args])  # exit 2 if bad
    door = serve.api_key_file is not None or serve.tls_client_ca is not None
    problem = exposure_problem(args.host, None, door=door, allow_unauthenticated=serve.allow_unauthenticated)
    if problem is not None:  # before anything starts, rather than from every worker
        raise UsageError(f"{problem} (after --, for the workers)")
    return replace(config, serve_args=tuple(serve_args), drain_grace_s=serve.drain_grace)


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    split = args_list.index("--") if "--" in args_list else len(args_list)
    args = build_parser().parse_args(args_list[:split])
    try:
        config = config_from_args(args, args_list[split + 1 :])
    except UsageError as e:
        print(f"warmpod up: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from warmpod.pods.supervisor import Supervisor

    try:
        return asyncio.run(Supervisor(config).run())
    except KeyboardInterrupt:  # before the supervisor's own handler was installed
        return 0
