"""Text-prompted saliency maps of a vision tower, the first step of zero-shot segmentation as
MedCLIP-SAMv2 does it: M2IB (Wang, Rudner, Wilson, NeurIPS 2023, multimodal information
bottleneck attribution) and gradient x input, the baseline.

Both read the output tokens (B, N, W) of one vision block through `VisionFeatures`, score each
patch token, and return maps on the patch grid (B, rows, cols); `compute_saliency` upsamples
them to the pixels' size and scales each to [0, 1]. The model's weights never change: they are
taken out of autograd for the call and their flags and train/eval modes restored afterwards.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from ktpipe.models.base import VisionFeatures, require
from ktpipe.params import ParamsError, SegmentationParams

KEY = "evaluate.segmentation"  # the params section whose keys the errors name
ALPHA_INIT = 5.0  # M2IB: initial bottleneck logit, sigmoid(5) ~ 0.993: the bottleneck starts almost open
NOISE_SAMPLES = 10  # M2IB: noisy copies of each image per step (the reference's IBAInterpreter batch_size)


def bottleneck_kl(lamb: torch.Tensor, features: torch.Tensor, noise_std: float = 1.0) -> torch.Tensor:
    """Per-element KL[N(lamb * R / s, (1 - lamb)^2) || N(0, 1)], the information the bottleneck lets
    through: R are the block's tokens, s the noise's std (the reference's `_calc_capacity` on its
    features normalized by mean 0 and std s). Any shapes that broadcast; returns their shape."""
    mu = lamb * features / noise_std
    var = (1 - lamb) ** 2
    return -0.5 * (1 + torch.log(var) - mu ** 2 - var)


def bottleneck(tokens: torch.Tensor, lamb: torch.Tensor, noise: torch.Tensor, noise_std: float) -> torch.Tensor:
    """z = lamb * R + (1 - lamb) * s * eps: each token feature kept with weight lamb, the rest
    replaced by noise of mean 0 and std s (eps ~ N(0, 1))."""
    return lamb * tokens + (1 - lamb) * noise_std * noise


def check_layer(model: VisionFeatures, layer: int) -> None:
    """The saliency layer must be one of the model's vision blocks."""
    depth = model.vision_layers
    if not 0 <= layer < depth:
        raise ParamsError(f"params key '{KEY}.layer' is {layer}, but the model's vision tower has {depth} "
                          f"blocks: use 0 to {depth - 1}")


def check_m2ib(model: VisionFeatures, layer: int, beta: float, variance: float, steps: int) -> None:
    """M2IB settings the model or the math cannot take, each named by its params key."""
    check_layer(model, layer)
    if beta < 0:
        raise ParamsError(f"params key '{KEY}.beta' must be zero or positive, got {beta}")
    if not variance > 0:
        raise ParamsError(f"params key '{KEY}.variance' must be a positive number, got {variance}")
    if steps < 1:
        raise ParamsError(f"params key '{KEY}.steps' must be at least 1, got {steps}")


@contextmanager
def frozen(model: Any) -> Iterator[None]:
    """The model's parameters out of autograd and its modules in eval mode for the duration;
    flags and modes restored afterwards (a model without a `module` is left as it is)."""
    module = getattr(model, "module", None)
    if not isinstance(module, torch.nn.Module):
        yield
        return
    flags = [(p, p.requires_grad) for p in module.parameters()]
    modes = [(m, m.training) for m in module.modules()]
    module.eval().requires_grad_(False)
    try:
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)
        for sub, mode in modes:
            sub.training = mode


def block_tokens(model: VisionFeatures, pixels: torch.Tensor, layer: int) -> torch.Tensor:
    """(B, N, W) output tokens of vision block `layer`, checked against the model's token grid."""
    stored = []

    def keep(tokens: torch.Tensor) -> torch.Tensor:
        stored.append(tokens)
        return tokens

    with torch.no_grad():
        model.encode_images_through(pixels, layer, keep)
    prefix, rows, cols = model.vision_token_grid()
    tokens = stored[0].detach()
    if tokens.shape[1] != prefix + rows * cols:
        raise ValueError(f"block {layer} gives {tokens.shape[1]} tokens, the token grid says "
                         f"{prefix} + {rows}x{cols}")
    return tokens


def patch_grid(model: VisionFeatures, token_scores: torch.Tensor) -> torch.Tensor:
    """(B, N) scores per token -> (B, rows, cols) on the patch grid, prefix tokens dropped."""
    prefix, rows, cols = model.vision_token_grid()
    return token_scores[:, prefix:].reshape(-1, rows, cols)


def per_image_noise(generators: list[torch.Generator], samples: int, shape: torch.Size,
                    device: torch.device) -> torch.Tensor:
    """(B, samples, N, W) standard normal noise, each image's drawn from its own generator, so an
    image's noise does not depend on which batch it is in or where."""
    return torch.stack([torch.randn((samples, *shape), generator=g, device=device) for g in generators])


def m2ib_losses(model: VisionFeatures, copies: torch.Tensor, texts: torch.Tensor, layer: int,
                alpha: torch.Tensor, features: torch.Tensor, noise: torch.Tensor, beta: float,
                noise_std: float) -> torch.Tensor:
    """(B,) the bottleneck loss of each image, beta * mean KL - mean cosine to its text (reference
    `calc_loss`): the KL averaged over tokens and features, the cosine over the noisy copies.
    `copies` (B*K, 3, S, S), `texts` (B*K, D), `alpha` and `features` (B, N, W), `noise` (B, K, N, W)."""
    lamb = torch.sigmoid(alpha)  # (B, N, W)
    batch, samples = noise.shape[:2]

    def edit(tokens: torch.Tensor) -> torch.Tensor:  # (B*K, N, W)
        grouped = tokens.reshape(batch, samples, *tokens.shape[1:])
        return bottleneck(grouped, lamb[:, None], noise, noise_std).flatten(0, 1).to(tokens.dtype)

    images = model.encode_images_through(copies, layer, edit)  # (B*K, D)
    similarity = F.cosine_similarity(images, texts, dim=-1, eps=1e-6).reshape(batch, samples).mean(1)
    compression = bottleneck_kl(lamb, features, noise_std).mean((1, 2))
    return beta * compression - similarity


def m2ib_token_maps(model: VisionFeatures, pixels: torch.Tensor, text_embeddings: torch.Tensor, *,
                    layer: int = 7, beta: float = 0.1, variance: float = 1.0, steps: int = 10,
                    lr: float = 1.0, seed: int = 0, noise_samples: int = NOISE_SAMPLES,
                    return_history: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """M2IB saliency (B, rows, cols) of (B, 3, S, S) pixels for their (B, D) text embeddings.

    One bottleneck per image on block `layer`'s tokens: z = lamb * R + (1 - lamb) * s * eps with
    lamb = sigmoid(alpha) per token and feature, alpha starting at 5, noise of mean 0 and std
    s = sqrt(variance). Adam (lr) minimizes beta * KL - cosine(image embedding of z, text) for
    `steps` forward passes of `noise_samples` noisy copies each; the loss is summed over images
    and each image's noise drawn from its own generator seeded with `seed`, so a batch gives
    what one image at a time gives. The saliency of a patch is the KL of its token summed over
    features, read, as the reference does, from the last forward pass (no update after it).

    With variance 1 this is the reference code (M2IB `scripts/iba.py`, MedCLIP-SAMv2's copy).
    That code builds its noise estimator from `variance` but never uses it (its noise has std 1);
    here `variance` sets the noise's std, as in M2IB's earlier `information_bottleneck/IBA.py`,
    which normalized the tokens by it. `return_history` adds the (steps, B) losses.
    """
    require(model, VisionFeatures, "M2IB saliency")
    check_m2ib(model, layer, beta, variance, steps)
    with frozen(model):
        features = block_tokens(model, pixels, layer).float()  # (B, N, W)
    copies = pixels.repeat_interleave(noise_samples, dim=0)  # (B*K, 3, S, S)
    texts = text_embeddings.detach().to(pixels.device).repeat_interleave(noise_samples, dim=0)  # (B*K, D)
    alpha = torch.full_like(features, ALPHA_INIT, requires_grad=True)
    optimizer = torch.optim.Adam([alpha], lr=lr)
    generators = [torch.Generator(device=pixels.device).manual_seed(seed) for _ in range(len(pixels))]
    history = []
    with frozen(model), torch.enable_grad():
        for step in range(steps):
            noise = per_image_noise(generators, noise_samples, features.shape[1:], pixels.device)
            losses = m2ib_losses(model, copies, texts, layer, alpha, features, noise, beta, variance ** 0.5)
            history.append(losses.detach())
            if step < steps - 1:
                optimizer.zero_grad()
                losses.sum().backward()
                optimizer.step()
    capacity = bottleneck_kl(torch.sigmoid(alpha.detach()), features, variance ** 0.5)  # (B, N, W)
    maps = patch_grid(model, capacity.sum(-1))
    return (maps, torch.stack(history)) if return_history else maps


def gradient_token_maps(model: VisionFeatures, pixels: torch.Tensor, text_embeddings: torch.Tensor, *,
                        layer: int = 7) -> torch.Tensor:
    """Gradient x input saliency (B, rows, cols): d cos(image embedding, text) / d tokens of block
    `layer`, times the tokens, summed over features, negative values set to 0."""
    require(model, VisionFeatures, "gradient saliency")
    check_layer(model, layer)
    stored = []

    def track(tokens: torch.Tensor) -> torch.Tensor:
        stored.append(tokens.detach().requires_grad_(True))
        return stored[0]

    with frozen(model), torch.enable_grad():
        images = model.encode_images_through(pixels, layer, track)  # (B, D)
        similarity = F.cosine_similarity(images, text_embeddings.detach().to(images.device), dim=-1)  # (B,)
        (grad,) = torch.autograd.grad(similarity.sum(), stored[0])  # (B, N, W)
    relevance = (grad * stored[0].detach()).sum(-1).relu()  # (B, N)
    return patch_grid(model, relevance)


def to_pixel_maps(token_maps: torch.Tensor, size: int) -> torch.Tensor:
    """(B, rows, cols) -> (B, size, size) upsampled bilinearly, each scaled to [0, 1] by its min
    and max (a constant map gives zeros)."""
    maps = F.interpolate(token_maps[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    low = maps.amin((1, 2), keepdim=True)
    span = maps.amax((1, 2), keepdim=True) - low
    return torch.where(span > 0, (maps - low) / span.clamp_min(1e-12), torch.zeros_like(maps))


def _m2ib(model: VisionFeatures, pixels: torch.Tensor, texts: torch.Tensor, cfg: SegmentationParams,
          seed: int) -> torch.Tensor:
    return m2ib_token_maps(model, pixels, texts, layer=cfg.layer, beta=cfg.beta, variance=cfg.variance,
                           steps=cfg.steps, lr=cfg.lr, seed=seed, noise_samples=cfg.noise_samples)


def _gradient(model: VisionFeatures, pixels: torch.Tensor, texts: torch.Tensor, cfg: SegmentationParams,
              seed: int) -> torch.Tensor:
    return gradient_token_maps(model, pixels, texts, layer=cfg.layer)


# evaluate.segmentation.saliency -> (model, pixels, text embeddings, cfg, seed) -> (B, rows, cols)
SALIENCY_METHODS: dict[str, Callable[..., torch.Tensor]] = {"m2ib": _m2ib, "gradient": _gradient}


def compute_saliency(model: VisionFeatures, pixels: torch.Tensor, text_embeddings: torch.Tensor,
                     cfg: SegmentationParams, seed: int = 0) -> torch.Tensor:
    """(B, S, S) saliency maps in [0, 1] of (B, 3, S, S) pixels in [0, 1] for their (B, D)
    normalized text embeddings, by `cfg.saliency`, `cfg.batch_size` images at a time."""
    if cfg.saliency not in SALIENCY_METHODS:
        raise ParamsError(f"params key '{KEY}.saliency' must be one of {list(SALIENCY_METHODS)}, got {cfg.saliency!r}")
    if len(pixels) != len(text_embeddings):
        raise ValueError(f"{len(pixels)} images but {len(text_embeddings)} text embeddings: give one per image")
    method = SALIENCY_METHODS[cfg.saliency]
    chunks = [method(model, pixels[i:i + cfg.batch_size], text_embeddings[i:i + cfg.batch_size], cfg, seed)
              for i in range(0, len(pixels), cfg.batch_size)]
    return to_pixel_maps(torch.cat(chunks), pixels.shape[-1])
