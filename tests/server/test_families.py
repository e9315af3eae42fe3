"""The MLP and --factory families on staged generated models: outputs, zero copy, and every inconsistency named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from tests.kit.models import mlp_reference, write_mlp
from tests.kit.procmaps import mapping_of
from tests.kit.warmpod import stage
from warmpod.server.errors import BadRequest, ModelError
from warmpod.server.families import build_model
from warmpod.server.tensors import Tensor
from warmpod.store import open_model

torch.set_num_threads(1)


def fp32(name: str, array: np.ndarray) -> Tensor:
    array = np.asarray(array, dtype=np.float32)
    return Tensor(name, "FP32", array.shape, array)


def staged_mlp(tmp_path: Path, **kwargs: object) -> tuple[Path, Path]:
    src = write_mlp(tmp_path / "src", **kwargs)  # type: ignore[arg-type]
    store = tmp_path / "store"
    stage(src, store, "mlp")
    return src, store


def test_mlp_outputs_match_numpy_and_each_request_gets_its_rows(tmp_path: Path) -> None:
    src, store = staged_mlp(tmp_path, sizes=(4, 16, 8, 3), labels=["a", "b", "c"])
    model = build_model(open_model(store, "mlp"))
    assert model.family == "mlp"
    assert [s.name for s in model.outputs] == ["logits", "probabilities", "label"]
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((n, 4)).astype(np.float32) for n in (1, 3, 2)]
    prepared = [model.prepare({"input": fp32("input", x)}) for x in xs]
    results = model.run(prepared)
    for x, out in zip(xs, results, strict=True):
        want = mlp_reference(src, x)
        np.testing.assert_allclose(out["logits"], want, atol=1e-5)
        probs = np.exp(want) / np.exp(want).sum(axis=1, keepdims=True)
        np.testing.assert_allclose(out["probabilities"], probs, atol=1e-5)
        assert list(out["label"]) == [b"abc"[i : i + 1] for i in want.argmax(axis=1)]


def test_mlp_parameters_are_the_read_only_mapping(tmp_path: Path) -> None:
    _, store = staged_mlp(tmp_path)
    staged = open_model(store, "mlp")
    model = build_model(staged)
    module = model.module  # type: ignore[attr-defined]
    index = staged.tensor_index
    base = np.frombuffer(staged.maps["model.safetensors"], dtype=np.uint8).ctypes.data
    for name, param in module.state_dict().items():
        assert param.data_ptr() == base + index[name].begin, name
        mapping = mapping_of(param.data_ptr())
        assert mapping.perms == "r--s", (name, mapping)  # read-only and shared: the staged file's pages, not a copy
        assert mapping.path == str(staged.path / "model.safetensors")


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ("drop", "missing tensors: layers.1.bias"),
        ("extra", "unexpected tensors: stray.weight"),
        ("reshape", "layers.0.weight is (3, 16) torch.float32, the model wants (16, 4) torch.float32"),
        ("dtype", "layers.0.bias is (16,) torch.float16, the model wants (16,) torch.float32"),
    ],
)
def test_inconsistent_weights_are_named(tmp_path: Path, change: str, named: str) -> None:
    src = write_mlp(tmp_path / "src", sizes=(4, 16, 3))
    weights = load_file(str(src / "model.safetensors"))
    if change == "drop":
        del weights["layers.1.bias"]
    elif change == "extra":
        weights["stray.weight"] = np.zeros(2, dtype=np.float32)
    elif change == "reshape":
        weights["layers.0.weight"] = np.zeros((3, 16), dtype=np.float32)
    else:
        weights["layers.0.bias"] = weights["layers.0.bias"].astype(np.float16)
    save_file(weights, str(src / "model.safetensors"))
    stage(src, tmp_path / "store", "mlp")
    with pytest.raises(ModelError) as e:
        build_model(open_model(tmp_path / "store", "mlp"))
    assert named in str(e.value)
    assert "do not fit the model" in str(e.value)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"model_type": "llama"}, "unknown model_type 'llama'"),
        ({"hidden_size": 3}, "unknown model_type None"),
        ({"model_type": "mlp", "input_size": 0, "output_size": 3}, "'input_size' must be a positive integer"),
        ({"model_type": "mlp", "input_size": 4, "output_size": 3, "activation": "swish"}, "activation 'swish'"),
        ({"model_type": "mlp", "input_size": 4, "output_size": 3, "labels": ["x"]}, "'labels' must be 3 strings"),
    ],
)
def test_bad_configs_fail_with_a_clear_message(tmp_path: Path, config: dict[str, object], message: str) -> None:
    src = write_mlp(tmp_path / "src", sizes=(4, 3))
    (src / "config.json").write_text(json.dumps(config))
    stage(src, tmp_path / "store", "m")
    with pytest.raises(ModelError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_model(open_model(tmp_path / "store", "m"))


def test_missing_config_names_the_ways_out(tmp_path: Path) -> None:
    src = write_mlp(tmp_path / "src", sizes=(4, 3))
    (src / "config.json").unlink()
    stage(src, tmp_path / "store", "m")
    with pytest.raises(ModelError, match=r"no config.json .* --factory package.module:function"):
        build_model(open_model(tmp_path / "store", "m"))


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"x": fp32("x", np.zeros((1, 4)))}, "has no input named 'x'"),
        ({}, "missing input 'input'"),
        ({"input": Tensor("input", "FP64", (1, 4), np.zeros((1, 4)))}, "datatype FP64 is not the model's FP32"),
        ({"input": fp32("input", np.zeros((1, 5)))}, "shape [1, 5] does not match the model's [-1, 4]"),
    ],
)
def test_mlp_bad_inputs(tmp_path: Path, inputs: dict[str, Tensor], message: str) -> None:
    _, store = staged_mlp(tmp_path, sizes=(4, 3))
    model = build_model(open_model(store, "mlp"))
    with pytest.raises(BadRequest) as e:
        model.prepare(inputs)
    assert message in str(e.value)
    with pytest.raises(BadRequest, match="does not take text"):
        model.prepare_texts(["hello"])


def factory_model_dir(tmp_path: Path, width: int = 3) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    save_file(
        {"proj.weight": rng.standard_normal((2, width)).astype(np.float32), "proj.bias": np.ones(2, np.float32)},
        str(src / "model.safetensors"),
    )
    io = {
        "width": width,
        "inputs": [{"name": "a", "datatype": "FP32", "shape": [-1, width]},
                   {"name": "b", "datatype": "FP32", "shape": [-1, width]}],
        "outputs": [{"name": "total", "datatype": "FP32", "shape": [-1, 1]},
                    {"name": "projected", "datatype": "FP32", "shape": [-1, 2]}],
    }  # fmt: skip
    (src / "config.json").write_text(json.dumps(io))
    return src


def test_factory_module_gets_config_and_serves_named_outputs(tmp_path: Path) -> None:
    src = factory_model_dir(tmp_path)
    stage(src, tmp_path / "store", "f")
    staged = open_model(tmp_path / "store", "f")
    model = build_model(staged, factory="tests.server.factories:two_heads")
    assert model.family == "factory"
    a, b = np.ones((2, 3), np.float32), np.full((2, 3), 2.0, np.float32)
    (out,) = model.run([model.prepare({"a": fp32("a", a), "b": fp32("b", b)})])
    np.testing.assert_allclose(out["total"], [[9.0], [9.0]])
    w = load_file(str(src / "model.safetensors"))
    np.testing.assert_allclose(out["projected"], (a * b) @ w["proj.weight"].T + w["proj.bias"], atol=1e-6)
    with pytest.raises(BadRequest, match="disagree on the batch dimension"):
        model.prepare({"a": fp32("a", a), "b": fp32("b", b[:1])})


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("no_colon", "expected 'package.module:function'"),
        ("tests.server.nowhere:f", "cannot import 'tests.server.nowhere'"),
        ("tests.server.factories:missing", "has no attribute 'missing'"),
        ("tests.server.factories:NOT_CALLABLE", "is not callable"),
        ("tests.server.factories:broken", "failed to build the module: ValueError: this factory always fails"),
        ("tests.server.factories:not_a_module", "returned dict, not a torch.nn.Module"),
        ("tests.server.factories:linear", "missing tensors: bias, weight; unexpected tensors: proj.bias, proj.weight"),
    ],
)
def test_factory_errors(tmp_path: Path, factory: str, message: str) -> None:
    stage(factory_model_dir(tmp_path), tmp_path / "store", "f")
    with pytest.raises(ModelError) as e:
        build_model(open_model(tmp_path / "store", "f"), factory=factory)
    assert message in str(e.value)


def test_factory_warm_up_failure_is_a_model_error(tmp_path: Path) -> None:
    src = factory_model_dir(tmp_path)
    (src / "config.json").write_text(json.dumps({"width": 3}))  # default I/O: one input of any shape → (1, 1)
    stage(src, tmp_path / "store", "f")
    with pytest.raises(ModelError, match="the warm-up forward failed"):
        build_model(open_model(tmp_path / "store", "f"), factory="tests.server.factories:two_heads")
