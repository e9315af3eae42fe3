"""The same engine and bundles under Node.js (wasm/node/edge.mjs, its WebAssembly API): outputs equal to the
wasmtime host's, and engine errors reported with exit 1."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tokenizers import Tokenizer

from tests.kit.models import write_mlp
from tests.wasm.edgeutil import MINILM, run_edge
from warmpod.server.model import Prepared
from warmpod.server.tensors import Tensor
from warmpod.wasm.app import EdgeConfig, load_edge

NODE = shutil.which("node")
HOST = Path(__file__).parents[2] / "wasm" / "node" / "edge.mjs"

pytestmark = [
    pytest.mark.skipif(NODE is None, reason="Node.js is not installed (the JS host needs `node` on PATH)"),
    pytest.mark.timeout(120),
]


def node(bundle: Path, request: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
    assert NODE is not None
    return subprocess.run([NODE, str(HOST), str(bundle), *args], input=json.dumps(request), capture_output=True,
                          text=True, timeout=60)  # fmt: skip


def outputs(proc: subprocess.CompletedProcess[str]) -> dict[str, np.ndarray]:
    assert proc.returncode == 0, proc.stderr
    return {k: np.array(v, dtype=np.float32) for k, v in json.loads(proc.stdout)["outputs"].items()}


def test_mlp_bundle_under_node_matches_wasmtime(tmp_path: Path, cache: Path) -> None:
    src = write_mlp(tmp_path / "mlp", (13, 32, 7), activation="gelu", output_activation="softmax")
    bundle = tmp_path / "bundle"
    assert run_edge("compile", src, "-o", bundle, "--dtype", "fp16", cache=cache).returncode == 0
    x = np.random.default_rng(0).standard_normal((5, 13)).astype(np.float32)
    got = outputs(node(bundle, {"input": x.tolist()}))
    edge = load_edge(EdgeConfig(bundle, cache_dir=cache), workers=1, deadline_s=10)
    (want,) = edge.run([edge.prepare({"input": Tensor("input", "FP32", x.shape, x)})])
    edge.close()
    for name in ("logits", "probabilities"):
        assert float(np.abs(got[name] - want[name]).max()) <= 1e-6, name


def test_minilm_bundle_under_node_matches_wasmtime(tmp_path: Path, cache: Path) -> None:
    bundle = tmp_path / "minilm"
    assert run_edge("compile", MINILM, "-o", bundle, cache=cache).returncode == 0
    tokenizer = Tokenizer.from_file(str(MINILM / "tokenizer.json"))
    texts = ["warm pods start fast", "a much longer sentence, padded in the same batch as the short one", "ok"]
    ids = [e.ids for e in tokenizer.encode_batch(texts)]
    got = outputs(node(bundle, {"ids": ids}))["embedding"]
    edge = load_edge(EdgeConfig(bundle, cache_dir=cache), workers=1, deadline_s=10)
    (want,) = edge.run([Prepared(rows=len(ids), data=ids, model=edge)])
    edge.close()
    assert got.shape == (3, 384)
    assert float(np.abs(got - want["embedding"]).max()) <= 1e-6


def test_engine_errors_exit_1_with_the_message(tmp_path: Path, cache: Path) -> None:
    bundle = tmp_path / "bundle"
    assert run_edge("compile", write_mlp(tmp_path / "mlp", (4, 8, 3)), "-o", bundle, cache=cache).returncode == 0
    manifest = json.loads((bundle / "edge.json").read_text())
    manifest["config"]["sizes"] = [4, 9, 3]  # the weights are [8, 4]: the engine refuses tensor 0
    (bundle / "edge.json").write_text(json.dumps(manifest))
    proc = node(bundle, {"input": [[0.0, 0.0, 0.0, 0.0]]})
    assert proc.returncode == 1
    assert "tensor 0" in proc.stderr and "expected" in proc.stderr
