"""The GPU fast paths: mixed precision for inversion, fine-tuning and evaluation (`invert.precision`,
`finetune.precision` or a recipe's, `evaluate.precision`: fp32, bf16 or fp16), and torch.compile of
the model's towers for inversion and evaluation (`invert.compile`, `evaluate.compile`).

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


def compile_towers(model, backend: str | None) -> None:
    """torch.compile the model's towers in place with `backend` (None: nothing): each direct submodule
    of the model made of layers (a CLIP's image and text transformers, a ViLT's encoder and heads;
    not a lone embedding table or norm) compiles its forward (`nn.Module.compile`, so the state dict
    keeps its keys and a saved checkpoint loads anywhere). Inversion runs thousands of steps of one graph, evaluation
    thousands of batches; fine-tuning (a few dozen steps) never pays back the compile time. A second
    call on the same model does nothing. tests/test_fast_paths.py states how far the results lie from
    the plain path's."""
    if backend is None or getattr(model, "compiled_with", None) == backend:
        return
    for child in model.module.children():
        if next(child.children(), None) is not None:
            child.compile(backend=backend)
    model.compiled_with = backend

