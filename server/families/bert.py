"""The BERT sentence-embedding family: a plain-torch BERT encoder on the staged weights, then pooling and
normalisation as the model's sentence-transformers files (modules.json, 1_Pooling/config.json) say.

The torch-free half — config, files, tokenization, request validation — is `sentence.py`, shared with the edge.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from warmpod.server.errors import ModelError
from warmpod.server.families.common import split_rows
from warmpod.server.families.sentence import (
    ACTIVATIONS,
    BertConfig,
    SentenceSettings,
    TextEncoder,
    read_sentence_files,
    select_encoder_tensors,
)
from warmpod.server.model import Prepared, assign_weights, build_on_meta

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from warmpod.store import StagedModel

logger = logging.getLogger(__name__)

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ---------------------------------------------------------------- the encoder (state_dict names are HF BertModel's)


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask, right-padded to the longest sequence of this batch."""
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


def length_groups(lengths: Sequence[int], max_padding: float = 0.25) -> list[list[int]]:
    """Split a batch's rows into groups of similar length, so padding stays under `max_padding` of the real tokens.

    Each group is padded to its own longest sequence. On a CPU a forward pass costs about as much per padded token
    as per real one, so one batch of a 5-token and a 120-token text would cost about twice the two alone; grouping
    keeps the merged requests' saving without paying for the padding. Returns row indices, shortest rows first.
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    groups: list[list[int]] = []
    real = 0
    for i in order:
        n = lengths[i]
        # sorted ascending: adding row i pads every row of the group to n tokens
        if groups and (len(groups[-1]) + 1) * n <= (1 + max_padding) * (real + n):
            groups[-1].append(i)
            real += n
        else:
            groups.append([i])
            real = n
    return groups


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """One vector per sequence from its token states, ignoring padding, as sentence-transformers' Pooling does."""
    if mode == "cls":
        return hidden[:, 0]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "max":
        return hidden.masked_fill(weights == 0, float("-inf")).max(dim=1).values
    summed = (hidden * weights).sum(dim=1)
    counts = torch.clamp(weights.sum(dim=1), min=1e-9)
    return summed / (counts if mode == "mean" else torch.sqrt(counts))


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name == "gelu":
        return F.gelu  # exact (erf), as HF's "gelu"
    if name == "relu":
        return F.relu
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    raise ModelError(f"bert: hidden_act {name!r} is not supported; warmpod's BERT supports {', '.join(ACTIVATIONS)}")


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        # Token type 0 everywhere (single sentences); same additions in the same order as HF.
        x = self.word_embeddings(input_ids) + self.token_type_embeddings.weight[0]
        x = x + self.position_embeddings(positions)
        out: torch.Tensor = self.LayerNorm(x)
        return out


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.heads = config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        batch, length, hidden = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.heads, hidden // self.heads).transpose(1, 2)

        context = F.scaled_dot_product_attention(
            heads(self.query(x)), heads(self.key(x)), heads(self.value(x)), attn_mask=mask
        )
        return context.transpose(1, 2).reshape(batch, length, hidden)


class BertSelfOutput(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.LayerNorm(self.dense(x) + residual)
        return out


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        out: torch.Tensor = self.output(self.self(x, mask), x)
        return out


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class BertOutput(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.LayerNorm(self.dense(x) + residual)
        return out


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        attended = self.attention(x, mask)
        out: torch.Tensor = self.output(self.intermediate(attended), attended)
        return out


class BertStack(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, mask)
        return x


class BertModel(nn.Module):
    """A BERT encoder (no pooler, no heads, inference only): token ids and attention mask → last hidden state."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertStack(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # Without padding, no mask: SDPA takes its faster path.
        mask = None if bool(attention_mask.all()) else attention_mask[:, None, None, :].bool()
        out: torch.Tensor = self.encoder(self.embeddings(input_ids), mask)
        return out


# ---------------------------------------------------------------- the served model (thin shell over the above)


class BertEncoder(TextEncoder):
    """Texts → one embedding per text (FP32, L2-normalised when the model's modules.json says so)."""

    def __init__(
        self,
        name: str,
        version: str,
        staged: StagedModel | None,
        config: BertConfig,
        settings: SentenceSettings,
        module: BertModel,
        tokenizer: Tokenizer,
        *,
        truncate: bool | None = None,
    ) -> None:
        super().__init__(name, version, staged, config, settings, tokenizer, truncate=truncate)
        self.module: BertModel | None = module

    @classmethod
    def from_staged(
        cls,
        name: str,
        staged: StagedModel,
        config: Mapping[str, Any],
        *,
        truncate: bool | None = None,
        tensors: Mapping[str, torch.Tensor] | None = None,
    ) -> BertEncoder:
        """Build the encoder on the staged weights (zero copy; or on `tensors`, the staged ones as
        warmpod.server.precision serves them) and read its sentence-transformers files. The module computes in the
        word embeddings' dtype (bf16 weights: a bf16 forward), pooling in fp32."""
        what = f"bert model {name!r} version {staged.version}"
        try:
            bert = BertConfig.from_json(config)
            files = read_sentence_files(staged.file_path, bert)
        except ModelError as e:
            raise ModelError(f"{what}: {e}") from None

        tensors, dropped = select_encoder_tensors(staged.tensors() if tensors is None else tensors)
        if dropped:
            logger.info("%s: tensors the encoder does not use, left unmapped: %s", what, ", ".join(dropped))
        word = tensors.get("embeddings.word_embeddings.weight")
        dtype = word.dtype if word is not None and word.dtype in FLOAT_DTYPES else torch.float32
        module = build_on_meta(lambda: BertModel(bert).to(dtype))
        assign_weights(module, tensors, what=what)
        assert isinstance(module, BertModel)
        return cls(name, staged.version, staged, bert, files.settings, module, files.tokenizer, truncate=truncate)

    def run(self, batch: Sequence[Prepared]) -> list[dict[str, np.ndarray]]:
        if self.module is None:
            raise ModelError(f"model {self.name!r} is closed")
        sequences: list[list[int]] = [seq for p in batch for seq in p.data]
        embeddings = np.empty((len(sequences), self.config.hidden_size), dtype=np.float32)
        with torch.inference_mode():
            for group in length_groups([len(s) for s in sequences]):
                ids, mask = pad_batch([sequences[i] for i in group], self.config.pad_token_id)
                hidden = self.module(ids, mask).float()  # pool in FP32 whatever the weights are
                vectors = pool(hidden, mask, self.settings.pooling)
                if self.settings.normalize:
                    vectors = F.normalize(vectors, p=2, dim=1)
                embeddings[group] = vectors.numpy()
        return split_rows(batch, {"embedding": embeddings})

    def close(self) -> None:
        self.module = None
        super().close()
