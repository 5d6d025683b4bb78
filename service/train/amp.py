"""Mixed-precision policy: bf16 autocast on GPU by default, fp32 on CPU, fp16 with a scaler."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import get_args

import torch

from service.config import AmpMode


@dataclass
class Amp:
    """``autocast()`` for the forward pass; ``scaler`` only for fp16 (bf16 needs none)."""

    dtype: torch.dtype | None
    device_type: str
    scaler: torch.amp.GradScaler | None = None

    def autocast(self) -> AbstractContextManager:
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)


def amp_policy(mode: str, device: torch.device) -> Amp:
    """``train.amp``: auto (bf16 on GPU, off on CPU) | bf16 | fp16 | off."""
    if mode == "auto":
        mode = "bf16" if device.type == "cuda" else "off"
    if mode == "off":
        return Amp(None, device.type)
    if mode == "bf16":
        return Amp(torch.bfloat16, device.type)
    return Amp(torch.float16, device.type, torch.amp.GradScaler(device.type))


AMP_MODES = get_args(AmpMode)  # checked with the config's types (service.config)
