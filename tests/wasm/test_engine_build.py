"""The engine module itself, driven through raw wasmtime: the committed bytes are a reproducible build that imports
nothing and exports exactly the ABI (wasm/ABI.md); its math against numpy references (GEMM edge tiles, every
activation, a tiny BERT with padding under every pooling); every failure status with its message."""

from __future__ import annotations

import math
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import wasmtime

from tests.kit.models import MLP_ACTIVATIONS, mlp_forward, mlp_tensors

ROOT = Path(__file__).parents[2]
ENGINE = ROOT / "wasm" / "engine" / "warmpod_engine.wasm"
CHECK_WASM = ROOT / ".ci" / "check-wasm.sh"
ABI_FUNCTIONS = ("wp_abi_version", "wp_alloc", "wp_free", "wp_error", "wp_init", "wp_set_tensor", "wp_ready", "wp_run")
MLP, BERT = 1, 2
F32, F16, I8 = 0, 1, 2
# MLP activation codes, BERT hidden_act codes, pooling codes (ABI.md)
MLP_ACTIVATION_CODES = {"identity": 0, "relu": 1, "tanh": 2, "gelu": 3, "sigmoid": 4}
RELU, GELU, GELU_TANH = 1, 3, 5
POOLINGS = {"mean": 0, "cls": 1, "max": 2, "mean_sqrt_len": 3}


def _missing_toolchain() -> str | None:
    if shutil.which("clang") is None or shutil.which("wasm-ld") is None:
        return "clang/lld are not installed (Debian: clang lld wasi-libc libclang-rt-14-dev-wasm32)"
    if not Path("/usr/lib/wasm32-wasi/libc.a").exists():
        return "wasi-libc is not installed (Debian: wasi-libc)"
    builtins = subprocess.run(["clang", "--target=wasm32-wasi", "-print-libgcc-file-name"], capture_output=True,
                              text=True).stdout.strip()  # fmt: skip
    if not Path(builtins).exists():
        return "the wasm32 compiler runtime is not installed (Debian: libclang-rt-14-dev-wasm32)"
    return None


needs_toolchain = pytest.mark.skipif(_missing_toolchain() is not None, reason=str(_missing_toolchain()))


@dataclass(frozen=True)
class Compiled:
    engine: wasmtime.Engine
    module: wasmtime.Module


@pytest.fixture(scope="module")
def compiled() -> Compiled:
    config = wasmtime.Config()
    config.cranelift_opt_level = "speed"
    engine = wasmtime.Engine(config)
    return Compiled(engine, wasmtime.Module.from_file(engine, str(ENGINE)))


class Guest:
    """One engine instance and the few ABI calls the tests need, with numpy arrays in and out."""

    def __init__(self, compiled: Compiled, memory_limit: int | None = None) -> None:
        self.store = wasmtime.Store(compiled.engine)
        if memory_limit is not None:
            self.store.set_limits(memory_size=memory_limit)
        exports = wasmtime.Instance(self.store, compiled.module, []).exports(self.store)
        memory = exports["memory"]
        assert isinstance(memory, wasmtime.Memory)
        self.memory = memory
        self.fn = {name: exports[name] for name in ("_initialize", *ABI_FUNCTIONS)}
        self.call("_initialize")

    def call(self, name: str, *args: int) -> int:
        fn = self.fn[name]
        assert isinstance(fn, wasmtime.Func)
        result = fn(self.store, *args)
        return int(result) if result is not None else 0

    def put(self, array: np.ndarray) -> int:
        data = np.ascontiguousarray(array).tobytes()
        ptr = self.call("wp_alloc", len(data))
        assert ptr, self.error()
        self.memory.write(self.store, data, ptr)
        return ptr

    def get(self, ptr: int, count: int, dtype: type[np.generic] = np.float32) -> np.ndarray:
        nbytes = count * np.dtype(dtype).itemsize
        return np.frombuffer(bytes(self.memory.read(self.store, ptr, ptr + nbytes)), dtype=dtype)

    def error(self) -> str:
        ptr = self.call("wp_error")
        return bytes(self.memory.read(self.store, ptr, ptr + 1024)).split(b"\0", 1)[0].decode()

    def init(self, kind: int, words: Sequence[int]) -> int:
        cfg = self.put(np.array(words, dtype=np.int32))
        status = self.call("wp_init", kind, cfg, len(words))
        self.call("wp_free", cfg)
        return status

    def set(self, index: int, array: np.ndarray, dtype: int = F32, scale: np.ndarray | None = None) -> int:
        scale_ptr = 0 if scale is None else self.put(scale.astype(np.float32))
        return self.call("wp_set_tensor", index, dtype, array.size, self.put(array), scale_ptr)

    def load(self, kind: int, words: Sequence[int], tensors: Sequence[np.ndarray]) -> None:
        assert self.init(kind, words) == 0, self.error()
        for index, tensor in enumerate(tensors):
            assert self.set(index, tensor.astype(np.float32)) == 0, self.error()
        assert self.call("wp_ready") == 0, self.error()

    def run(self, batch: int, seq: int, data: np.ndarray, out_floats: int) -> tuple[int, np.ndarray]:
        inp, out = self.put(data), self.call("wp_alloc", out_floats * 4)
        status = self.call("wp_run", batch, seq, inp, out)
        result = self.get(out, out_floats).copy()
        self.call("wp_free", inp)
        self.call("wp_free", out)
        return status, result


def f32_bits(x: float) -> int:
    return int(np.array(x, dtype=np.float32).view(np.int32))


# ---------------------------------------------------------------- the module and its build


def test_module_imports_nothing_and_exports_exactly_the_abi(compiled: Compiled) -> None:
    assert [f"{i.module}.{i.name}" for i in compiled.module.imports] == []
    assert sorted(e.name for e in compiled.module.exports) == sorted(("memory", "_initialize", *ABI_FUNCTIONS))


def test_abi_version_is_1(compiled: Compiled) -> None:
    assert Guest(compiled).call("wp_abi_version") == 1


@needs_toolchain
def test_a_build_from_another_directory_is_byte_identical_to_the_committed_module(tmp_path: Path) -> None:
    elsewhere = tmp_path / "some" / "other" / "checkout"
    shutil.copytree(ROOT / "wasm" / "engine", elsewhere, ignore=shutil.ignore_patterns("*.wasm"))
    out = tmp_path / "fresh.wasm"
    subprocess.run([str(elsewhere / "build.sh"), str(out)], check=True, capture_output=True, timeout=120)
    assert out.read_bytes() == ENGINE.read_bytes(), "run wasm/engine/build.sh and commit warmpod_engine.wasm"


@needs_toolchain
def test_check_wasm_accepts_the_committed_module_and_refuses_a_modified_one(tmp_path: Path) -> None:
    ok = subprocess.run([str(CHECK_WASM)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    modified = tmp_path / "warmpod_engine.wasm"
    data = bytearray(ENGINE.read_bytes())
    data[-1] ^= 0xFF
    modified.write_bytes(bytes(data))
    proc = subprocess.run([str(CHECK_WASM), str(modified)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "run wasm/engine/build.sh and commit wasm/engine/warmpod_engine.wasm" in proc.stderr


# ---------------------------------------------------------------- MLP: GEMM tiles, activations, dtypes


def _linear_stack(rng: np.random.Generator, sizes: Sequence[int]) -> list[np.ndarray]:
    """The kit's MLP weights, as the list of tensors the engine's kind-1 layout takes (weight, bias, ...)."""
    return list(mlp_tensors(sizes, rng).values())


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return np.asarray(0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))))


@pytest.mark.parametrize("sizes", [(5, 13, 7), (600, 37, 33)])  # odd tiles; k past one 512 block, rows past 64
@pytest.mark.parametrize("batch", [1, 3, 17, 70])
def test_gemm_edge_tiles_match_numpy(compiled: Compiled, sizes: tuple[int, ...], batch: int) -> None:
    rng = np.random.default_rng(batch)
    tensors = _linear_stack(rng, sizes)
    guest = Guest(compiled)
    guest.load(MLP, [len(sizes) - 1, *sizes, 0, 0], tensors)
    x = rng.standard_normal((batch, sizes[0])).astype(np.float32)
    status, out = guest.run(batch, 0, x, batch * sizes[-1])
    assert status == 0, guest.error()
    assert np.abs(out.reshape(batch, -1) - mlp_forward(tensors, x, "identity")).max() <= 1e-5


@pytest.mark.parametrize("act", list(MLP_ACTIVATIONS))
@pytest.mark.parametrize("output", ["softmax", "sigmoid"])
def test_activations_and_probabilities_match_numpy(compiled: Compiled, act: str, output: str) -> None:
    rng = np.random.default_rng(7)
    sizes = (6, 10, 9, 4)
    tensors = [t * 3 for t in _linear_stack(rng, sizes)]  # wide enough to reach every activation's tails
    guest = Guest(compiled)
    guest.load(MLP, [3, *sizes, MLP_ACTIVATION_CODES[act], 1 if output == "softmax" else 2], tensors)
    x = rng.standard_normal((5, 6)).astype(np.float32)
    status, out = guest.run(5, 0, x, 2 * 5 * 4)
    assert status == 0, guest.error()
    logits, probabilities = out.reshape(2, 5, 4)
    want = mlp_forward(tensors, x, act)
    if output == "softmax":
        e = np.exp(want - want.max(axis=1, keepdims=True))
        want_p = e / e.sum(axis=1, keepdims=True)
    else:
        want_p = 1 / (1 + np.exp(-want))
    assert np.abs(logits - want).max() <= 1e-5 * max(1.0, np.abs(want).max())
    assert np.abs(probabilities - want_p).max() <= 1e-6


@pytest.mark.parametrize("act", ["gelu", "sigmoid", "tanh"])
def test_element_functions_are_accurate_to_1e_6_relative(compiled: Compiled, act: str) -> None:
    """1 → 1 → 1 with unit weights: the output is exactly the activation of the input, over [-20, 20]."""
    x = np.concatenate([np.linspace(-20, 20, 40001), np.linspace(-1e-3, 1e-3, 2001)]).astype(np.float32)
    one, zero = np.ones((1, 1), np.float32), np.zeros(1, np.float32)
    guest = Guest(compiled)
    guest.load(MLP, [2, 1, 1, 1, MLP_ACTIVATION_CODES[act], 0], [one, zero, one, zero])
    status, out = guest.run(x.size, 0, x, x.size)
    assert status == 0, guest.error()
    want = MLP_ACTIVATIONS[act](x.astype(np.float64))
    significant = np.abs(want) > 1e-30  # below, results are subnormal or zero either way
    relative = np.abs(out - want)[significant] / np.abs(want)[significant]
    assert relative.max() <= 1e-6


def test_f16_and_int8_weights_are_converted_to_fp32(compiled: Compiled) -> None:
    rng = np.random.default_rng(3)
    w0, b0, w1, b1 = _linear_stack(rng, (8, 12, 5))
    w0_16 = w0.astype(np.float16)
    scale = np.abs(w1).max(axis=1) / 127
    w1_8 = np.round(w1 / scale[:, None]).astype(np.int8)
    guest = Guest(compiled)
    assert guest.init(MLP, [2, 8, 12, 5, 0, 0]) == 0
    assert guest.set(0, w0_16, F16) == 0, guest.error()
    assert guest.set(1, b0.astype(np.float16), F16) == 0, guest.error()
    assert guest.set(2, w1_8, I8, scale) == 0, guest.error()
    assert guest.set(3, b1) == 0, guest.error()
    assert guest.call("wp_ready") == 0, guest.error()
    x = rng.standard_normal((3, 8)).astype(np.float32)
    status, out = guest.run(3, 0, x, 15)
    assert status == 0, guest.error()
    dequantized = [w0_16.astype(np.float32), b0.astype(np.float16).astype(np.float32),
                   (w1_8 * scale[:, None]).astype(np.float32), b1]  # fmt: skip
    assert np.abs(out.reshape(3, 5) - mlp_forward(dequantized, x, "identity")).max() <= 1e-5


# ---------------------------------------------------------------- a tiny BERT against a numpy BERT

H, LAYERS, HEADS, INTERMEDIATE, VOCAB, MAX_POSITION, EPS = 32, 2, 4, 64, 50, 16, 1e-12
SEQUENCES = [[1, 7, 9, 22, 4, 49, 2], [1, 30, 2], [1, 5, 5, 8, 2]]  # padded to 7 in one batch


def _bert_tensors(rng: np.random.Generator) -> list[np.ndarray]:
    def vector(scale: float = 0.1, offset: float = 0.0) -> np.ndarray:
        return offset + rng.standard_normal(H) * scale

    tensors = [rng.standard_normal((VOCAB, H)), rng.standard_normal((MAX_POSITION, H)) * 0.5,
               rng.standard_normal((2, H)) * 0.5, vector(offset=1.0), vector()]  # fmt: skip
    for _ in range(LAYERS):
        for _ in range(3):  # query, key, value
            tensors += [rng.standard_normal((H, H)) / math.sqrt(H), vector()]
        tensors += [rng.standard_normal((H, H)) / math.sqrt(H), vector(), vector(offset=1.0), vector()]
        tensors += [rng.standard_normal((INTERMEDIATE, H)) / math.sqrt(H), rng.standard_normal(INTERMEDIATE) * 0.1]
        tensors += [rng.standard_normal((H, INTERMEDIATE)) / math.sqrt(INTERMEDIATE), vector()]
        tensors += [vector(offset=1.0), vector()]
    return [t.astype(np.float32) for t in tensors]


def _layer_norm(x: np.ndarray, g: np.ndarray, b: np.ndarray) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return np.asarray((x - mean) / np.sqrt(var + EPS) * g + b)


def _bert_reference(t: Sequence[np.ndarray], ids: Sequence[int], act: int, pooling: str, normalize: bool) -> np.ndarray:
    """One sequence on its own, in float64: padding in the engine's batch must not change its result."""
    w = [a.astype(np.float64) for a in t]
    length, d = len(ids), H // HEADS
    x = w[0][list(ids)] + w[2][0]
    x = _layer_norm(x + w[1][:length], w[3], w[4])
    hidden_act = {RELU: MLP_ACTIVATIONS["relu"], GELU: MLP_ACTIVATIONS["gelu"], GELU_TANH: _gelu_tanh}[act]
    for layer in range(LAYERS):
        p = w[5 + 16 * layer : 5 + 16 * (layer + 1)]
        q, k, v = ((x @ p[i].T + p[i + 1]).reshape(length, HEADS, d).transpose(1, 0, 2) for i in (0, 2, 4))
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(d)
        e = np.exp(scores - scores.max(axis=-1, keepdims=True))
        context = (e / e.sum(axis=-1, keepdims=True) @ v).transpose(1, 0, 2).reshape(length, H)
        attended = _layer_norm(context @ p[6].T + p[7] + x, p[8], p[9])
        x = _layer_norm(hidden_act(attended @ p[10].T + p[11]) @ p[12].T + p[13] + attended, p[14], p[15])
    pooled = {"mean": x.mean(axis=0), "cls": x[0], "max": x.max(axis=0),
              "mean_sqrt_len": x.sum(axis=0) / math.sqrt(length)}[pooling]  # fmt: skip
    return np.asarray(pooled / max(float(np.linalg.norm(pooled)), 1e-12) if normalize else pooled)


def _bert_words(act: int = GELU, pooling: str = "mean", normalize: bool = False) -> list[int]:
    return [VOCAB, H, LAYERS, HEADS, INTERMEDIATE, MAX_POSITION, 2, act, POOLINGS[pooling], int(normalize),
            f32_bits(EPS)]  # fmt: skip


def _padded(sequences: Sequence[Sequence[int]], seq: int | None = None) -> np.ndarray:
    seq = seq or max(map(len, sequences))
    ids = np.zeros((len(sequences), seq), np.int32)
    mask = np.zeros_like(ids)
    for row, s in enumerate(sequences):
        ids[row, : len(s)], mask[row, : len(s)] = s, 1
    return np.stack([ids, mask])


@pytest.fixture(scope="module")
def bert_tensors() -> list[np.ndarray]:
    return _bert_tensors(np.random.default_rng(11))


@pytest.mark.parametrize("pooling", list(POOLINGS))
@pytest.mark.parametrize("normalize", [False, True])
def test_tiny_bert_with_padding_matches_numpy(compiled: Compiled, bert_tensors: list[np.ndarray],
                                              pooling: str, normalize: bool) -> None:  # fmt: skip
    guest = Guest(compiled)
    guest.load(BERT, _bert_words(GELU, pooling, normalize), bert_tensors)
    status, out = guest.run(3, 7, _padded(SEQUENCES), 3 * H)
    assert status == 0, guest.error()
    want = np.stack([_bert_reference(bert_tensors, s, GELU, pooling, normalize) for s in SEQUENCES])
    assert np.abs(out.reshape(3, H) - want).max() <= 1e-5


@pytest.mark.parametrize("act", [RELU, GELU_TANH])
def test_tiny_bert_other_activations_match_numpy(compiled: Compiled, bert_tensors: list[np.ndarray],
                                                 act: int) -> None:  # fmt: skip
    guest = Guest(compiled)
    guest.load(BERT, _bert_words(act), bert_tensors)
    status, out = guest.run(3, 9, _padded(SEQUENCES, seq=9), 3 * H)  # more padding than the longest needs
    assert status == 0, guest.error()
    want = np.stack([_bert_reference(bert_tensors, s, act, "mean", False) for s in SEQUENCES])
    assert np.abs(out.reshape(3, H) - want).max() <= 1e-5


# ---------------------------------------------------------------- every failure: status and message


def test_a_tensor_of_the_wrong_size_is_refused_by_name(compiled: Compiled) -> None:
    guest = Guest(compiled)
    assert guest.init(BERT, _bert_words()) == 0
    assert guest.set(8, np.zeros(100, np.float32)) == -3
    assert guest.error() == "tensor 8 (layer 0 key.bias): got 100 elements, expected [32]"
    assert guest.set(5, np.zeros((H, 3), np.float32)) == -3
    assert guest.error() == "tensor 5 (layer 0 query.weight): got 96 elements, expected [32, 32]"
    assert guest.set(4, np.zeros(H, np.int8), I8, np.ones(H)) == -3
    assert "INT8 is only for weight matrices" in guest.error()


def test_a_bad_description_is_refused(compiled: Compiled) -> None:
    guest = Guest(compiled)
    assert guest.init(3, [1, 2, 3]) == -1
    assert guest.error() == "model kind 3 is not 1 (MLP) or 2 (BERT)"
    assert guest.init(MLP, [2, 4, 8, 3, 0]) == -1
    assert "expected n_layers + 4 words" in guest.error()
    assert guest.init(BERT, [VOCAB, 30, LAYERS, HEADS, INTERMEDIATE, MAX_POSITION, 2, GELU, 0, 0, f32_bits(EPS)]) == -1
    assert guest.error() == "BERT description: hidden 30 is not a multiple of heads 4"


def test_bad_token_ids_masks_and_lengths_are_refused(compiled: Compiled, bert_tensors: list[np.ndarray]) -> None:
    guest = Guest(compiled)
    guest.load(BERT, _bert_words(), bert_tensors)
    assert guest.run(3, 3, _padded([[1, 2], [1, 2, 99], [3]]), 3 * H)[0] == -4
    assert guest.error() == "token id 99 at row 1 position 2 is outside the vocabulary (50)"
    assert guest.run(1, 17, _padded([[1] * 17]), H)[0] == -4
    assert guest.error() == "sequence of 17 tokens is longer than max_position_embeddings 16"
    holes = _padded([[1, 2, 3]])
    holes[1, 0, 1] = 0
    assert guest.run(1, 3, holes, H)[0] == -4
    assert "attention mask row 0 position 2 is 1" in guest.error()
    empty = _padded([[1, 2, 3]])
    empty[1] = 0
    assert guest.run(1, 3, empty, H)[0] == -4
    assert guest.error() == "row 0 has no tokens (its attention mask is all 0)"
    assert guest.run(1, 3, _padded([[1, 2, 3]]), H)[0] == 0  # still serving after every refusal


def test_running_before_ready_is_refused(compiled: Compiled, bert_tensors: list[np.ndarray]) -> None:
    guest = Guest(compiled)
    assert guest.run(1, 3, _padded([[1, 2, 3]]), H)[0] == -5
    assert guest.init(BERT, _bert_words()) == 0
    for index, tensor in enumerate(bert_tensors):
        if index != 3:
            assert guest.set(index, tensor) == 0
    assert guest.run(1, 3, _padded([[1, 2, 3]]), H)[0] == -5
    assert "not ready" in guest.error()
    assert guest.call("wp_ready") == -5
    assert guest.error() == "tensor 3 (embeddings LayerNorm.weight) [32] was not set: call wp_set_tensor for it"


def test_memory_exhaustion_fails_cleanly(compiled: Compiled) -> None:
    guest = Guest(compiled, memory_limit=16 << 20)
    assert guest.call("wp_alloc", 64 << 20) == 0
    assert guest.error() == f"out of memory allocating {64 << 20} bytes"
    sizes = (4, 256, 3)
    guest.load(MLP, [2, *sizes, 1, 0], _linear_stack(np.random.default_rng(0), sizes))
    batch = 10_000  # two [batch, 256] activations: 20 MB of scratch
    status, _ = guest.run(batch, 0, np.zeros((batch, 4), np.float32), batch * 3)
    assert status == -2
    assert guest.error().startswith("out of memory allocating")
    assert guest.run(2, 0, np.zeros((2, 4), np.float32), 6)[0] == 0  # a batch that fits still runs
