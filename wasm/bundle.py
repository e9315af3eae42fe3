"""Edge bundles: a model turned into what the WebAssembly engine runs (format: `wasm/ABI.md`).

A bundle is a directory: `edge.json` (the graph described by name, the tensor order, the weights' digest, the
accuracy of its precision), `weights.safetensors` (FP32, FP16 or INT8 with per-row scales) and, for text encoders,
the model's `tokenizer.json`. Pure core first (config → graph, quantization, validation), then the I/O shell
(read a model directory or a staged store version, write a bundle atomically, load one).

Torch is never imported: the edge runs where torch is not installed.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import mmap
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import numpy as np

from warmpod.errors import WarmpodError
from warmpod.server.errors import ModelError
from warmpod.server.families.common import read_json_object
from warmpod.server.families.mlp_spec import MLPConfig
from warmpod.server.families.sentence import (
    BertConfig,
    SentenceSettings,
    read_sentence_files,
    select_encoder_tensors,
)
from warmpod.server.model import weight_problems
from warmpod.server.precision import conversion_source
from warmpod.store import InvalidWeights, StoreError, open_model

FORMAT = "warmpod-edge"
FORMAT_VERSION = 1
MANIFEST = "edge.json"
P = ParamSpec("P")
R = TypeVar("R")


class BundleError(WarmpodError):
    """A model the edge cannot compile, or a bundle it cannot read; the message names the part and the rule.

    Offline (`warmpod edge compile`) it ends the command with exit 5; `warmpod edge serve` reports it as the model
    that cannot be served (also exit 5). The model families' own checks (config.json, sentence settings) raise the
    server's ModelError; the public functions here turn those into BundleError too (`bundle_errors`)."""

    exit_code = 5
    kind = "bundle"


def bundle_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """A public entry point raises BundleError for every model-description problem, the families' included."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except (ModelError, BundleError) as e:
            raise BundleError(str(e)) from None

    return wrapper


WEIGHTS = "weights.safetensors"
TOKENIZER = "tokenizer.json"
DTYPES = ("fp32", "fp16", "int8")
KINDS = ("mlp", "bert")

# Engine codes (ABI.md): kinds, activations, poolings, tensor dtypes.
KIND_CODES = {"mlp": 1, "bert": 2}
MLP_ACTIVATION_CODES = {"identity": 0, "relu": 1, "tanh": 2, "gelu": 3, "sigmoid": 4}
OUTPUT_ACTIVATION_CODES = {None: 0, "softmax": 1, "sigmoid": 2}
BERT_ACTIVATION_CODES = {"relu": 1, "gelu": 3, "gelu_new": 5, "gelu_pytorch_tanh": 5}
POOLING_CODES = {"mean": 0, "cls": 1, "max": 2, "mean_sqrt_len": 3}
TENSOR_DTYPE_CODES = {"F32": 0, "F16": 1, "I8": 2}
# A stored tensor's numpy dtype → its engine dtype code.
_ENGINE_DTYPE_CODES = {
    np.dtype(t): TENSOR_DTYPE_CODES[k] for k, t in (("F32", np.float32), ("F16", np.float16), ("I8", np.int8))
}
QKV = ("query", "key", "value")


def _bert_layer_tensors(h: int, i: int) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """One BERT layer's tensors in engine order (ABI.md: base 5 + 16 l) with their shapes."""
    return (
        *((f"attention.self.{p}.{k}", (h, h) if k == "weight" else (h,)) for p in QKV for k in ("weight", "bias")),
        ("attention.output.dense.weight", (h, h)),
        ("attention.output.dense.bias", (h,)),
        ("attention.output.LayerNorm.weight", (h,)),
        ("attention.output.LayerNorm.bias", (h,)),
        ("intermediate.dense.weight", (i, h)),
        ("intermediate.dense.bias", (i,)),
        ("output.dense.weight", (h, i)),
        ("output.dense.bias", (h,)),
        ("output.LayerNorm.weight", (h,)),
        ("output.LayerNorm.bias", (h,)),
    )


# ---------------------------------------------------------------- pure core: the graph


@dataclass(frozen=True)
class Graph:
    """What the engine runs: a kind, its named config, and the tensors it wants in engine order (name → shape)."""

    kind: str
    config: dict[str, Any]
    tensors: tuple[tuple[str, tuple[int, ...]], ...]

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.tensors]

    def words(self) -> list[int]:
        """The `wp_init` description (ABI.md), as i32 words."""
        c = self.config
        if self.kind == "mlp":
            sizes = c["sizes"]
            return [len(sizes) - 1, *sizes, MLP_ACTIVATION_CODES[c["activation"]],
                    OUTPUT_ACTIVATION_CODES[c["output_activation"]]]  # fmt: skip
        eps_bits = int(np.array(c["layer_norm_eps"], dtype=np.float32).view(np.int32))
        return [
            *(c[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")),
            *(c[k] for k in ("intermediate_size", "max_position_embeddings", "type_vocab_size")),
            BERT_ACTIVATION_CODES[c["hidden_act"]],
            POOLING_CODES[c["pooling"]],
            int(c["normalize"]),
            eps_bits,
        ]


def mlp_graph(spec: MLPConfig) -> Graph:
    """The engine graph of an MLP; its config has MLPConfig's fields, so `MLPConfig(**graph.config)` gives it back."""
    tensors: list[tuple[str, tuple[int, ...]]] = []
    for i, (a, b) in enumerate(itertools.pairwise(spec.sizes)):
        tensors += [(f"layers.{i}.weight", (b, a)), (f"layers.{i}.bias", (b,))]
    config_out = {
        "sizes": spec.sizes,
        "activation": spec.activation,
        "output_activation": spec.output_activation,
        "labels": spec.labels,
    }
    return Graph("mlp", config_out, tuple(tensors))


def bert_graph(config: BertConfig, settings: SentenceSettings) -> Graph:
    """The engine graph of a BERT encoder with its sentence-transformers pooling."""
    h, i = config.hidden_size, config.intermediate_size
    tensors: list[tuple[str, tuple[int, ...]]] = [
        ("embeddings.word_embeddings.weight", (config.vocab_size, h)),
        ("embeddings.position_embeddings.weight", (config.max_position_embeddings, h)),
        ("embeddings.token_type_embeddings.weight", (config.type_vocab_size, h)),
        ("embeddings.LayerNorm.weight", (h,)),
        ("embeddings.LayerNorm.bias", (h,)),
    ]
    for layer in range(config.num_hidden_layers):
        tensors += [(f"encoder.layer.{layer}.{name}", shape) for name, shape in _bert_layer_tensors(h, i)]
    config_out = {
        "vocab_size": config.vocab_size,
        "hidden_size": h,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "intermediate_size": i,
        "max_position_embeddings": config.max_position_embeddings,
        "type_vocab_size": config.type_vocab_size,
        "hidden_act": config.hidden_act,
        "layer_norm_eps": config.layer_norm_eps,
        "pad_token_id": config.pad_token_id,
        "pooling": settings.pooling,
        "normalize": settings.normalize,
    }
    return Graph("bert", config_out, tuple(tensors))


def graph_of(kind: str, config: Mapping[str, Any]) -> Graph:
    """A bundle's graph from its edge.json `config` (the inverse of Graph.config); ModelError names what is wrong."""
    if kind == "mlp":
        sizes = config.get("sizes")
        if not isinstance(sizes, list) or len(sizes) < 2:
            raise BundleError(f"{MANIFEST}: config.sizes must list at least two layer sizes, got {sizes!r}")
        # Checked as the MLP family checks a config.json, so a bad bundle is named as a bad model would be.
        as_json = {"input_size": sizes[0], "hidden_sizes": sizes[1:-1], "output_size": sizes[-1], **config}
        return mlp_graph(MLPConfig.from_json(as_json))
    if kind == "bert":
        bert = BertConfig.from_json(config)
        pooling, normalize = config.get("pooling"), config.get("normalize")
        if pooling not in POOLING_CODES or not isinstance(normalize, bool):
            raise BundleError(
                f"{MANIFEST}: config.pooling must be one of {', '.join(POOLING_CODES)} and config.normalize a "
                f"boolean, got {pooling!r} and {normalize!r}"
            )
        return bert_graph(bert, SentenceSettings(pooling, normalize, bert.max_position_embeddings, False))
    raise BundleError(f"{MANIFEST}: kind {kind!r} is not one the engine runs ({', '.join(KINDS)})")


def fit_tensors(graph: Graph, tensors: Mapping[str, np.ndarray], what: str) -> dict[str, np.ndarray]:
    """The graph's tensors from `tensors`, in engine order; ModelError naming every missing, extra or mis-shaped one."""
    wanted = dict(graph.tensors)
    missing = [n for n in wanted if n not in tensors]
    extra = sorted(set(tensors) - set(wanted))
    wrong = [f"{n} is {list(tensors[n].shape)}, the graph wants {list(s)}"
             for n, s in wanted.items() if n in tensors and tuple(tensors[n].shape) != s]  # fmt: skip
    problems = weight_problems(missing, extra, wrong)
    if problems:
        raise BundleError(f"{what}: the weights do not match the {graph.kind} graph — {problems}")
    return {n: tensors[n] for n in wanted}


def quantize(tensors: Mapping[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """Store FP32 tensors as `dtype`: fp16 everywhere, or int8 for 2-D matrices (symmetric, one scale per row;
    vectors stay FP32). An I8 tensor X gets its scales as `X.scale`."""
    if dtype == "fp16":
        return {n: t.astype(np.float16) for n, t in tensors.items()}
    assert dtype == "int8", f"quantize to fp16 or int8, not {dtype!r}"
    out: dict[str, np.ndarray] = {}
    for name, t in tensors.items():
        t = np.asarray(t, dtype=np.float32)
        if t.ndim != 2:
            out[name] = np.ascontiguousarray(t)
            continue
        scale = np.abs(t).max(axis=1) / 127.0
        scale[scale == 0] = 1.0
        out[name] = np.clip(np.rint(t / scale[:, None]), -127, 127).astype(np.int8)
        out[name + ".scale"] = scale.astype(np.float32)
    return out


# ---------------------------------------------------------------- the bundle


@dataclass
class Bundle:
    """A bundle in memory: its manifest, graph and stored tensors (views of the mapped file once loaded)."""

    name: str
    graph: Graph
    dtype: str
    tensors: dict[str, np.ndarray]  # stored names → arrays (incl. ".scale" companions)
    tokenizer: Path | None = None  # BERT: the tokenizer.json to use
    text: dict[str, Any] | None = None  # BERT: max_seq_length, truncate, pad_token_id
    accuracy: dict[str, Any] | None = None
    source: dict[str, Any] = field(default_factory=dict)

    def manifest(self, weights_sha256: str) -> dict[str, Any]:
        m: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "kind": self.graph.kind,
            "dtype": self.dtype,
            "config": self.graph.config,
            "tensors": self.graph.names,
            "weights": {"file": WEIGHTS, "sha256": weights_sha256},
            "accuracy": self.accuracy,
            "source": self.source,
        }
        if self.text is not None:
            m["text"] = {"tokenizer": TOKENIZER, **self.text}
        return m

    def engine_tensors(self) -> list[tuple[int, np.ndarray, np.ndarray | None]]:
        """(dtype code, data, scales or None) per tensor, in engine order."""
        out = []
        for name in self.graph.names:
            data = self.tensors[name]
            out.append((_ENGINE_DTYPE_CODES[data.dtype], data, self.tensors.get(name + ".scale")))
        return out

    def with_dtype(self, dtype: str) -> Bundle:
        """The same model stored in another precision (from an FP32 bundle)."""
        assert self.dtype == "fp32", "quantize from the FP32 weights"
        return replace(self, dtype=dtype, tensors=quantize(self.tensors, dtype), accuracy=None)


# ---------------------------------------------------------------- shell: reading models and bundles


_SAFETENSORS_NUMPY = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "U8": np.uint8,
                      "I16": np.int16, "I32": np.int32, "I64": np.int64, "BOOL": np.bool_}  # fmt: skip


def as_array(buffer: Any, dtype: str, shape: Sequence[int], offset: int, name: str) -> np.ndarray:
    """A safetensors tensor as a numpy view of `buffer` (BF16, which numpy lacks, widened to FP32)."""
    count = int(np.prod(shape, dtype=np.int64))
    if dtype == "BF16":
        raw = np.frombuffer(buffer, dtype=np.uint16, count=count, offset=offset)
        return (raw.astype(np.uint32) << 16).view(np.float32).reshape(shape)
    np_dtype = _SAFETENSORS_NUMPY.get(dtype)
    if np_dtype is None:
        raise BundleError(f"tensor {name!r} is {dtype}, which the edge cannot read")
    return np.frombuffer(buffer, dtype=np_dtype, count=count, offset=offset).reshape(shape)


def map_file(path: Path) -> mmap.mmap | bytes:
    """A file's bytes, mapped read-only (b"" when it is empty: an empty file cannot be mapped)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    except OSError as e:
        raise BundleError(f"{path}: cannot read: {e.strerror}") from None


def parse_safetensors(mapping: mmap.mmap | bytes, path: Path) -> dict[str, np.ndarray]:
    """The tensors of a mapped safetensors file as read-only numpy views of the mapping (BF16 widened to FP32)."""
    from warmpod.safetensors_header import PREFIX_BYTES, header_length, parse_header

    try:
        n = header_length(bytes(mapping[:PREFIX_BYTES]), path.name)
        header = parse_header(bytes(mapping[PREFIX_BYTES : PREFIX_BYTES + n]), path.name, len(mapping))
    except InvalidWeights as e:
        raise BundleError(str(e)) from None
    return {t.name: as_array(mapping, t.dtype, t.shape, header.data_start + t.begin, t.name) for t in header.tensors}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """A safetensors file's tensors as read-only numpy views of its mapping (BF16 widened to FP32)."""
    return parse_safetensors(map_file(path), path)


@dataclass(frozen=True)
class ModelFiles:
    """A model to compile: where its files are, and its tensors (from a directory or a staged store version)."""

    name: str
    file_path: Callable[[str], Path]
    load_tensors: Callable[[], dict[str, np.ndarray]]
    source: dict[str, Any]


@bundle_errors
def model_directory(path: Path, name: str | None = None) -> ModelFiles:
    """A directory with config.json and *.safetensors (a checkout, a volume, an unpacked package)."""
    files = sorted(path.glob("*.safetensors"))
    if not path.is_dir():
        raise BundleError(f"{path} is not a directory (a model directory or an edge bundle)")
    if not files:
        raise BundleError(f"{path}: no *.safetensors files; warmpod reads safetensors only (never pickle)")

    def load() -> dict[str, np.ndarray]:
        tensors: dict[str, np.ndarray] = {}
        for f in files:
            tensors.update(read_safetensors(f))
        return tensors

    return ModelFiles(name or path.name, lambda rel: path / rel, load, {"directory": str(path)})


@bundle_errors
def staged_version(store: Path, model: str, name: str | None = None) -> ModelFiles:
    """The current published version of `model` in a warmpod store (read through its mapping, no copy), served as
    `name` (default: the model's name in the store)."""
    try:
        staged = open_model(store, model)
    except StoreError as e:
        raise BundleError(str(e)) from None

    def load() -> dict[str, np.ndarray]:
        return {n: as_array(staged.buffer(n), e.dtype, e.shape, 0, n) for n, e in staged.tensor_index.items()}

    source: dict[str, Any] = {"store": str(store), "model": model, "version": staged.version}
    if any(e.dtype == "BF16" for e in staged.tensor_index.values()):
        # bf16 (`warmpod load --dtype bf16`): widened to fp32 exactly; the bundle's precision is made from those.
        source["weights_dtype"] = "bf16"
        converted = conversion_source(staged.manifest)
        if converted is not None:
            source["converted_from"] = converted
    return ModelFiles(name or model, staged.file_path, load, source)


def source_note(source: Mapping[str, Any]) -> str | None:
    """What `warmpod edge compile` says of a bf16 source (None for any other): its weights are widened to fp32
    exactly, and the bundle's accuracy is measured against those, not against the fp32 it was converted from."""
    if source.get("weights_dtype") != "bf16":
        return None
    converted = f" (staged by the loader from {source['converted_from']})" if source.get("converted_from") else ""
    return (
        f"the store's weights are bf16{converted}: widened to fp32 exactly for the engine, which computes in "
        "fp32/fp16/int8; the bundle's error is measured against those bf16 values, not the original fp32 "
        "(bench/accuracy_bench.py measures bf16 against fp32)"
    )


@bundle_errors
def from_model(files: ModelFiles) -> Bundle:
    """An FP32 bundle of a model; ModelError naming the unsupported part when the engine cannot run it."""
    config = read_json_object(files.file_path("config.json"), "config.json")
    if config is None:
        raise BundleError(f"model {files.name!r}: no config.json; the edge picks the graph from its model_type")
    kind = config.get("model_type")
    what = f"model {files.name!r}"
    if kind == "mlp":
        graph = mlp_graph(MLPConfig.from_json(config))
        tensors = files.load_tensors()
        text = tokenizer = None
    elif kind == "bert":
        try:
            bert = BertConfig.from_json(config)
            sentence = read_sentence_files(files.file_path, bert)
        except (ModelError, BundleError) as e:
            raise BundleError(f"{what}: {e}") from None
        settings = sentence.settings
        graph = bert_graph(bert, settings)
        tensors, _ = select_encoder_tensors(files.load_tensors())
        tokenizer = files.file_path(sentence.tokenizer_file)
        text = {"max_seq_length": settings.max_seq_length, "truncate": settings.truncate,
                "pad_token_id": bert.pad_token_id}  # fmt: skip
    else:
        raise BundleError(
            f"{what}: model_type {kind!r} cannot run on the edge engine, which runs 'bert' encoders "
            "(sentence embeddings) and 'mlp' models"
        )
    fitted = fit_tensors(graph, tensors, what)
    not_float = [f"{n} ({t.dtype})" for n, t in fitted.items() if not np.issubdtype(t.dtype, np.floating)]
    if not_float:
        raise BundleError(
            f"{what}: the edge engine computes in floating point; these tensors are not: {', '.join(not_float)}"
        )
    f32 = {n: np.ascontiguousarray(t, dtype=np.float32) for n, t in fitted.items()}
    return Bundle(files.name, graph, "fp32", f32, tokenizer, text, None, files.source)


@bundle_errors
def write_bundle(bundle: Bundle, out: Path) -> Path:
    """Write the bundle directory atomically: a reader sees the whole bundle or none (rename of a finished dir)."""
    from safetensors.numpy import save_file

    out = out.absolute()
    if out.exists():
        raise BundleError(f"{out} already exists; choose a new output directory (bundles are never overwritten)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file({n: np.ascontiguousarray(t) for n, t in bundle.tensors.items()}, str(tmp / WEIGHTS))
        digest = _sha256(tmp / WEIGHTS)
        if bundle.tokenizer is not None:
            shutil.copyfile(bundle.tokenizer, tmp / TOKENIZER)
        (tmp / MANIFEST).write_text(json.dumps(bundle.manifest(digest), indent=2) + "\n", encoding="utf-8")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def is_bundle(path: Path) -> bool:
    return (path / MANIFEST).is_file()


@bundle_errors
def bundle_name(path: Path) -> str:
    """The model name a bundle serves (edge.json's `name`), else the directory's name (also for a model directory
    or a manifest that cannot be read: loading the bundle reports that properly)."""
    try:
        manifest = read_json_object(path / MANIFEST, MANIFEST)
    except ModelError:
        manifest = None
    name = (manifest or {}).get("name")
    return str(name) if name else path.name


@bundle_errors
def load_bundle(path: Path) -> Bundle:
    """Read and check a bundle; ModelError says exactly what does not fit (format, digest, graph vs weights)."""
    what = f"edge bundle {path}"
    manifest = read_json_object(path / MANIFEST, MANIFEST)
    if manifest is None:
        raise BundleError(f"{what}: no {MANIFEST}; build one with `warmpod edge compile`")
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{what}: {MANIFEST} is format {manifest.get('format')!r} version {manifest.get('format_version')!r}; "
            f"this warmpod reads {FORMAT!r} version {FORMAT_VERSION}"
        )
    dtype = manifest.get("dtype")
    if dtype not in DTYPES:
        raise BundleError(f"{what}: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    config = manifest.get("config")
    if not isinstance(config, dict):
        raise BundleError(f"{what}: {MANIFEST} has no config object")
    try:
        graph = graph_of(str(manifest.get("kind")), config)
    except (ModelError, BundleError) as e:
        raise BundleError(f"{what}: {e}") from None
    if manifest.get("tensors") != graph.names:
        raise BundleError(f"{what}: {MANIFEST} lists tensors that are not the {graph.kind} graph's, in its order")
    weights = path / WEIGHTS
    expected = (manifest.get("weights") or {}).get("sha256")
    if not weights.is_file():
        raise BundleError(f"{what}: {WEIGHTS} is missing")
    mapping = map_file(weights)  # hashed, then parsed: one read of the file
    if hashlib.sha256(mapping).hexdigest() != expected:
        raise BundleError(f"{what}: {WEIGHTS} does not match the sha256 in {MANIFEST} (changed or truncated)")
    stored = parse_safetensors(mapping, weights)
    _check_stored(graph, stored, dtype, what)
    tokenizer = text = None
    if graph.kind == "bert":
        text = manifest.get("text")
        if not isinstance(text, dict) or not (path / TOKENIZER).is_file():
            raise BundleError(f"{what}: a bert bundle needs {MANIFEST} 'text' settings and {TOKENIZER}")
        tokenizer = path / TOKENIZER
        text = {k: v for k, v in text.items() if k != "tokenizer"}
    name = str(manifest.get("name") or path.name)
    return Bundle(name, graph, dtype, stored, tokenizer, text, manifest.get("accuracy"), manifest.get("source") or {})


def _check_stored(graph: Graph, stored: Mapping[str, np.ndarray], dtype: str, what: str) -> None:
    scales = {n + ".scale" for n in graph.names if n in stored and stored[n].dtype == np.int8}
    fit_tensors(graph, {n: t for n, t in stored.items() if n not in scales}, what)
    allowed = {"fp32": (np.float32,), "fp16": (np.float16,), "int8": (np.int8, np.float32)}[dtype]
    for name, shape in graph.tensors:
        t = stored[name]
        if t.dtype.type not in allowed:
            raise BundleError(f"{what}: tensor {name} is {t.dtype}, not what a {dtype} bundle stores")
        if t.dtype == np.int8:
            scale = stored.get(name + ".scale")
            if len(shape) != 2 or scale is None or scale.shape != (shape[0],) or scale.dtype != np.float32:
                raise BundleError(f"{what}: int8 tensor {name} needs {name}.scale, F32 [{shape[0]}]")
