"""`warmpod edge compile` (a model → an edge bundle) and `warmpod edge serve` (a bundle → the V2 protocol)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from warmpod.cliargs import size_arg
from warmpod.errors import WarmpodError
from warmpod.server.cli import add_serving_arguments, serve, serving_config
from warmpod.store import DEFAULT_ROOT
from warmpod.wasm.bundle import (
    DTYPES,
    bundle_name,
    from_model,
    model_directory,
    source_note,
    staged_version,
    write_bundle,
)
from warmpod.wasm.host import DEFAULT_CACHE, ENGINE_WASM

USAGE = "usage: warmpod edge {compile,serve} ...\n\nRun 'warmpod edge compile --help' or 'warmpod edge serve --help'."


def compile_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="warmpod edge compile",
        description="Turn a model (a directory, or a version staged in a warmpod store) into an edge bundle.",
    )
    p.add_argument("source", nargs="?", type=Path, help="model directory (config.json + *.safetensors)")
    p.add_argument("-o", "--output", type=Path, required=True, help="bundle directory to create (must not exist)")
    p.add_argument("--store", type=Path, help=f"compile the current version of --model in this store ({DEFAULT_ROOT})")
    p.add_argument("--model", help="model name in --store")
    p.add_argument("--name", help="model name served (default: the directory's or --model's name)")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="weight precision stored (default fp32)")
    p.add_argument(
        "--max-error",
        type=float,
        help="refuse (exit 5, nothing written) when fp16/int8 outputs differ from fp32 by more than this",
    )
    _engine_arguments(p)
    return p


def serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="warmpod edge serve",
        description="Serve an edge bundle (or a model directory, compiled at start) on the sandboxed WebAssembly "
        "engine: Open Inference Protocol v2, OpenAI /v1/embeddings for encoders, the server's metrics.",
    )
    p.add_argument("bundle", type=Path, metavar="BUNDLE_OR_MODEL", help="edge bundle or model directory")
    add_serving_arguments(p, default_port=8081)
    p.add_argument(
        "--max-memory", type=size_arg, default=1 << 30, help="guest memory limit per worker instance (default 1GiB)"
    )
    _engine_arguments(p)
    return p


def _engine_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", type=Path, default=ENGINE_WASM, help="engine module (default: the committed build)")
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("WARMPOD_WASM_CACHE", DEFAULT_CACHE)),
        help=f"precompiled engine cache (default $WARMPOD_WASM_CACHE or {DEFAULT_CACHE})",
    )
    p.add_argument("--no-cache", action="store_true", help="compile the engine every start; write no cache")


def run_compile(args: argparse.Namespace) -> int:
    from warmpod.wasm.app import measure_accuracy

    if (args.store is None) != (args.model is None) or (args.source is None) == (args.store is None):
        print("warmpod edge compile: error: give a model directory, or --store and --model", file=sys.stderr)
        return 2
    try:
        files = (
            staged_version(args.store, args.model, args.name) if args.store else model_directory(args.source, args.name)
        )
        note = source_note(files.source)
        if note is not None:
            print(f"warmpod edge compile: {note}", file=sys.stderr)
        fp32 = from_model(files)
        bundle = fp32 if args.dtype == "fp32" else fp32.with_dtype(args.dtype)
        bundle.accuracy = measure_accuracy(fp32, bundle, args.engine, None if args.no_cache else args.cache_dir)
        error = bundle.accuracy["max_abs_error"]
        if args.max_error is not None and error > args.max_error:
            print(f"warmpod edge compile: error: {args.dtype} outputs differ from fp32 by {error:.3g}, more than "
                  f"--max-error {args.max_error:g}; nothing written (try fp16 or fp32)", file=sys.stderr)  # fmt: skip
            return 5
        out = write_bundle(bundle, args.output)
    except WarmpodError as e:  # BundleError, EngineError: the command's one handler
        print(f"warmpod edge compile: error: {e}", file=sys.stderr)
        return e.exit_code
    size = sum(f.stat().st_size for f in out.iterdir())
    origin = ", from bf16 weights" if note is not None else ""
    report = f"wrote {out} ({bundle.graph.kind}, {args.dtype}, {size / 1e6:.1f} MB{origin})"
    if args.dtype != "fp32":
        cosine = bundle.accuracy.get("min_cosine")
        report += f"; max abs error vs fp32 {error:.3g}" + (f", min cosine {cosine:.6f}" if cosine is not None else "")
        report += f" on {bundle.accuracy['probe']}"
    print(f"warmpod edge compile: {report}")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from warmpod.wasm.app import EdgeConfig, EdgeSource

    source: Path = args.bundle
    if not source.is_dir():
        print(f"warmpod edge serve: error: {source} is not a directory (an edge bundle or a model directory)",
              file=sys.stderr)  # fmt: skip
        return 2
    config = serving_config(args, model=bundle_name(source), store=source)
    edge = EdgeConfig(source, args.engine, None if args.no_cache else args.cache_dir, args.max_memory)
    return asyncio.run(serve(config, reuse_port=args.reuse_port, metrics_port=args.metrics_port,
                             source=EdgeSource(edge, config), prog="warmpod edge serve",
                             description=f"edge, {source}"))  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args[0] == "compile":
        return run_compile(compile_parser().parse_args(args[1:]))
    if args[0] == "serve":
        return run_serve(serve_parser().parse_args(args[1:]))
    print(f"warmpod edge: unknown command {args[0]!r}\n\n{USAGE}", file=sys.stderr)
    return 2
