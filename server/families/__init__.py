"""Model families: how staged files become a ServedModel.

The family is chosen from the staged `config.json`: `model_type` "bert" → sentence embeddings (`bert.py`),
"mlp" → MLP / classifier (`mlp.py`); or any nn.Module when the operator names a factory (`factory.py`).
"""

from __future__ import annotations

from warmpod.server.errors import ModelError
from warmpod.server.families.common import read_config
from warmpod.server.model import ServedModel
from warmpod.server.precision import CpuBf16, detect_cpu, served_tensors, staged_precision
from warmpod.store import StagedModel

BERT_TYPES = ("bert",)
FAMILIES = "model_type 'bert' (sentence embeddings) or 'mlp' (MLP / classifier)"


def build_model(
    staged: StagedModel, *, factory: str | None = None, truncate: bool | None = None, cpu: CpuBf16 | None = None
) -> ServedModel:
    """Build the served model on the staged (read-only, zero-copy) weights and run one warm-up forward.

    The model computes in the store's precision; bf16 weights on a CPU without native bf16 (`cpu`, default: this
    node's /proc/cpuinfo) are upcast to fp32 first (warmpod.server.precision), and `model.precision` says which.
    Raises ModelError with a message naming what is unknown, missing, extra or mis-shaped.
    """
    config_path = staged.file_path("config.json")
    config = read_config(config_path, required=factory is None)
    precision = staged_precision(staged, cpu if cpu is not None else detect_cpu())
    tensors = served_tensors(staged, precision)
    model: ServedModel
    if factory is not None:
        from warmpod.server.families.factory import FactoryModel

        model = FactoryModel.from_staged(staged.name, staged, config, factory, tensors=tensors)
    elif config.get("model_type") in BERT_TYPES:
        from warmpod.server.families.bert import BertEncoder

        model = BertEncoder.from_staged(staged.name, staged, config, truncate=truncate, tensors=tensors)
    elif config.get("model_type") == "mlp":
        from warmpod.server.families.mlp import MLPModel

        model = MLPModel.from_staged(staged.name, staged, config, tensors=tensors)
    else:
        raise ModelError(
            f"model {staged.name!r} version {staged.version}: unknown model_type {config.get('model_type')!r} in "
            f"config.json; warmpod serves {FAMILIES}, or any nn.Module with --factory package.module:function"
        )
    model.precision = precision
    try:
        model.warm_up()
    except ModelError:
        raise
    except Exception as e:  # a forward that cannot run on a valid request means the model is broken, not the request
        raise ModelError(
            f"model {staged.name!r} version {staged.version}: the warm-up forward failed: {type(e).__name__}: {e}"
        ) from e
    return model
