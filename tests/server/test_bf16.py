"""bf16 weights staged in the store and served: computed in bf16 on a CPU with native bf16 (zero copy from the
store's mapping), upcast to fp32 at start on one without (a private copy, said at start), and how close the
embeddings stay to fp32's.

The bf16 stores here are the real all-MiniLM-L6-v2 (and a generated MLP) with their float tensors converted to bf16
(tests/kit/precision.py, as `warmpod load --dtype bf16` stages them), staged by the loader. Which CPU path runs is
injected (`build_model(cpu=...)`), so both are tested on any machine; the subprocess server takes this machine's.
The accuracy figures over 500 sentences are bench/accuracy_bench.py's; here every sentence of a smaller set of the
same generator must stay within cosine 0.999 of fp32.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import torch
import tritonclient.http as triton
from safetensors.torch import save_file

from tests.kit.metrics import Scrape
from tests.kit.models import minilm_dir, mlp_reference, write_mlp
from tests.kit.precision import bf16_copy
from tests.kit.procmaps import mappings, smaps_kib
from tests.kit.procs import wait_until
from tests.kit.sentences import LENGTH_BANDS, retrieval_queries, sentences
from tests.kit.warmpod import WarmpodServer, result_json, run_load, stage
from warmpod.server.errors import ModelError
from warmpod.server.families import build_model
from warmpod.server.families.bert import BertEncoder, pad_batch
from warmpod.server.families.mlp import MLPModel
from warmpod.server.model import ServedModel
from warmpod.server.precision import (
    CpuBf16,
    conversion_source,
    cpu_flags,
    detect_cpu,
    native_bf16,
    plan_precision,
)
from warmpod.server.tensors import Tensor
from warmpod.store import StagedModel, open_model

MINILM = minilm_dir()
NATIVE = CpuBf16(("avx512_bf16",))
EMULATED = CpuBf16(())
MIN_COSINE = 0.999  # the bound for bf16 MiniLM embeddings against fp32
TEST_SENTENCES = 150  # of bench/accuracy_bench.py's 500 (same generator, same seed): about 3 s per precision
MiB = 1 << 20
INPUT = {"name": "input", "datatype": "FP32", "shape": [-1, 3]}

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu vme de pse tsc msr pae mce {extra} avx2 avx512f avx512bw
bugs\t\t: spectre_v1

processor\t: 1
flags\t\t: fpu vme de pse tsc msr pae mce {extra} avx2 avx512f avx512bw
"""


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fp32 MiniLM as "fp32", its bf16 copy as "bf16", and a bf16 MLP as "mlp" (its fp32 source kept)."""
    work = tmp_path_factory.mktemp("bf16")
    root = work / "store"
    stage(MINILM, root, "fp32")
    stage(bf16_copy(MINILM, work / "minilm-bf16"), root, "bf16")
    mlp = write_mlp(work / "mlp", (8, 32, 16, 4), seed=3)
    stage(bf16_copy(mlp, work / "mlp-bf16"), root, "mlp")
    return root


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return sentences(TEST_SENTENCES)


def built(store: Path, name: str, cpu: CpuBf16) -> ServedModel:
    return build_model(open_model(store, name), cpu=cpu)


@pytest.fixture(scope="module")
def fp32(store: Path) -> Iterator[BertEncoder]:
    model = built(store, "fp32", NATIVE)
    assert isinstance(model, BertEncoder)
    yield model
    model.close()


@pytest.fixture(scope="module")
def bf16(store: Path) -> Iterator[BertEncoder]:
    model = built(store, "bf16", NATIVE)
    assert isinstance(model, BertEncoder)
    yield model
    model.close()


@pytest.fixture(scope="module")
def fp32_vectors(fp32: BertEncoder, texts: list[str]) -> np.ndarray:
    return embed(fp32, texts)


def embed(model: ServedModel, texts: list[str]) -> np.ndarray:
    out: np.ndarray = model.run([model.prepare_texts(texts)])[0]["embedding"]
    return out


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    out: np.ndarray = (a64 * b64).sum(1) / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1))
    return out


def assert_within_cosine(got: np.ndarray, want: np.ndarray, texts: list[str], what: str) -> float:
    assert got.shape == want.shape and got.dtype == np.float32
    cos = cosines(got, want)
    worst = int(cos.argmin())
    assert cos[worst] >= MIN_COSINE, f"{what}: sentence {worst} ({texts[worst][:40]!r}...) cosine {cos[worst]:.6f}"
    return float(cos[worst])


# ---------------------------------------------------------------- the CPU, from /proc/cpuinfo (pure)


@pytest.mark.parametrize(
    ("extra", "native", "said"),
    [
        ("avx512_bf16 avx512_vnni", True, "this CPU has avx512_bf16"),
        ("amx_bf16 amx_tile amx_int8", True, "this CPU has amx_bf16"),
        ("avx512_bf16 amx_bf16 amx_tile", True, "this CPU has avx512_bf16 and amx_bf16"),
        ("avx512_vnni avx512_fp16", False, "this CPU has neither avx512_bf16 nor amx_bf16"),
        ("", False, "neither"),
    ],
)
def test_native_bf16_is_read_from_cpuinfo_flags(extra: str, native: bool, said: str) -> None:
    cpu = native_bf16(CPUINFO.format(extra=extra))
    assert cpu.native is native
    assert said in cpu.describe()


def test_cpuinfo_without_flags_is_not_native() -> None:
    assert cpu_flags("processor : 0\nmodel name : some ARM\n") == frozenset()
    assert not native_bf16("").native
    assert "avx512bw" in cpu_flags(CPUINFO.format(extra="")) and "bugs" not in cpu_flags(CPUINFO.format(extra=""))


def test_detect_cpu_reads_the_proc_root(tmp_path: Path) -> None:
    (tmp_path / "cpuinfo").write_text(CPUINFO.format(extra="amx_bf16"))
    assert detect_cpu(tmp_path).native
    (tmp_path / "cpuinfo").write_text(CPUINFO.format(extra="avx2"))
    assert not detect_cpu(tmp_path).native
    assert not detect_cpu(tmp_path / "missing").native  # unreadable: upcasting is always safe


# ---------------------------------------------------------------- the decision (pure)


def test_bf16_weights_are_computed_in_bf16_on_a_native_cpu() -> None:
    plan = plan_precision({"w": ("BF16", 2000), "ids": ("I64", 80)}, NATIVE, converted_from="F32")
    assert (plan.stored, plan.computed, plan.upcast, plan.private_bytes) == ("bf16", "bf16", False, 0)
    assert plan.describe() == (
        "weights bf16 (staged by the loader from F32), computed in bf16 (this CPU has avx512_bf16), "
        "zero copy from the store"
    )


def test_bf16_weights_are_upcast_on_a_cpu_without_bf16_and_the_cost_is_said() -> None:
    plan = plan_precision({"w": ("BF16", 3 * MiB), "b": ("BF16", MiB), "ids": ("I64", 80)}, EMULATED)
    assert (plan.stored, plan.computed, plan.upcast, plan.private_bytes) == ("bf16", "fp32", True, 8 * MiB)
    said = plan.describe()
    assert said.startswith("weights bf16 upcast to fp32 at start: this CPU has neither avx512_bf16 nor amx_bf16")
    assert "private copy of 8.0 MiB" in said and "the store's bf16 saving is lost on this node" in said
    assert "stage fp32 for such nodes" in said


@pytest.mark.parametrize("cpu", [NATIVE, EMULATED])
def test_other_dtypes_are_served_as_staged(cpu: CpuBf16) -> None:
    plan = plan_precision({"w": ("F32", 4000), "h": ("F16", 100)}, cpu)
    assert (plan.stored, plan.computed, plan.upcast, plan.private_bytes) == ("mixed: fp16+fp32",) * 2 + (False, 0)
    assert "this CPU" not in plan.describe()
    mixed = plan_precision({"w": ("BF16", 4000), "n": ("F32", 100)}, EMULATED)
    assert (mixed.stored, mixed.computed, mixed.private_bytes) == ("mixed: bf16+fp32", "fp32", 8000)


def test_the_loaders_conversion_record_names_the_source_dtype() -> None:
    record = {
        "dtype": "BF16",
        "files": {
            "model.safetensors": {"converted": {"F32": ["a", "b"]}, "kept": {"I64": ["ids"]}},
            "extra.safetensors": {"converted": {"F16": ["c"]}, "kept": {}},
        },
    }
    assert conversion_source({"conversion": record}) == "F16+F32"
    assert (
        conversion_source({"conversion": {"dtype": "BF16", "files": {"m.safetensors": {"converted": {"F32": 3}}}}})
        == "F32"
    )
    assert conversion_source({"conversion": {"from": "F32"}}) == "F32"
    assert conversion_source({"conversion": {"dtype": "BF16", "files": {}}}) is None
    assert conversion_source({"conversion": "bf16"}) is None and conversion_source({}) is None


# ---------------------------------------------------------------- MiniLM in bf16, on a native CPU


def test_bf16_minilm_stays_within_cosine_of_fp32_on_every_sentence(
    bf16: BertEncoder, fp32_vectors: np.ndarray, texts: list[str]
) -> None:
    lengths = [len(ids) for ids in bf16.prepare_texts(texts).data]
    assert min(lengths) <= 8 and max(lengths) >= 150, "the set must span short and long sentences"
    assert len(texts) % len(LENGTH_BANDS) == 0
    worst = assert_within_cosine(embed(bf16, texts), fp32_vectors, texts, "bf16 vs fp32")
    print(f"bf16 vs fp32 on {len(texts)} sentences ({min(lengths)}-{max(lengths)} tokens): min cosine {worst:.6f}")


def test_bf16_retrieval_ranks_like_fp32(bf16: BertEncoder, fp32: BertEncoder, texts: list[str]) -> None:
    """Top-1 nearest neighbour of perturbed queries among the test sentences: the same in bf16 as in fp32."""
    queries = retrieval_queries(texts, 40)
    top1 = {}
    for name, model in (("fp32", fp32), ("bf16", bf16)):
        corpus, q = embed(model, texts), embed(model, queries)
        top1[name] = (q @ corpus.T).argmax(1)
    agree = float((top1["fp32"] == top1["bf16"]).mean())
    assert agree >= 0.95, f"top-1 agreement {agree:.2f}"


def test_the_module_computes_in_bf16_without_a_silent_upcast(bf16: BertEncoder) -> None:
    """Every parameter is bf16 and every layer's output is bf16, padded batches (SDPA with a mask) included; only
    pooling is fp32, and the served embeddings are FP32 as declared."""
    module = bf16.module
    assert module is not None and bf16.precision is not None
    assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
    assert (bf16.precision.stored, bf16.precision.computed, bf16.precision.upcast) == ("bf16", "bf16", False)
    seen: dict[str, torch.dtype] = {}
    hooks = [
        m.register_forward_hook(lambda mod, args, out, name=name: seen.__setitem__(name, out.dtype))
        for name, m in module.named_modules()
        if isinstance(m, torch.nn.Linear | torch.nn.LayerNorm | torch.nn.Embedding) or name.endswith("attention.self")
    ]
    try:
        sequences = [s for s in bf16.prepare_texts(["a short one", "a much longer sentence " * 6]).data]
        ids, mask = pad_batch(sequences, 0)
        assert not bool(mask.all()), "the batch must be padded, so attention runs with a mask"
        with torch.inference_mode():
            hidden = module(ids, mask)
    finally:
        for hook in hooks:
            hook.remove()
    assert hidden.dtype == torch.bfloat16
    assert any(name.endswith("attention.self") for name in seen) and len(seen) > 40
    assert set(seen.values()) == {torch.bfloat16}, {n: d for n, d in seen.items() if d != torch.bfloat16}
    assert bf16.outputs[0].datatype == "FP32" and embed(bf16, ["x"]).dtype == np.float32


def test_bf16_parameters_are_views_of_the_read_only_store_mapping(bf16: BertEncoder, store: Path) -> None:
    staged = bf16.staged
    assert staged is not None and bf16.module is not None
    index = staged.tensor_index
    assert {e.dtype for e in index.values()} == {"BF16", "I64"}
    weights = os.path.realpath(staged.file_path("model.safetensors"))
    mapped = [m for m in mappings() if m.path == weights]
    assert mapped, f"{weights} is not mapped"
    for name, param in bf16.module.named_parameters():
        begin = param.data_ptr()
        end = begin + param.numel() * param.element_size()
        where = [m for m in mapped if m.start <= begin and end <= m.end]
        assert where, f"{name} at {begin:#x} is not inside a mapping of {weights}"
        assert where[0].perms == "r--s", f"{name} lies in a {where[0].perms} mapping, not a read-only shared one"
        assert where[0].offset + begin - where[0].start == index[name].begin, f"{name} is not at its manifest offset"
    assert bf16.precision is not None and bf16.precision.private_bytes == 0


# ---------------------------------------------------------------- on a CPU without bf16: upcast at start


def test_without_native_bf16_the_weights_are_upcast_to_private_fp32(
    store: Path, fp32_vectors: np.ndarray, texts: list[str]
) -> None:
    model = built(store, "bf16", EMULATED)
    try:
        assert isinstance(model, BertEncoder) and model.module is not None and model.precision is not None
        assert {p.dtype for p in model.module.parameters()} == {torch.float32}
        staged = model.staged
        assert staged is not None
        weights = os.path.realpath(staged.file_path("model.safetensors"))
        shared = [m for m in mappings() if m.path == weights]
        inside = [n for n, p in model.module.named_parameters() if any(m.start <= p.data_ptr() < m.end for m in shared)]
        assert not inside, f"upcast parameters must be private copies, these view the store: {inside[:3]}"
        bf16_bytes = sum(e.end - e.begin for e in staged.tensor_index.values() if e.dtype == "BF16")
        used = sum(p.numel() * 4 for p in model.module.parameters())
        assert model.precision.private_bytes == 2 * bf16_bytes >= used  # the pooler, unused, is counted too
        assert (model.precision.stored, model.precision.computed, model.precision.upcast) == ("bf16", "fp32", True)
        assert_within_cosine(embed(model, texts), fp32_vectors, texts, "bf16 upcast to fp32 vs fp32")
    finally:
        model.close()


# ---------------------------------------------------------------- the MLP family


@pytest.mark.parametrize("cpu", [NATIVE, EMULATED], ids=["native", "upcast"])
def test_bf16_mlp_serves_fp32_outputs_close_to_its_fp32_source(store: Path, cpu: CpuBf16) -> None:
    model = built(store, "mlp", cpu)
    try:
        assert isinstance(model, MLPModel) and model.module is not None
        want = torch.bfloat16 if cpu.native else torch.float32
        assert model.dtype == want and {p.dtype for p in model.module.parameters()} == {want}
        x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
        out = model.run([model.prepare({"input": Tensor("input", "FP32", x.shape, x)})])[0]
        assert {spec.name: spec.datatype for spec in model.outputs}["logits"] == "FP32"
        assert all(v.dtype == np.float32 for v in out.values() if v.dtype.kind == "f")
        source = store.parent / "mlp"
        reference = mlp_reference(source, x)
        scale = float(np.abs(reference).max())
        diff = float(np.abs(out["logits"] - reference).max())
        assert diff <= 0.03 * scale, f"bf16 logits differ from fp32 by {diff:.3g} (scale {scale:.3g})"
    finally:
        model.close()


# ---------------------------------------------------------------- a --factory module


def test_a_factory_module_must_be_built_in_the_weights_dtype(store: Path, tmp_path: Path) -> None:
    """The factory's module keeps its own dtypes: an fp32 module on bf16 weights is refused at start on a bf16 CPU,
    naming each tensor and the fix; upcast (a CPU without bf16) the weights fit it."""
    source = tmp_path / "linear"
    source.mkdir()
    weights = {"weight": torch.randn(2, 3).to(torch.bfloat16), "bias": torch.zeros(2, dtype=torch.bfloat16)}
    save_file(weights, str(source / "model.safetensors"))
    (source / "config.json").write_text(json.dumps({"in": 3, "out": 2, "inputs": [INPUT]}))
    stage(source, store, "linear")
    with pytest.raises(ModelError) as refused:
        build_model(open_model(store, "linear"), factory="tests.server.factories:linear", cpu=NATIVE)
    message = str(refused.value)
    assert "weight is (2, 3) torch.bfloat16, the model wants (2, 3) torch.float32" in message
    assert "build it in their dtype (a store staged with --dtype bf16: .to(torch.bfloat16))" in message
    model = build_model(open_model(store, "linear"), factory="tests.server.factories:linear", cpu=EMULATED)
    try:
        x = np.ones((1, 3), dtype=np.float32)
        out = model.run([model.prepare({"input": Tensor("input", "FP32", x.shape, x)})])[0]["output"]
        want = (weights["weight"].float() @ torch.ones(3)).numpy()
        assert np.allclose(out[0], want, atol=1e-5) and model.precision is not None and model.precision.upcast
    finally:
        model.close()


# ---------------------------------------------------------------- `warmpod serve` on the bf16 store, real clients


@pytest.fixture(scope="module")
def servers(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, WarmpodServer]]:
    logs = tmp_path_factory.mktemp("logs")
    with (
        WarmpodServer(store, "fp32", log_dir=logs) as fp32_server,
        WarmpodServer(store, "bf16", log_dir=logs) as bf16_server,
    ):
        yield {"fp32": fp32_server, "bf16": bf16_server}


def openai_vectors(server: WarmpodServer, model: str, texts: list[str]) -> np.ndarray:
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120) as client:
        data = client.embeddings.create(model=model, input=texts).data
    return np.array([d.embedding for d in data], dtype=np.float32)


def triton_vectors(server: WarmpodServer, model: str, texts: list[str]) -> np.ndarray:
    text = triton.InferInput("text", [len(texts)], "BYTES")
    text.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object), binary_data=True)
    with triton.InferenceServerClient(server.host_port, connection_timeout=120, network_timeout=120) as c:
        result = c.infer(model, [text], outputs=[triton.InferRequestedOutput("embedding", binary_data=True)])
    out: np.ndarray = result.as_numpy("embedding")
    return out


def test_warmpod_serve_on_a_bf16_store_answers_real_clients_close_to_fp32(
    servers: dict[str, WarmpodServer], texts: list[str]
) -> None:
    subset = texts[:60]
    want = openai_vectors(servers["fp32"], "fp32", subset)
    got_openai = openai_vectors(servers["bf16"], "bf16", subset)
    got_triton = triton_vectors(servers["bf16"], "bf16", subset)
    assert_within_cosine(got_openai, want, subset, "openai client, bf16 server vs fp32 server")
    assert_within_cosine(got_triton, want, subset, "tritonclient, bf16 server vs fp32 server")
    assert float(np.abs(got_openai - got_triton).max()) <= 1e-6  # one server, one answer whichever the protocol


def test_warmpod_serve_says_the_weights_precision_at_start(servers: dict[str, WarmpodServer]) -> None:
    cpu = detect_cpu()
    log = servers["bf16"].log()
    scrape = Scrape(servers["bf16"].url)
    if cpu.native:
        assert f"weights bf16, computed in bf16 ({cpu.describe()}), zero copy from the store" in log
        assert scrape.value("warmpod_model_weights_info", model="bf16", version="1", stored="bf16", computed="bf16")
        assert scrape.value("warmpod_model_private_weights_bytes", model="bf16") == 0
    else:
        assert "WARNING" in log and "weights bf16 upcast to fp32 at start" in log
        assert scrape.value("warmpod_model_weights_info", model="bf16", version="1", stored="bf16", computed="fp32")
        assert (scrape.value("warmpod_model_private_weights_bytes", model="bf16") or 0) > 80 * MiB
    assert "weights fp32, computed in fp32, zero copy from the store" in servers["fp32"].log()


def test_warmpod_serve_maps_the_bf16_file_shared_with_little_private_memory(
    servers: dict[str, WarmpodServer], store: Path
) -> None:
    """The bf16 server's weights are the store's pages (resident through the shared mapping, not one page copied
    on write); its anonymous (private) memory is no larger than the fp32 server's — no hidden fp32 copy of the
    87 MiB — where the CPU computes bf16 natively. (A tmpfs page counts as "dirty" in smaps even unwritten, and
    "Private_" there means mapped by this process alone, so the anonymous pages are what show a copy.)"""
    anonymous = {}
    for name, server in servers.items():
        weights = os.path.realpath(store / name / "current" / "model.safetensors")
        mapped = smaps_kib(server.pid, weights)
        size_kib = os.path.getsize(weights) // 1024
        assert mapped.get("Rss", 0) >= 0.9 * size_kib, f"{name}: {mapped} for a {size_kib} KiB file"
        assert mapped.get("Anonymous", 0) == 0, f"{name}: pages of the store copied on write: {mapped}"
        anonymous[name] = smaps_kib(server.pid)["Anonymous"] / 1024
    print(f"anonymous MiB: {json.dumps(anonymous)}")
    if detect_cpu().native:
        assert anonymous["bf16"] <= anonymous["fp32"] + 16, anonymous


# ---------------------------------------------------------------- with the loader's conversion record


def manifest_with_conversion(staged: StagedModel, record: dict[str, Any]) -> StagedModel:
    manifest = {**staged.manifest, "conversion": record}
    return StagedModel(staged.name, staged.version, staged.path, manifest, staged.maps)


def test_the_start_line_names_the_dtype_the_loader_converted_from(store: Path) -> None:
    record = {"dtype": "BF16", "files": {"model.safetensors": {"converted": {"F32": 4}, "kept": {}}}}
    staged = manifest_with_conversion(open_model(store, "mlp"), record)
    model = build_model(staged, cpu=NATIVE)
    try:
        assert model.precision is not None
        assert model.precision.describe().startswith("weights bf16 (staged by the loader from F32), computed in bf16")
    finally:
        model.close()


def test_a_store_converted_by_warmpod_load_dtype_bf16_is_served_in_bf16(
    servers: dict[str, WarmpodServer], store: Path, texts: list[str], tmp_path: Path
) -> None:
    """End to end through the loader's conversion: `warmpod load --dtype bf16` of the fp32 MiniLM, `warmpod serve`
    on it saying what the loader converted from, the same answers as the bf16 store made here (the same rounding),
    within cosine 0.999 of the fp32 server's."""
    loaded = result_json(run_load(MINILM, "--model", "loaded", "--store", store, "--dtype", "bf16"))
    staged = open_model(store, "loaded")
    assert {e.dtype for e in staged.tensor_index.values()} == {"BF16", "I64"}
    assert loaded["version"] == staged.version
    subset = texts[:30]
    with WarmpodServer(store, "loaded", log_dir=tmp_path) as server:
        got = openai_vectors(server, "loaded", subset)
        log = server.log()
    cpu = detect_cpu()
    said = "computed in bf16" if cpu.native else "upcast to fp32 at start"
    assert "weights bf16 (staged by the loader from F32)" in log and said in log
    assert float(np.abs(got - openai_vectors(servers["bf16"], "bf16", subset)).max()) <= 1e-6
    assert_within_cosine(got, openai_vectors(servers["fp32"], "fp32", subset), subset, "loader's bf16 vs fp32")


def test_restaging_as_bf16_swaps_in_without_a_restart(store: Path, texts: list[str], tmp_path: Path) -> None:
    """An fp32 model re-staged with `warmpod load --dtype bf16` is a new version: the running server swaps it in,
    and the weights metric moves from the fp32 version to the bf16 one."""
    stage(MINILM, store, "swap")
    subset = texts[:12]
    with WarmpodServer(store, "swap", log_dir=tmp_path) as server:
        before = openai_vectors(server, "swap", subset)
        result_json(run_load(MINILM, "--model", "swap", "--store", store, "--dtype", "bf16"))
        wait_until(lambda: "swapped swap: version 1 -> 2" in server.log(), timeout=60, what="version 2 swapped in")
        after = openai_vectors(server, "swap", subset)
        scrape = Scrape(server.url)
    computed = "bf16" if detect_cpu().native else "fp32"
    info = "warmpod_model_weights_info"
    assert scrape.value(info, model="swap", version="1", stored="fp32", computed="fp32") == 0
    assert scrape.value(info, model="swap", version="2", stored="bf16", computed=computed) == 1
    assert float(np.abs(after - before).max()) > 0  # the bf16 weights answer now
    assert_within_cosine(after, before, subset, "after the swap to bf16 vs fp32 before")
