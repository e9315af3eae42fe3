"""User factories for the `--factory` family tests (importable as tests.server.factories:NAME)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class TwoHeads(nn.Module):
    """Two inputs, two outputs: a sum and a projection."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width, 2)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"total": (a + b).sum(dim=1, keepdim=True), "projected": self.proj(a * b)}


def two_heads(config: dict[str, Any]) -> nn.Module:
    return TwoHeads(int(config["width"]))


def linear(config: dict[str, Any]) -> nn.Module:
    return nn.Linear(int(config.get("in", 3)), int(config.get("out", 2)))


def broken(config: dict[str, Any]) -> nn.Module:
    raise ValueError("this factory always fails")


def not_a_module(config: dict[str, Any]) -> Any:
    return {"weight": 1}


NOT_CALLABLE = 42


class Slow(nn.Module):
    """A linear layer whose forward takes `sleep_s` (time.sleep releases the GIL, like a real forward pass)."""

    def __init__(self, sleep_s: float) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.sleep_s = sleep_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import time

        time.sleep(self.sleep_s)
        return self.proj(x)


def slow(config: dict[str, Any]) -> nn.Module:
    return Slow(float(config.get("sleep_s", 0.2)))
