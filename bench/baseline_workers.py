"""The Python baselines of bench/load_bench.py, each in its own process.

    python -m bench.baseline_workers TOOL SRC DST

Every tool gets a model from SRC into the file DST (on /dev/shm) and prints one JSON object on stdout:
{"tool", "bytes" (bytes written to DST), "seconds" (in-process time, from after the imports to DST closed)}.
The caller also times the whole process (interpreter start and imports included), as it does for warmpod,
cp and curl, so both numbers are comparable across tools.

Tools:
  st-load      safetensors.torch.load_file(SRC) (whole model into RAM), then each tensor's bytes written
               to DST in file order: what a naive Python loader does.
  s3fs         s3fs.S3FileSystem().get(SRC, DST): SRC is s3://bucket/key, endpoint and keys from AWS_* env.
  runai-ram    runai_model_streamer SafetensorsStreamer: stream SRC (s3://...) into RAM, keeping every tensor
               (owned=True, the default); DST is not written. "Into RAM" only, for reference.
  runai-write  the same stream, each tensor's bytes written to DST as it arrives (owned=True, the default;
               owned=False measured slower, see runai_write).

torch-based tools use one intra-op thread: torch.set_num_threads(1); the caller sets OMP_NUM_THREADS=1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any, BinaryIO

WRITE_BUFFERING = 8 << 20


def _tensor_bytes(tensor: Any) -> memoryview:
    """A zero-copy byte view of a contiguous CPU torch tensor of any dtype (bf16 included)."""
    import torch

    flat = tensor.contiguous().reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")


def write_tensors(named: Iterable[tuple[str, Any]], out: BinaryIO) -> int:
    """Write each tensor's raw bytes to `out`, in iteration order; return the byte count."""
    total = 0
    for _name, tensor in named:
        if tensor.numel() == 0:
            continue
        total += out.write(_tensor_bytes(tensor))
    return total


def st_load(src: str, dst: str) -> int:
    from safetensors import safe_open
    from safetensors.torch import load_file

    tensors = load_file(src)
    # load_file returns a dict in whatever order; write in file order, as the file was laid out.
    with safe_open(src, framework="pt") as f:
        order = list(f.keys())
    order.sort(key=lambda n: _data_offset(src, n))
    with open(dst, "wb", buffering=WRITE_BUFFERING) as out:
        return write_tensors(((n, tensors[n]) for n in order), out)


_OFFSETS: dict[str, dict[str, int]] = {}


def _data_offset(path: str, name: str) -> int:
    """Where tensor `name` starts in the data section of safetensors file `path` (header read once)."""
    if path not in _OFFSETS:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        _OFFSETS[path] = {k: v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}
    return _OFFSETS[path][name]


def s3fs_get(src: str, dst: str) -> int:
    import s3fs

    fs = s3fs.S3FileSystem(
        key=os.environ["AWS_ACCESS_KEY_ID"],
        secret=os.environ["AWS_SECRET_ACCESS_KEY"],
        endpoint_url=os.environ["AWS_ENDPOINT_URL"],
        client_kwargs={"region_name": os.environ.get("AWS_DEFAULT_REGION", "us-east-1")},
    )
    fs.get(src, dst)
    return os.path.getsize(dst)


def runai_ram(src: str, dst: str) -> int:
    from runai_model_streamer import SafetensorsStreamer

    kept: list[Any] = []
    total = 0
    with SafetensorsStreamer() as streamer:
        streamer.stream_file(src)
        for _name, tensor in streamer.get_tensors():
            kept.append(tensor)
            total += tensor.numel() * tensor.element_size()
    return total


def runai_write(src: str, dst: str) -> int:
    from runai_model_streamer import SafetensorsStreamer

    # owned=True (the default): owned=False lets the streamer reuse its buffers, but then the next read waits
    # for each write, which measured ~1.5x slower here, so the faster mode is the fair baseline.
    with SafetensorsStreamer() as streamer, open(dst, "wb", buffering=WRITE_BUFFERING) as out:
        streamer.stream_file(src)
        return write_tensors(streamer.get_tensors(), out)


TOOLS: dict[str, Callable[[str, str], int]] = {
    "st-load": st_load,
    "s3fs": s3fs_get,
    "runai-ram": runai_ram,
    "runai-write": runai_write,
}


def _preimport(tool: str) -> None:
    """Import the tool's libraries before the clock starts (the caller's wall clock still counts them)."""
    if tool in ("st-load", "runai-ram", "runai-write"):
        import torch

        torch.set_num_threads(1)
    if tool == "st-load":
        import safetensors.torch  # noqa: F401
    elif tool == "s3fs":
        import s3fs  # noqa: F401
    else:
        import runai_model_streamer  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tool", choices=sorted(TOOLS))
    ap.add_argument("src")
    ap.add_argument("dst")
    args = ap.parse_args(argv)
    _preimport(args.tool)
    t0 = time.perf_counter()
    n = TOOLS[args.tool](args.src, args.dst)
    seconds = time.perf_counter() - t0
    json.dump({"tool": args.tool, "bytes": n, "seconds": seconds}, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
