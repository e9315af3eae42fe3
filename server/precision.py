"""The precision a staged model is computed in on this CPU, decided once at start and said at start.

A store may hold bf16 weights (`warmpod load --dtype bf16`). Where the CPU has bf16 instructions (AVX512-BF16 or AMX,
the `avx512_bf16` / `amx_bf16` flags of /proc/cpuinfo) the server computes in bf16 on the store's mapping, zero copy.
Where it has neither, bf16 matrix products are emulated and slower than fp32, so the server UPCASTS the bf16 weights
to fp32 at start: a private copy in this process (twice the bf16 bytes, no longer shared with the other pods of the
node), said in a warning with its size and in `warmpod_model_weights_info`. Other dtypes are served as staged.

Pure core (`cpu_flags`, `native_bf16`, `plan_precision`) first, then the thin shell (read /proc/cpuinfo, upcast).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from warmpod.store import StagedModel

log = logging.getLogger("warmpod.server")

BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # either one: the CPU computes bf16 natively
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # safetensors float dtypes
_SHORT = {"F64": "fp64", "F32": "fp32", "F16": "fp16", "BF16": "bf16"}
MiB = 1 << 20


# ---------------------------------------------------------------- pure core


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The feature flags of /proc/cpuinfo's text (the first `flags` line: every core of a node has the same)."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


@dataclass(frozen=True)
class CpuBf16:
    """What this CPU offers for bf16: `native` when it has one of BF16_FLAGS (named in `flags`)."""

    flags: tuple[str, ...]

    @property
    def native(self) -> bool:
        return bool(self.flags)

    def describe(self) -> str:
        if self.native:
            return f"this CPU has {' and '.join(self.flags)}"
        return f"this CPU has neither {' nor '.join(BF16_FLAGS)}"


def native_bf16(cpuinfo: str) -> CpuBf16:
    """Whether the CPU described by /proc/cpuinfo's text computes bf16 natively."""
    flags = cpu_flags(cpuinfo)
    return CpuBf16(tuple(f for f in BF16_FLAGS if f in flags))


@dataclass(frozen=True)
class WeightsPrecision:
    """How a model's float weights are stored and computed on this node.

    `stored` and `computed` are short names ("bf16", "fp32", or "mixed: bf16+fp32"); `private_bytes` is what the
    upcast allocates in this process (0: every weight is a view of the store's shared mapping); `converted_from`
    is the dtype the loader converted from (its conversion record), when there is one.
    """

    stored: str
    computed: str
    upcast: bool
    private_bytes: int
    cpu: CpuBf16
    converted_from: str | None = None

    def describe(self) -> str:
        """The line said at start."""
        staged = f" (staged by the loader from {self.converted_from})" if self.converted_from else ""
        if self.upcast:
            return (
                f"weights {self.stored}{staged} upcast to fp32 at start: {self.cpu.describe()}, on which bf16 is "
                f"emulated and slower than fp32. The upcast is a private copy of {self.private_bytes / MiB:.1f} MiB "
                "in this process, not shared with the other pods of the node: the store's bf16 saving is lost on "
                "this node; stage fp32 for such nodes (warmpod load without --dtype bf16)"
            )
        where = f" ({self.cpu.describe()})" if "bf16" in self.stored else ""
        return f"weights {self.stored}{staged}, computed in {self.computed}{where}, zero copy from the store"


def _name(dtypes: set[str]) -> str:
    names = sorted(_SHORT.get(d, d.lower()) for d in dtypes)
    if not names:
        return "none"
    return names[0] if len(names) == 1 else "mixed: " + "+".join(names)


def plan_precision(
    tensors: Mapping[str, tuple[str, int]], cpu: CpuBf16, *, converted_from: str | None = None
) -> WeightsPrecision:
    """From the staged tensors (name → (safetensors dtype, bytes)) and the CPU: store's precision, or upcast.

    Only BF16 tensors are ever upcast (to F32, twice their bytes), and only on a CPU without native bf16.
    """
    floats = {dtype for dtype, _ in tensors.values() if dtype in FLOAT_DTYPES}
    bf16_bytes = sum(size for dtype, size in tensors.values() if dtype == "BF16")
    upcast = "BF16" in floats and not cpu.native
    computed = (floats - {"BF16"}) | {"F32"} if upcast else floats
    return WeightsPrecision(
        stored=_name(floats),
        computed=_name(computed),
        upcast=upcast,
        private_bytes=2 * bf16_bytes if upcast else 0,
        cpu=cpu,
        converted_from=converted_from,
    )


def conversion_source(manifest: Mapping[str, Any]) -> str | None:
    """The dtype(s) the loader converted from, e.g. "F32" or "F16+F32", read from the manifest's conversion record
    ("conversion": per file, "converted": {source dtype: tensors}); None without a record, or when it does not say."""
    record = manifest.get("conversion")
    if not isinstance(record, Mapping):
        return None
    files = record.get("files")
    if isinstance(files, Mapping):
        dtypes = {
            str(dtype)
            for entry in files.values()
            if isinstance(entry, Mapping) and isinstance(entry.get("converted"), Mapping)
            for dtype in entry["converted"]
        }
        if dtypes:
            return "+".join(sorted(dtypes))
    value = record.get("from")
    return value if isinstance(value, str) and value else None


# ---------------------------------------------------------------- shell


def detect_cpu(proc_root: Path = Path("/proc")) -> CpuBf16:
    """This node's bf16 support, from PROC_ROOT/cpuinfo (unreadable: not native, which is always safe)."""
    try:
        text = (proc_root / "cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        log.warning("cannot read %s (%s): bf16 weights will be upcast to fp32", proc_root / "cpuinfo", e.strerror)
        text = ""
    return native_bf16(text)


def staged_precision(staged: StagedModel, cpu: CpuBf16) -> WeightsPrecision:
    """`plan_precision` for a staged version."""
    tensors = {
        name: (str(entry["dtype"]), int(entry["offsets"][1]) - int(entry["offsets"][0]))
        for name, entry in staged.manifest["tensors"].items()
    }
    return plan_precision(tensors, cpu, converted_from=conversion_source(staged.manifest))


def served_tensors(staged: StagedModel, precision: WeightsPrecision) -> dict[str, torch.Tensor]:
    """The staged tensors as the model will hold them: views of the mapping, or, when `precision.upcast`, the
    bf16 ones as fp32 copies (the others still views)."""
    import torch

    tensors = staged.tensors()
    if not precision.upcast:
        return tensors
    return {name: t.float() if t.dtype == torch.bfloat16 else t for name, t in tensors.items()}
