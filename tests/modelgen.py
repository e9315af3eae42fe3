"""Moved to tests.kit.models. Kept only so that files still importing this name keep working while their owners move
them to tests.kit; nothing new imports it, and it goes once nothing does."""

from tests.kit.models import (
    MLP_ACTIVATIONS,
    mlp_forward,
    mlp_reference,
    mlp_tensors,
    raw_safetensors,
    sha256_file,
    tensors,
    tree_digests,
    write_model,
    write_model_dir,
    write_slow_dir,
)
from tests.kit.models import write_mlp as write_mlp_dir

__all__ = ["MLP_ACTIVATIONS", "mlp_forward", "mlp_reference", "mlp_tensors", "raw_safetensors", "sha256_file",
           "tensors", "tree_digests", "write_mlp_dir", "write_model", "write_model_dir", "write_slow_dir"]  # fmt: skip
