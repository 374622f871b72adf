"""LoRA (Hu et al. 2022, "Low-rank adaptation of large language models") on the trained towers,
through peft: a forgetting control beyond the paper (recipe params `lora_rank`, `lora_alpha`,
`lora_targets`). The base weights stay frozen; each targeted linear layer of the towers a recipe
trains gets a trainable rank-r update B A (scaled by alpha / r, B starting at zero, so training
starts from the base model), and after training the update is merged into the weight and the peft
layer replaced by a plain one: the checkpoint has the base model's keys and loads in plain open_clip.
"""
from __future__ import annotations

from typing import Any

import torch

from ktpipe.params import FinetuneParams, ParamsError


def lora_modules(module: torch.nn.Module, trainable: list[torch.nn.Parameter], targets: tuple[str, ...]) -> list[str]:
    """Names of the linear layers whose weight is among `trainable` (the recipe's towers) and whose
    name ends with one of `targets` (open_clip's MLP layers `c_fc`, `c_proj`; an attention's
    `out_proj` is read by torch's MultiheadAttention directly, so an adapter there would never run)."""
    chosen = {id(p) for p in trainable}
    return [name for name, layer in module.named_modules()
            if isinstance(layer, torch.nn.Linear) and id(layer.weight) in chosen
            and name.split(".")[-1] in targets]


def add_lora(model: Any, trainable: list[torch.nn.Parameter], cfg: FinetuneParams, recipe: str) -> list[torch.nn.Parameter]:
    """Freeze `trainable` and inject LoRA adapters (rank `cfg.lora_rank`) into its targeted linear
    layers; returns the adapters' parameters, the only ones that train."""
    from peft import LoraConfig, inject_adapter_in_model

    names = lora_modules(model.module, trainable, cfg.lora_targets)
    if not names:
        raise ParamsError(f"recipe {recipe!r}: no linear layer of the trained towers ({cfg.towers}) is named by "
                          f"lora_targets {list(cfg.lora_targets)}")
    for p in trainable:
        p.requires_grad_(False)
    config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=names, lora_dropout=0.0,
                        bias="none")
    inject_adapter_in_model(config, model.module)
    adapters = [p for name, p in model.module.named_parameters() if "lora_" in name]
    for p in model.module.parameters():
        p.requires_grad_(False)
    for p in adapters:
        p.requires_grad_(True)
    return adapters


def merge_lora(model: Any) -> None:
    """Merge every adapter into its layer's weight and put the plain layer back in its place."""
    from peft.tuners.lora import LoraLayer

    layers = [(name, layer) for name, layer in model.module.named_modules() if isinstance(layer, LoraLayer)]
    for name, layer in layers:
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.module.get_submodule(parent_name) if parent_name else model.module
        setattr(parent, child, layer.get_base_layer())
