"""The torch-free half of the BERT sentence-embedding family: config.json and the sentence-transformers files made
sense of, tokenization and request validation. Shared by the torch encoder (`bert.py`) and the edge engine
(`wasm/`), which must accept exactly the same requests and produce the same embeddings; what only the torch forward
pass needs (padding, grouping a batch's rows by length) is in `bert.py`.

Truncation is decided by the files, like sentence-transformers: a `max_seq_length` in sentence_bert_config.json, or a
`truncation` section in tokenizer.json, turns it on (cut to max_seq_length tokens, specials included). Without
either, a text longer than `max_position_embeddings` tokens is refused with BadRequest instead of silently cut.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from warmpod.server.errors import BadRequest, ModelError
from warmpod.server.families.common import read_json, read_json_object
from warmpod.server.model import Prepared, ServedModel, check_inputs
from warmpod.server.tensors import Tensor, TensorSpec

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from warmpod.store import StagedModel

T = TypeVar("T")

POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len")
# sentence-transformers' legacy boolean keys in 1_Pooling/config.json → our mode names.
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
# The newer `pooling_mode` key spells one mode differently.
_POOLING_ALIASES = {"mean_sqrt_len_tokens": "mean_sqrt_len"}
ST_MODULES = ("Transformer", "Pooling", "Normalize")  # the sentence-transformers modules served, in this order
ACTIVATIONS = ("gelu", "relu", "gelu_new", "gelu_pytorch_tanh")
# Staged tensors the encoder has no use for: HF buffers, the NSP pooler, pre-training heads.
_UNUSED_EXACT = ("embeddings.position_ids", "embeddings.token_type_ids")
_UNUSED_PREFIXES = ("pooler.", "cls.")


# ---------------------------------------------------------------- pure core: config and files → settings


@dataclass(frozen=True)
class BertConfig:
    """The parts of an HF BERT `config.json` the encoder needs."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0

    @classmethod
    def from_json(cls, config: Mapping[str, Any]) -> BertConfig:
        """Validate config.json; ModelError names the key that is missing or wrong."""

        def positive(key: str, default: int | None = None) -> int:
            value = config.get(key, default)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ModelError(f"config.json: {key!r} must be a positive integer, got {value!r}")
            return value

        act = config.get("hidden_act", "gelu")
        if act not in ACTIVATIONS:
            raise ModelError(
                f"config.json: hidden_act {act!r} is not supported; warmpod's BERT supports {', '.join(ACTIVATIONS)}"
            )
        position_type = config.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ModelError(
                f"config.json: position_embedding_type {position_type!r} is not supported (only 'absolute')"
            )
        eps = config.get("layer_norm_eps", 1e-12)
        if not isinstance(eps, int | float) or isinstance(eps, bool) or eps <= 0:
            raise ModelError(f"config.json: 'layer_norm_eps' must be a positive number, got {eps!r}")
        pad = config.get("pad_token_id", 0)
        out = cls(
            vocab_size=positive("vocab_size"),
            hidden_size=positive("hidden_size"),
            num_hidden_layers=positive("num_hidden_layers"),
            num_attention_heads=positive("num_attention_heads"),
            intermediate_size=positive("intermediate_size"),
            max_position_embeddings=positive("max_position_embeddings"),
            type_vocab_size=positive("type_vocab_size", 2),
            hidden_act=act,
            layer_norm_eps=float(eps),
            pad_token_id=pad if isinstance(pad, int) and not isinstance(pad, bool) and pad >= 0 else 0,
        )
        if out.hidden_size % out.num_attention_heads:
            raise ModelError(
                f"config.json: hidden_size {out.hidden_size} is not a multiple of "
                f"num_attention_heads {out.num_attention_heads}"
            )
        return out


@dataclass(frozen=True)
class SentenceSettings:
    """How token states become one vector per text, and how long a text may be."""

    pooling: str  # one of POOLING_MODES
    normalize: bool
    max_seq_length: int  # tokens, [CLS] and [SEP] included
    truncate: bool  # what the files say; the model may override it


def _module_kind(entry: Mapping[str, Any]) -> str:
    """'Pooling' for 'sentence_transformers.models.Pooling' (and for newer module paths of the same class)."""
    return str(entry.get("type", "")).rsplit(".", 1)[-1]


def transformer_dir(modules: Sequence[Mapping[str, Any]] | None) -> str:
    """Where the Transformer module's own files (tokenizer, sentence_bert_config.json) are: '' is the root."""
    for entry in modules or ():
        if _module_kind(entry) == "Transformer":
            return str(entry.get("path", ""))
    return ""


def pooling_dir(modules: Sequence[Mapping[str, Any]] | None) -> str | None:
    """The Pooling module's directory, or None when there is no modules.json (mean pooling then)."""
    if modules is None:
        return None
    unsupported = [f"{m.get('name', '?')} ({m.get('type')})" for m in modules if _module_kind(m) not in ST_MODULES]
    if unsupported:
        raise ModelError(
            f"modules.json: unsupported sentence-transformers modules {', '.join(unsupported)}; warmpod serves "
            "Transformer → Pooling (→ Normalize)"
        )
    for entry in modules:
        if _module_kind(entry) == "Pooling":
            return str(entry.get("path", ""))
    raise ModelError("modules.json has no Pooling module: the model gives token vectors, not one vector per text")


def pooling_mode(pooling_config: Mapping[str, Any] | None) -> str:
    """The pooling mode of a sentence-transformers Pooling config (legacy boolean keys or `pooling_mode`)."""
    if pooling_config is None:
        return "mean"
    if "pooling_mode" in pooling_config:
        raw = pooling_config["pooling_mode"]
        modes = [raw] if isinstance(raw, str) else list(raw) if isinstance(raw, list) else [repr(raw)]
        modes = [_POOLING_ALIASES.get(m, m) for m in modes]
    else:
        modes = [mode for key, mode in _LEGACY_POOLING_KEYS.items() if pooling_config.get(key)]
    if not modes:
        return "mean"  # what sentence-transformers does when no mode is set
    if len(modes) > 1 or modes[0] not in POOLING_MODES:
        raise ModelError(
            f"pooling config: mode {' + '.join(map(str, modes))} is not supported; warmpod pools with exactly one of "
            f"{', '.join(POOLING_MODES)}"
        )
    return modes[0]


def sentence_settings(
    config: BertConfig,
    modules: Sequence[Mapping[str, Any]] | None,
    pooling_config: Mapping[str, Any] | None,
    sbert_config: Mapping[str, Any] | None,
    tokenizer_truncation: Mapping[str, Any] | None,
) -> SentenceSettings:
    """Decide pooling, normalisation, sequence limit and truncation from the model's files (None = file absent)."""
    if pooling_dir(modules) is not None and pooling_config is None:
        raise ModelError("modules.json names a Pooling module, but its config.json is not in the staged model")
    mode = pooling_mode(pooling_config)
    if pooling_config is not None:
        dim = pooling_config.get("word_embedding_dimension", pooling_config.get("embedding_dimension"))
        if dim is not None and dim != config.hidden_size:
            raise ModelError(
                f"pooling config: word_embedding_dimension {dim} is not the model's hidden_size {config.hidden_size}"
            )
    normalize = any(_module_kind(m) == "Normalize" for m in modules or ())
    limit = config.max_position_embeddings
    if sbert_config is not None and sbert_config.get("max_seq_length") is not None:
        length, truncate = sbert_config["max_seq_length"], True
    elif tokenizer_truncation is not None:
        length, truncate = tokenizer_truncation.get("max_length", limit), True
    else:
        length, truncate = limit, False
    if not isinstance(length, int) or isinstance(length, bool) or length < 2:
        raise ModelError(f"max_seq_length must be an integer of at least 2 (for [CLS] and [SEP]), got {length!r}")
    # A longer limit than the position table would index past it: the table is the hard limit.
    return SentenceSettings(mode, normalize, min(length, limit), truncate)


def select_encoder_tensors(tensors: Mapping[str, T]) -> tuple[dict[str, T], list[str]]:
    """Normalise HF names (strip `bert.`) and set aside what the encoder does not use; returns (kept, dropped)."""
    kept: dict[str, T] = {}
    dropped: list[str] = []
    for name, tensor in tensors.items():
        short = name.removeprefix("bert.")
        if short in _UNUSED_EXACT or short.startswith(_UNUSED_PREFIXES):
            dropped.append(name)
        else:
            kept[short] = tensor
    return kept, sorted(dropped)


@dataclass(frozen=True)
class SentenceFiles:
    """What a model's sentence-transformers files say: the settings, and its tokenizer (loaded, and where it is)."""

    settings: SentenceSettings
    tokenizer: Tokenizer
    tokenizer_file: str  # tokenizer.json relative to the model: in the Transformer module's directory


def load_tokenizer(path: Path, shown_as: str | None = None) -> Tokenizer:
    """A tokenizer.json loaded by the tokenizers library; ModelError naming the file (`shown_as`, else its path)."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises plain Exception subclasses
        raise ModelError(f"{shown_as or path} cannot be loaded: {e}") from None


def read_sentence_files(file_path: Callable[[str], Path], config: BertConfig) -> SentenceFiles:
    """The model's modules.json, Pooling config, sentence_bert_config.json and tokenizer.json, made sense of.

    `file_path` maps a path relative to the model ("1_Pooling/config.json") to where it is (staged or a directory).
    """

    def staged_object(rel: str) -> dict[str, Any] | None:
        return read_json_object(file_path(rel), rel)

    modules = read_json(file_path("modules.json"), "modules.json")
    if modules is not None and not (isinstance(modules, list) and all(isinstance(m, dict) for m in modules)):
        raise ModelError("modules.json must be a list of module objects")
    base = PurePosixPath(transformer_dir(modules))
    pool_dir = pooling_dir(modules)
    pooling_rel = None if pool_dir is None else str(PurePosixPath(pool_dir, "config.json"))
    pooling_config = None if pooling_rel is None else staged_object(pooling_rel)
    sbert_config = staged_object(str(base / "sentence_bert_config.json"))
    tokenizer_rel = str(base / "tokenizer.json")
    tokenizer_json = staged_object(tokenizer_rel)
    if tokenizer_json is None:
        raise ModelError(
            f"no {tokenizer_rel} in the model's files; warmpod needs the fast-tokenizer file "
            "(write it with save_pretrained of a transformers fast tokenizer)"
        )
    tokenizer = load_tokenizer(file_path(tokenizer_rel), tokenizer_rel)
    truncation = tokenizer_json.get("truncation")
    settings = sentence_settings(
        config, modules, pooling_config, sbert_config, truncation if isinstance(truncation, dict) else None
    )
    return SentenceFiles(settings, tokenizer, tokenizer_rel)


class TextEncoder(ServedModel):
    """Texts → one embedding per text: the inputs, outputs and request preparation (tokenization, validation).

    Subclasses give `run` (the forward pass, pooling, normalisation) and drop their engine in `close`.
    """

    family = "bert"

    def __init__(
        self,
        name: str,
        version: str,
        staged: StagedModel | None,
        config: BertConfig,
        settings: SentenceSettings,
        tokenizer: Tokenizer,
        *,
        truncate: bool | None = None,
    ) -> None:
        super().__init__(name, version, staged)
        self.config = config
        self.settings = settings
        self.truncate: bool = settings.truncate if truncate is None else truncate
        # The longest token sequence a request may bring: cut to it when truncating, refused beyond it otherwise.
        self.max_tokens = settings.max_seq_length if self.truncate else config.max_position_embeddings
        tokenizer.no_padding()  # we pad per batch, to its longest sequence
        if self.truncate:
            # What transformers' fast tokenizer sets for sentence-transformers (truncation="longest_first").
            tokenizer.enable_truncation(self.max_tokens, stride=0, strategy="longest_first", direction="right")
        else:
            tokenizer.no_truncation()
        self.tokenizer: Tokenizer | None = tokenizer

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec("text", "BYTES", (-1,)),)

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec("embedding", "FP32", (-1, self.config.hidden_size)),)

    @property
    def is_text_embedding(self) -> bool:
        return True

    def prepare(self, inputs: Mapping[str, Tensor]) -> Prepared:
        check_inputs(self.name, self.inputs, inputs)
        texts = []
        for i, item in enumerate(inputs["text"].data.reshape(-1)):
            if isinstance(item, str):
                texts.append(item)
            elif isinstance(item, bytes | bytearray | memoryview):
                try:
                    texts.append(bytes(item).decode("utf-8"))
                except UnicodeDecodeError as e:
                    raise BadRequest(
                        f"input 'text' element {i} is not valid UTF-8 ({e.reason} at byte {e.start}): "
                        "send UTF-8 encoded text"
                    ) from None
            else:
                raise BadRequest(f"input 'text' element {i} is {type(item).__name__}, not bytes")
        return self.prepare_texts(texts)

    def prepare_texts(self, texts: Sequence[str]) -> Prepared:
        if self.tokenizer is None:
            raise ModelError(f"model {self.name!r} is closed")
        if not texts:
            raise BadRequest(f"model {self.name!r}: no texts to embed (an empty batch); send at least one text")
        ids = [encoding.ids for encoding in self.tokenizer.encode_batch(list(texts))]
        for i, seq in enumerate(ids):
            if len(seq) > self.max_tokens:
                raise BadRequest(
                    f"text {i} is {len(seq)} tokens long, more than the {self.max_tokens} tokens model {self.name!r} "
                    "accepts (max_position_embeddings); this model does not truncate: shorten or split the text"
                )
        return Prepared(rows=len(ids), data=ids, tokens=sum(map(len, ids)), model=self)

    def example_inputs(self) -> dict[str, Tensor]:
        data = np.array([b"A warm-up sentence."], dtype=object)
        return {"text": Tensor("text", "BYTES", data.shape, data)}

    def close(self) -> None:
        self.tokenizer = None
        super().close()
