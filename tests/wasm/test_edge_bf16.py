"""`warmpod edge compile` from a bf16 store (`warmpod load --dtype bf16`): the edge keeps its own fp32/fp16/int8
bundles, made from the bf16 weights widened to fp32 exactly, says that the source was bf16 (on stderr, in the
report line and in the bundle's edge.json), and the bundle served by `warmpod edge serve` stays within cosine 0.999
of the fp32 torch server on the generated test sentences (tests/kit/sentences.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openai
import pytest

from tests.kit.sentences import sentences
from tests.kit.warmpod import WarmpodServer, result_json, run_load, stage
from tests.wasm.edgeutil import MINILM, run_edge
from warmpod.wasm.bundle import source_note

MIN_COSINE = 0.999

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    stage(MINILM, root, "fp32")
    result_json(run_load(MINILM, "--model", "bf16", "--store", root, "--dtype", "bf16"))
    return root


@pytest.fixture(scope="module")
def compiled(store: Path, cache: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    out = tmp_path_factory.mktemp("bundles") / "bf16-fp16"
    proc = run_edge("compile", "--store", store, "--model", "bf16", "--dtype", "fp16", "-o", out, cache=cache)
    assert proc.returncode == 0, proc.stderr
    return out, proc.stdout, proc.stderr


def vectors(server: WarmpodServer, model: str, texts: list[str]) -> np.ndarray:
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120) as client:
        data = client.embeddings.create(model=model, input=texts).data
    return np.array([d.embedding for d in data], dtype=np.float64)


def test_compiling_a_bf16_store_says_the_source_was_bf16(compiled: tuple[Path, str, str]) -> None:
    bundle, stdout, stderr = compiled
    assert "the store's weights are bf16 (staged by the loader from F32): widened to fp32 exactly" in stderr
    assert "(bert, fp16, " in stdout and ", from bf16 weights)" in stdout
    manifest = json.loads((bundle / "edge.json").read_text())
    assert manifest["dtype"] == "fp16"
    assert manifest["source"]["weights_dtype"] == "bf16" and manifest["source"]["converted_from"] == "F32"


def test_sources_other_than_bf16_get_no_note() -> None:
    assert source_note({"store": "/s", "model": "m", "version": "1"}) is None
    assert source_note({"directory": "/m"}) is None
    note = source_note({"weights_dtype": "bf16"})
    assert note is not None and note.startswith("the store's weights are bf16: widened")


@pytest.fixture(scope="module")
def servers(
    store: Path, compiled: tuple[Path, str, str], cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[WarmpodServer, WarmpodServer]]:
    logs = tmp_path_factory.mktemp("logs")
    with (
        WarmpodServer(store, "fp32", log_dir=logs) as torch_fp32,
        WarmpodServer.edge(compiled[0], log_dir=logs, env={"WARMPOD_WASM_CACHE": str(cache)}) as edge,
    ):
        yield torch_fp32, edge


def test_the_bundle_from_bf16_serves_within_cosine_of_fp32(servers: tuple[WarmpodServer, WarmpodServer]) -> None:
    torch_fp32, edge = servers
    texts = sentences(60)
    want, got = vectors(torch_fp32, "fp32", texts), vectors(edge, "bf16", texts)  # served as the store names it
    cosine = (want * got).sum(1) / (np.linalg.norm(want, axis=1) * np.linalg.norm(got, axis=1))
    worst = int(cosine.argmin())
    assert cosine[worst] >= MIN_COSINE, f"sentence {worst} ({texts[worst][:40]!r}): cosine {cosine[worst]:.6f}"
