"""The BERT sentence-embedding family on the real all-MiniLM-L6-v2, staged by the loader and served zero-copy.

The reference vectors in data/minilm_reference.json were computed by sentence-transformers itself
(`SentenceTransformer(<model dir>, device="cpu")`, float32, one torch thread) with
`python tests/server/data/make_minilm_reference.py`; its "produced_by" field records the exact versions. CI has no
sentence-transformers: these tests only read the JSON.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.kit.models import minilm_dir
from tests.kit.procmaps import mappings
from tests.kit.warmpod import stage
from warmpod.server.errors import BadRequest, ModelError
from warmpod.server.families.bert import BertEncoder, BertModel, pool
from warmpod.server.families.sentence import BertConfig, pooling_mode, sentence_settings
from warmpod.server.model import Prepared
from warmpod.server.tensors import Tensor
from warmpod.store import StagedModel, open_model

MINILM = minilm_dir()
REFERENCE = Path(__file__).parent / "data" / "minilm_reference.json"
TOLERANCE = 1e-5
REPO = Path(__file__).resolve().parents[2]


def staged_from(source: Path, store: Path, name: str) -> StagedModel:
    stage(source, store, name)
    return open_model(store, name)


def text_tensor(*texts: bytes) -> dict[str, Tensor]:
    data = np.array(list(texts), dtype=object)
    return {"text": Tensor("text", "BYTES", data.shape, data)}


def max_diff(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape, f"shape {got.shape}, want {want.shape}"
    return float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max())


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(REFERENCE.read_text(encoding="utf-8"))
    doc["vectors"] = np.array(doc["embeddings"], dtype=np.float32)
    return doc


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    stage(MINILM, root, "minilm")
    return root


@pytest.fixture(scope="module")
def staged(store: Path) -> StagedModel:
    return open_model(store, "minilm")


@pytest.fixture(scope="module")
def encoder(staged: StagedModel) -> Iterator[BertEncoder]:
    config = json.loads(staged.file_path("config.json").read_text())
    model = BertEncoder.from_staged("minilm", staged, config)
    yield model
    model.close()


def embed(model: BertEncoder, texts: list[str]) -> np.ndarray:
    out: np.ndarray = model.run([model.prepare_texts(texts)])[0]["embedding"]
    return out


# ---------------------------------------------------------------- accuracy against sentence-transformers


def test_reads_the_sentence_transformers_files(encoder: BertEncoder) -> None:
    assert (encoder.settings.pooling, encoder.settings.normalize) == ("mean", True)
    assert (encoder.settings.max_seq_length, encoder.truncate) == (256, True)  # sentence_bert_config.json
    assert encoder.outputs[0].shape == (-1, 384) and encoder.is_text_embedding


def test_each_sentence_alone_matches_sentence_transformers(encoder: BertEncoder, reference: dict[str, Any]) -> None:
    for i, text in enumerate(reference["sentences"]):
        got = embed(encoder, [text])
        assert got.dtype == np.float32
        diff = max_diff(got[0], reference["vectors"][i])
        assert diff <= TOLERANCE, f"sentence {i} ({text[:30]!r}...): max abs diff {diff:.3g} > {TOLERANCE}"


def test_one_padded_batch_matches_sentence_transformers(encoder: BertEncoder, reference: dict[str, Any]) -> None:
    prepared = encoder.prepare_texts(reference["sentences"])
    lengths = [len(ids) for ids in prepared.data]
    assert len(set(lengths)) > 1, "the batch must need padding"
    assert prepared.rows == len(lengths) and prepared.tokens == sum(lengths)
    got = encoder.run([prepared])[0]["embedding"]
    diff = max_diff(got, reference["vectors"])
    assert diff <= TOLERANCE, f"batch of {len(lengths)} (lengths {lengths}): max abs diff {diff:.3g} > {TOLERANCE}"


def test_v2_bytes_input_is_utf8_decoded(encoder: BertEncoder, reference: dict[str, Any]) -> None:
    texts = reference["sentences"][2:5]  # ASCII, accents, CJK/Cyrillic
    prepared = encoder.prepare(text_tensor(*(t.encode() for t in texts)))
    assert prepared.data == encoder.prepare_texts(texts).data and prepared.model is encoder
    got = encoder.run([prepared])[0]["embedding"]
    assert max_diff(got, reference["vectors"][2:5]) <= TOLERANCE


def test_requests_in_one_run_get_exactly_their_own_rows(encoder: BertEncoder, reference: dict[str, Any]) -> None:
    sentences, vectors = reference["sentences"], reference["vectors"]
    # Requests of 1, 3, 6 and 1 texts, out of order, so a row landing in its neighbour's result would show.
    slices = [slice(3, 4), slice(0, 3), slice(4, 10), slice(10, 11)]
    results = encoder.run([encoder.prepare_texts(sentences[s]) for s in slices])
    assert len(results) == len(slices)
    for rows, result in zip(slices, results, strict=True):
        alone = encoder.run([encoder.prepare_texts(sentences[rows])])[0]["embedding"]
        diff = max_diff(result["embedding"], alone)
        assert diff <= TOLERANCE, f"rows {rows} differ from their own run by {diff:.3g}"
        diff = max_diff(result["embedding"], vectors[rows])
        assert diff <= TOLERANCE, f"rows {rows} differ from the reference by {diff:.3g}"


# ---------------------------------------------------------------- zero copy, read-only


def test_parameters_are_the_staged_read_only_mapping(encoder: BertEncoder, staged: StagedModel) -> None:
    assert encoder.module is not None
    index = staged.tensor_index
    weights = os.path.realpath(staged.file_path("model.safetensors"))
    mapped = [m for m in mappings() if m.path == weights]
    assert mapped, f"{weights} is not mapped"
    params = dict(encoder.module.named_parameters())
    unused = {"embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias"}
    assert set(params) == set(index) - unused and not list(encoder.module.buffers())
    for name, param in params.items():
        begin = param.data_ptr()
        end = begin + param.numel() * param.element_size()
        where = [m for m in mapped if m.start <= begin and end <= m.end]
        assert where, f"{name} at {begin:#x} is not inside a mapping of {weights}"
        start, perms, offset = where[0].start, where[0].perms, where[0].offset
        assert perms == "r--s", f"{name} lies in a {perms} mapping, not a read-only shared one"
        assert offset + (begin - start) == index[name].begin, f"{name} is not at its manifest offset"
        assert not param.requires_grad
    assert memoryview(staged.maps["model.safetensors"]).readonly


def test_writing_a_parameter_faults(store: Path) -> None:
    """The pages are PROT_READ: a write through a parameter kills the writer (in a child process, not us)."""
    script = (
        "import json, torch\n"
        "from warmpod.store import open_model\n"
        "from warmpod.server.families.bert import BertEncoder\n"
        f"staged = open_model({str(store)!r}, 'minilm')\n"
        "config = json.loads(staged.file_path('config.json').read_text())\n"
        "model = BertEncoder.from_staged('minilm', staged, config)\n"
        "weight = model.module.encoder.layer[0].attention.self.query.weight\n"
        "print('writing', flush=True)\n"
        "weight.numpy()[0, 0] = 1.0\n"
        "print('wrote')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60, env=_child_env()
    )
    assert proc.stdout.startswith("writing"), proc.stderr
    assert "wrote" not in proc.stdout
    assert proc.returncode in (-signal.SIGSEGV, -signal.SIGBUS), f"exit {proc.returncode}: {proc.stderr[-500:]}"


def _child_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("PYTHONFAULTHANDLER", None)
    return env


# ---------------------------------------------------------------- truncation


def test_long_text_is_truncated_like_sentence_transformers(encoder: BertEncoder, reference: dict[str, Any]) -> None:
    long_text = reference["sentences"][-1]
    assert reference["untruncated_tokens"][-1] > 512
    prepared = encoder.prepare_texts([long_text])
    assert len(prepared.data[0]) == 256 and prepared.data[0][-1] == 102  # [SEP] kept at the cut
    diff = max_diff(encoder.run([prepared])[0]["embedding"][0], reference["vectors"][-1])
    assert diff <= TOLERANCE, f"truncated sentence: max abs diff {diff:.3g}"


def test_without_truncation_a_text_over_the_position_limit_is_refused(
    staged: StagedModel, reference: dict[str, Any]
) -> None:
    config = json.loads(staged.file_path("config.json").read_text())
    model = BertEncoder.from_staged("minilm", staged, config, truncate=False)
    try:
        assert model.truncate is False and model.max_tokens == 512
        long_text = reference["sentences"][-1]
        tokens = reference["untruncated_tokens"][-1]
        with pytest.raises(BadRequest) as err:
            model.prepare(text_tensor(b"short", long_text.encode()))
        message = str(err.value)
        assert f"text 1 is {tokens} tokens long" in message and "512" in message, message
        medium = " ".join(long_text.split()[:300])  # over 256 tokens, under 512: served whole
        prepared = model.prepare_texts([medium])
        assert 256 < len(prepared.data[0]) <= 512
        assert model.run([prepared])[0]["embedding"].shape == (1, 384)
    finally:
        model.close()


# ---------------------------------------------------------------- bad requests


@pytest.mark.parametrize(
    ("inputs", "expected"),
    [
        pytest.param(
            {"text": Tensor("text", "FP32", (1,), np.zeros(1, np.float32))},
            "input 'text': datatype FP32 is not the model's BYTES",
            id="wrong-datatype",
        ),
        pytest.param(
            {**text_tensor(b"hi"), "image": Tensor("image", "FP32", (1,), np.zeros(1, np.float32))},
            "has no input named 'image'",
            id="unknown-input",
        ),
        pytest.param({}, "missing input 'text'", id="missing-input"),
        pytest.param(text_tensor(b"fine", b"caf\xe9"), "element 1 is not valid UTF-8", id="invalid-utf8"),
        pytest.param(text_tensor(), "empty batch", id="empty-batch"),
        pytest.param(
            {"text": Tensor("text", "BYTES", (1, 1), np.array([[b"x"]], dtype=object))},
            "shape [1, 1] does not match",
            id="wrong-shape",
        ),
    ],
)
def test_bad_inputs_are_refused_with_the_reason(encoder: BertEncoder, inputs: dict[str, Tensor], expected: str) -> None:
    with pytest.raises(BadRequest) as err:
        encoder.prepare(inputs)
    assert expected in str(err.value)
    assert err.value.status == 400


def test_empty_text_list_is_refused(encoder: BertEncoder) -> None:
    with pytest.raises(BadRequest, match="empty batch"):
        encoder.prepare_texts([])


# ---------------------------------------------------------------- generated models: names, consistency, config


TINY = {
    "model_type": "bert",
    "vocab_size": 30522,  # the real tokenizer.json's vocabulary
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
    "type_vocab_size": 2,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-12,
}


def write_tiny_bert(root: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any] | None = None) -> Path:
    """A BERT model directory: config.json, the real tokenizer.json, and the given weights (no modules.json)."""
    root.mkdir(parents=True)
    save_file(tensors, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps(config or TINY))
    shutil.copy(MINILM / "tokenizer.json", root / "tokenizer.json")
    return root


def tiny_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    module = BertModel(BertConfig.from_json(TINY))
    return {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}


def test_hf_names_are_normalised_and_unused_tensors_dropped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    weights = {f"bert.{k}": v for k, v in tiny_weights().items()}
    weights["bert.embeddings.position_ids"] = torch.arange(64).unsqueeze(0)
    weights["bert.pooler.dense.weight"] = torch.zeros(32, 32)
    weights["cls.predictions.bias"] = torch.zeros(30522)
    staged = staged_from(write_tiny_bert(tmp_path / "src", weights), tmp_path / "store", "tiny")
    with caplog.at_level(logging.INFO, logger="warmpod.server.families.bert"):
        model = BertEncoder.from_staged("tiny", staged, TINY)
    dropped = caplog.text
    for name in ("bert.embeddings.position_ids", "bert.pooler.dense.weight", "cls.predictions.bias"):
        assert name in dropped, dropped
    # No modules.json: mean pooling, no normalisation; tokenizer.json truncates (128), capped by the 64 positions.
    assert model.settings.pooling == "mean" and not model.settings.normalize
    assert model.truncate and model.max_tokens == 64
    out = model.run([model.prepare_texts(["one", "two words here " * 40])])[0]["embedding"]
    assert out.shape == (2, 32) and np.isfinite(out).all()
    model.close()


def test_inconsistent_weights_name_every_bad_tensor(tmp_path: Path) -> None:
    weights = tiny_weights()
    del weights["encoder.layer.1.intermediate.dense.bias"]
    weights["encoder.layer.2.output.dense.weight"] = torch.zeros(32, 64)
    weights["encoder.layer.0.attention.self.key.weight"] = torch.zeros(32, 16)
    staged = staged_from(write_tiny_bert(tmp_path / "src", weights), tmp_path / "store", "broken")
    with pytest.raises(ModelError) as err:
        BertEncoder.from_staged("broken", staged, TINY)
    message = str(err.value)
    assert "missing tensors: encoder.layer.1.intermediate.dense.bias" in message, message
    assert "unexpected tensors: encoder.layer.2.output.dense.weight" in message, message
    assert "encoder.layer.0.attention.self.key.weight is (32, 16)" in message, message
    assert "'broken'" in message


def test_unsupported_activation_is_named(tmp_path: Path) -> None:
    staged = staged_from(write_tiny_bert(tmp_path / "src", tiny_weights()), tmp_path / "store", "tiny")
    with pytest.raises(ModelError, match=r"hidden_act 'swish' is not supported"):
        BertEncoder.from_staged("tiny", staged, {**TINY, "hidden_act": "swish"})


# ---------------------------------------------------------------- pure rules


@pytest.mark.parametrize(
    ("config", "mode"),
    [
        (None, "mean"),
        ({"pooling_mode_mean_tokens": True}, "mean"),
        ({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}, "cls"),
        ({"pooling_mode_max_tokens": True}, "max"),
        ({"pooling_mode_mean_sqrt_len_tokens": True}, "mean_sqrt_len"),
        ({"pooling_mode": "mean_sqrt_len_tokens"}, "mean_sqrt_len"),
        ({"pooling_mode": ["cls"]}, "cls"),
    ],
)
def test_pooling_mode_from_config(config: dict[str, Any] | None, mode: str) -> None:
    assert pooling_mode(config) == mode


def test_unsupported_pooling_is_refused() -> None:
    with pytest.raises(ModelError, match="weightedmean"):
        pooling_mode({"pooling_mode_weightedmean_tokens": True})
    with pytest.raises(ModelError, match=r"cls \+ mean"):
        pooling_mode({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True})


def test_pooling_ignores_padding() -> None:
    hidden = torch.tensor([[[1.0, -2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert pool(hidden, mask, "cls").tolist() == [[1.0, -2.0]]
    assert pool(hidden, mask, "max").tolist() == [[3.0, 4.0]]
    assert pool(hidden, mask, "mean").tolist() == [[2.0, 1.0]]
    assert torch.allclose(pool(hidden, mask, "mean_sqrt_len"), torch.tensor([[4.0, 2.0]]) / 2**0.5)


def test_truncation_is_decided_by_the_files() -> None:
    config = BertConfig.from_json(TINY)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    pooling = {"pooling_mode_cls_token": True}
    sbert = sentence_settings(config, modules, pooling, {"max_seq_length": 40}, {"max_length": 128})
    assert (sbert.pooling, sbert.normalize, sbert.max_seq_length, sbert.truncate) == ("cls", True, 40, True)
    tok = sentence_settings(config, None, None, None, {"max_length": 20})
    assert (tok.pooling, tok.normalize, tok.max_seq_length, tok.truncate) == ("mean", False, 20, True)
    neither = sentence_settings(config, None, None, None, None)
    assert (neither.max_seq_length, neither.truncate) == (64, False)
    with pytest.raises(ModelError, match=r"Dense"):
        sentence_settings(config, [*modules, {"name": "3", "type": "sentence_transformers.models.Dense"}], pooling,
                          None, None)  # fmt: skip


def test_prepared_rows_and_tokens(encoder: BertEncoder) -> None:
    prepared = encoder.prepare(text_tensor(b"", b"hello world"))
    assert isinstance(prepared, Prepared)
    assert prepared.rows == 2 and prepared.data == [[101, 102], [101, 7592, 2088, 102]] and prepared.tokens == 6


def test_length_groups_bound_the_padding_and_cover_every_row() -> None:
    from warmpod.server.families.bert import length_groups

    lengths = [5, 120, 7, 118, 6, 60, 64, 5]
    groups = length_groups(lengths)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        padded = len(g) * max(lengths[i] for i in g)
        assert padded <= 1.25 * sum(lengths[i] for i in g)
    assert len(groups) == 3  # the short ones, the 60s, the 120s
    assert length_groups([9] * 40) == [list(range(40))]  # equal lengths: one group
