"""Mixed precision for inversion, fine-tuning and evaluation (`invert.precision`, `finetune.precision`
or a recipe's, `evaluate.precision`): fp32, bf16 or fp16.

bf16 and fp16 run the model's forward passes under `torch.autocast` on the model's device: the
weights stay fp32, matrix products and convolutions run in the half type (on a GPU, its tensor
cores), reductions and losses in fp32. An fp16 backward pass goes through `torch.amp.GradScaler`,
which scales the loss so half-precision gradients do not underflow and skips a step whose gradients
overflowed (bf16 has fp32's range and needs none). fp32, the default, runs as without this module,
bit for bit. tests/test_fast_paths.py states how far bf16 and fp16 results lie from fp32's.
"""
from __future__ import annotations

import contextlib

import torch

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """torch.autocast to `precision`'s half type on `device`'s type; nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=HALF[precision])


def grad_scaler(precision: str, device: torch.device | str) -> torch.amp.GradScaler:
    """A loss scaler for `precision` on `device`: active for fp16, a pass-through otherwise. It starts
    at a scale of 2^10, not torch's 2^16: a fine-tuning loss of ~14 times 2^16 overflows fp16, and the
    scaler would skip the first steps of runs that are only a handful of steps long."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=precision == "fp16", init_scale=2.0 ** 10)
