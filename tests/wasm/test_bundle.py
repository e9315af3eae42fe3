"""`warmpod edge compile`: model directories and staged versions → bundles in three precisions (error reported),
and every model or bundle the engine cannot run refused with a message naming the part that does not fit."""

from __future__ import annotations

import builtins
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tests.kit.models import write_mlp
from tests.kit.warmpod import child_env, stage
from tests.wasm.edgeutil import MINILM, epoch_threads, error_line, run_edge
from warmpod.server.errors import ModelError
from warmpod.server.families.mlp_spec import MLPConfig
from warmpod.wasm.app import EdgeConfig, load_edge
from warmpod.wasm.bundle import (
    FORMAT,
    BundleError,
    from_model,
    graph_of,
    load_bundle,
    model_directory,
    quantize,
    write_bundle,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def minilm_bundle(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "minilm"
    proc = run_edge("compile", MINILM, "-o", out, "--name", "all-MiniLM-L6-v2", cache=cache)
    assert proc.returncode == 0, proc.stderr
    return out


def test_minilm_fp32_bundle(minilm_bundle: Path) -> None:
    manifest = json.loads((minilm_bundle / "edge.json").read_text())
    assert manifest["format"] == FORMAT and manifest["kind"] == "bert" and manifest["dtype"] == "fp32"
    assert manifest["name"] == "all-MiniLM-L6-v2"
    assert manifest["config"]["pooling"] == "mean" and manifest["config"]["normalize"] is True
    assert manifest["text"] == {"tokenizer": "tokenizer.json", "max_seq_length": 256, "truncate": True,
                                "pad_token_id": 0}  # fmt: skip
    assert len(manifest["tensors"]) == 5 + 16 * 6
    assert (minilm_bundle / "tokenizer.json").read_bytes() == (MINILM / "tokenizer.json").read_bytes()
    bundle = load_bundle(minilm_bundle)
    source = load_file(str(MINILM / "model.safetensors"))
    for name in bundle.graph.names:  # the weights, bit for bit; the unused pooler and position_ids left out
        np.testing.assert_array_equal(bundle.tensors[name], source[name])
    assert not any(n.startswith("pooler.") for n in bundle.tensors)


@pytest.mark.parametrize(("dtype", "bound", "ratio"), [("fp16", 2e-3, 0.55), ("int8", 5e-2, 0.3)])
def test_lower_precisions_report_their_error(
    tmp_path: Path, cache: Path, minilm_bundle: Path, dtype: str, bound: float, ratio: float
) -> None:
    out = tmp_path / dtype
    proc = run_edge("compile", MINILM, "-o", out, "--dtype", dtype, cache=cache)
    assert proc.returncode == 0, proc.stderr
    accuracy = json.loads((out / "edge.json").read_text())["accuracy"]
    assert accuracy["against"] == "fp32" and accuracy["probe"] == "6 texts"
    assert 0 < accuracy["max_abs_error"] < bound
    assert 0.99 < accuracy["min_cosine"] < 1.0
    assert f"max abs error vs fp32 {accuracy['max_abs_error']:.3g}" in proc.stdout
    size = (out / "weights.safetensors").stat().st_size
    assert size < ratio * (minilm_bundle / "weights.safetensors").stat().st_size


def test_max_error_refuses_and_writes_nothing(tmp_path: Path, cache: Path) -> None:
    proc = run_edge("compile", MINILM, "-o", tmp_path / "b", "--dtype", "int8", "--max-error", "1e-6", cache=cache)
    assert proc.returncode == 5
    assert "int8 outputs differ from fp32 by" in error_line(proc)
    assert "more than --max-error 1e-06; nothing written" in error_line(proc)
    assert list(tmp_path.iterdir()) == []


def test_compile_from_a_staged_version(tmp_path: Path, cache: Path) -> None:
    store = tmp_path / "store"
    mlp = write_mlp(tmp_path / "src", (4, 8, 3))
    version = stage(mlp, store, "iris")
    proc = run_edge("compile", "--store", store, "--model", "iris", "-o", tmp_path / "b", cache=cache)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "b" / "edge.json").read_text())
    assert manifest["name"] == "iris" and manifest["source"]["version"] == version
    assert manifest["config"]["sizes"] == [4, 8, 3]
    named = tmp_path / "named"
    proc = run_edge("compile", "--store", store, "--model", "iris", "--name", "flowers", "-o", named, cache=cache)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((named / "edge.json").read_text())
    assert manifest["name"] == "flowers" and manifest["source"]["model"] == "iris"


def test_fp32_needs_no_engine_lower_precisions_run_it(tmp_path: Path, cache: Path) -> None:
    """FP32 has no error to measure, so the engine is not even compiled; fp16 and int8 are measured on it."""
    mlp, missing = write_mlp(tmp_path / "src", (4, 8, 3)), tmp_path / "missing.wasm"
    proc = run_edge("compile", mlp, "-o", tmp_path / "b", "--engine", missing, cache=cache)
    assert proc.returncode == 0, proc.stderr
    proc = run_edge("compile", mlp, "-o", tmp_path / "c", "--engine", missing, "--dtype", "fp16", cache=cache)
    assert proc.returncode == 5
    assert f"engine module {missing}: cannot read: No such file or directory" in error_line(proc)
    assert not (tmp_path / "c").exists()


def test_compile_never_imports_torch(tmp_path: Path, cache: Path) -> None:
    """The edge runs where torch is not installed: compile (engine included) with torch made unimportable."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from warmpod.wasm.cli import main\n"
        f"sys.exit(main(['compile', {str(MINILM)!r}, '-o', {str(tmp_path / 'b')!r}, '--dtype', 'fp16',"
        f" '--cache-dir', {str(cache)!r}]))"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# ------------------------------------------------------------------------------- models the engine cannot run


def _minilm_copy(tmp_path: Path, **config_changes: object) -> Path:
    src = tmp_path / "model"
    shutil.copytree(MINILM, src)
    config = json.loads((src / "config.json").read_text())
    config.update(config_changes)
    (src / "config.json").write_text(json.dumps(config))
    return src


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model_type": "gpt2"}, "model_type 'gpt2' cannot run on the edge engine, which runs 'bert' encoders"),
        ({"hidden_act": "silu"}, "hidden_act 'silu' is not supported"),
        ({"position_embedding_type": "relative_key"}, "position_embedding_type 'relative_key' is not supported"),
        (
            {"intermediate_size": 1024},
            "the weights do not match the bert graph — mis-shaped tensors: "
            "encoder.layer.0.intermediate.dense.weight is [1536, 384], the graph wants [1024, 384]",
        ),
        ({"num_hidden_layers": 7}, "missing tensors: encoder.layer.6.attention.self.query.weight"),
    ],
)
def test_unsupported_models_name_the_part(
    tmp_path: Path, cache: Path, changes: dict[str, object], message: str
) -> None:
    proc = run_edge("compile", _minilm_copy(tmp_path, **changes), "-o", tmp_path / "b", cache=cache)
    assert proc.returncode == 5
    assert message in error_line(proc)
    assert not (tmp_path / "b").exists()


def test_unsupported_pooling_names_the_mode(tmp_path: Path, cache: Path) -> None:
    src = _minilm_copy(tmp_path)
    pooling = json.loads((src / "1_Pooling" / "config.json").read_text())
    pooling.update(pooling_mode_mean_tokens=False, pooling_mode_weightedmean_tokens=True)
    (src / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    proc = run_edge("compile", src, "-o", tmp_path / "b", cache=cache)
    assert proc.returncode == 5
    assert "mode weightedmean is not supported" in error_line(proc)


def test_integer_weights_and_missing_files_are_refused(tmp_path: Path, cache: Path) -> None:
    mlp = write_mlp(tmp_path / "mlp", (4, 8, 3))
    weights = load_file(str(mlp / "model.safetensors"))
    weights["layers.0.weight"] = weights["layers.0.weight"].astype(np.int32)
    save_file(weights, str(mlp / "model.safetensors"))
    proc = run_edge("compile", mlp, "-o", tmp_path / "b", cache=cache)
    assert proc.returncode == 5
    assert "computes in floating point; these tensors are not: layers.0.weight (int32)" in error_line(proc)

    (tmp_path / "empty").mkdir()
    proc = run_edge("compile", tmp_path / "empty", "-o", tmp_path / "c", cache=cache)
    assert proc.returncode == 5 and "no *.safetensors files" in error_line(proc)


def test_tokenizer_that_cannot_be_loaded_is_named(tmp_path: Path, cache: Path) -> None:
    src = _minilm_copy(tmp_path)
    (src / "tokenizer.json").write_text('{"model": 1}')
    proc = run_edge("compile", src, "-o", tmp_path / "b", cache=cache)
    assert proc.returncode == 5
    assert "model 'model': tokenizer.json cannot be loaded: data did not match" in error_line(proc)


def test_usage_errors(tmp_path: Path, cache: Path, minilm_bundle: Path) -> None:
    proc = run_edge("compile", "-o", tmp_path / "b", cache=cache)
    assert proc.returncode == 2 and "give a model directory, or --store and --model" in error_line(proc)
    proc = run_edge("compile", MINILM, "-o", minilm_bundle, cache=cache)
    assert proc.returncode == 5 and "already exists; choose a new output directory" in error_line(proc)
    proc = run_edge("compile", MINILM, "-o", tmp_path / "b", "--dtype", "int4", cache=cache)
    assert proc.returncode == 2 and "invalid choice: 'int4'" in proc.stderr
    proc = run_edge("frobnicate", cache=cache)
    assert proc.returncode == 2 and "unknown command 'frobnicate'" in proc.stderr


# ------------------------------------------------------------------------------- bundles that do not fit


def _copy(bundle: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(bundle, out)
    return out


def _edit_manifest(bundle: Path, **changes: object) -> None:
    manifest = json.loads((bundle / "edge.json").read_text())
    for key, value in changes.items():
        if key.startswith("config_"):
            manifest["config"][key.removeprefix("config_")] = value
        else:
            manifest[key] = value
    (bundle / "edge.json").write_text(json.dumps(manifest))


def test_bundle_with_changed_weights_is_refused(tmp_path: Path, minilm_bundle: Path) -> None:
    bundle = _copy(minilm_bundle, tmp_path)
    with open(bundle / "weights.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x00\x80\x7f")
    with pytest.raises(BundleError, match=r"does not match the sha256 in edge\.json"):
        load_bundle(bundle)


def test_bundle_weights_are_read_once_for_the_digest_and_the_tensors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = write_bundle(from_model(model_directory(write_mlp(tmp_path / "mlp", (4, 8, 3)))), tmp_path / "b")
    opened: list[str] = []
    real_open = builtins.open

    def counting_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(Path(file).name)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    loaded = load_bundle(bundle)
    assert opened.count("weights.safetensors") == 1
    assert loaded.graph.names == ["layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias"]


def test_bundle_whose_weights_do_not_match_its_graph(tmp_path: Path, minilm_bundle: Path) -> None:
    bundle = _copy(minilm_bundle, tmp_path)
    _edit_manifest(bundle, config_intermediate_size=1024)
    with pytest.raises(BundleError, match=r"mis-shaped tensors: encoder\.layer\.0\.intermediate\.dense\.weight is "
                                         r"\[1536, 384\], the graph wants \[1024, 384\]"):  # fmt: skip
        load_bundle(bundle)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"format_version": 2}, "this warmpod reads 'warmpod-edge' version 1"),
        ({"dtype": "int4"}, "dtype 'int4' is not one of fp32, fp16, int8"),
        ({"kind": "gpt"}, "kind 'gpt' is not one the engine runs"),
        ({"tensors": ["embeddings.word_embeddings.weight"]}, "lists tensors that are not the bert graph's"),
        ({"config_pooling": "weighted"}, "config.pooling must be one of mean, cls, max, mean_sqrt_len"),
    ],
)
def test_bundle_manifest_errors(tmp_path: Path, minilm_bundle: Path, changes: dict[str, object], message: str) -> None:
    bundle = _copy(minilm_bundle, tmp_path)
    _edit_manifest(bundle, **changes)
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"config_sizes": [4]}, r"edge\.json: config\.sizes must list at least two layer sizes, got \[4\]"),
        ({"config_sizes": [0, 8, 3]}, r"mlp config: 'input_size' must be a positive integer, got 0"),
        ({"config_activation": "swish"}, r"mlp config: activation 'swish' is not one of relu"),
        ({"config_labels": ["x"]}, r"mlp config: 'labels' must be 3 strings \(one per output\)"),
    ],
)
def test_mlp_bundle_config_errors(tmp_path: Path, changes: dict[str, object], message: str) -> None:
    bundle = write_bundle(from_model(model_directory(write_mlp(tmp_path / "mlp", (4, 8, 3)))), tmp_path / "b")
    _edit_manifest(bundle, **changes)
    with pytest.raises(BundleError, match=rf"edge bundle {re.escape(str(bundle))}: {message}"):
        load_bundle(bundle)


def test_bundle_without_tokenizer_or_manifest(tmp_path: Path, minilm_bundle: Path) -> None:
    bundle = _copy(minilm_bundle, tmp_path)
    (bundle / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match=r"a bert bundle needs edge\.json 'text' settings and tokenizer\.json"):
        load_bundle(bundle)
    (bundle / "edge.json").unlink()
    with pytest.raises(BundleError, match=r"no edge\.json; build one with `warmpod edge compile`"):
        load_bundle(bundle)


def test_bundle_whose_tokenizer_cannot_be_loaded_is_refused_leaving_no_engine(
    tmp_path: Path, minilm_bundle: Path, cache: Path
) -> None:
    bundle = _copy(minilm_bundle, tmp_path)
    (bundle / "tokenizer.json").write_text('{"model": 1}')
    before = epoch_threads()
    message = f"{bundle / 'tokenizer.json'} cannot be loaded: data did not match"  # the bundle's file, by its path
    with pytest.raises(ModelError, match=re.escape(message)):
        load_edge(EdgeConfig(bundle, cache_dir=cache), workers=1, deadline_s=10)
    assert epoch_threads() - before == set()


def test_int8_quantization_is_per_row_and_bounded() -> None:
    w = np.random.default_rng(0).standard_normal((16, 32)).astype(np.float32)
    w[3] = 0.0  # an all-zero row keeps a usable scale
    q = quantize({"w": w, "b": w[0]}, "int8")
    assert q["w"].dtype == np.int8 and q["w.scale"].shape == (16,) and q["b"].dtype == np.float32
    back = q["w"].astype(np.float32) * q["w.scale"][:, None]
    assert np.all(np.abs(back - w) <= q["w.scale"][:, None] / 2 + 1e-7)
    assert np.all(back[3] == 0)


def test_graph_round_trip() -> None:
    bundle = from_model(model_directory(MINILM))
    assert graph_of("bert", bundle.graph.config) == bundle.graph
    assert bundle.graph.words()[:7] == [30522, 384, 6, 12, 1536, 512, 2]


def test_mlp_graph_round_trip(tmp_path: Path) -> None:
    src = write_mlp(tmp_path / "mlp", (4, 8, 3), activation="tanh", labels=["a", "b", "c"])
    graph = from_model(model_directory(src)).graph
    assert graph.config == {"sizes": [4, 8, 3], "activation": "tanh", "output_activation": "softmax",
                            "labels": ["a", "b", "c"]}  # fmt: skip
    assert graph_of("mlp", graph.config) == graph
    spec = MLPConfig.from_json(json.loads((src / "config.json").read_text()))
    assert MLPConfig(**graph.config) == spec  # what EdgeMLP serves: the config.json's own MLPConfig
