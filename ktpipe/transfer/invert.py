"""Inversion (paper Eq. 3): synthesize images of a concept from its description alone.

Pixels start as noise and are optimized so that the normalized visual embedding of a randomly
augmented view matches the description's text embedding, with a total-variation penalty. A
cross-encoder has no embeddings: its similarity is the log-probability of "match" (ViLT, paper
Sec. 8.2, which also starts from noise without the random affine: `invert.init: normal`, the
paper's N(0, 1) clamped to ViLT's [-1, 1] input range, and `invert.affine_p: 0`).
"""
from __future__ import annotations

import bisect
import dataclasses
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ktpipe import distributed
from ktpipe.concepts import ConceptText, concept_seed, read_concept_file
from ktpipe.errors import check_finite
from ktpipe.images import SUMMARY_FILE, initial_pixels, save_inversion
from ktpipe.io import atomic_dir, write_json
from ktpipe.models import Invertible, load_base_model, pick_device
from ktpipe.params import InvertParams, Params, ParamsError
from ktpipe.precision import autocast, compile_towers, grad_scaler
from ktpipe.store import STORE_ROOT, code_digest, model_digest, record_digest, sha256_bytes



@dataclass(frozen=True)
class AffineDraw:
    angle: torch.Tensor  # (N,) degrees
    translate: torch.Tensor  # (N, 2) fraction of the image side
    scale: torch.Tensor  # (N,)
    applied: torch.Tensor  # (N,) bool: the sample is augmented this step


def sample_affine(n: int, cfg: InvertParams, generator: torch.Generator) -> AffineDraw:
    """Per-sample random affine parameters; each sample is augmented with probability p."""
    u = torch.rand(n, 5, generator=generator)
    angle = (2 * u[:, 0] - 1) * cfg.rotation
    translate = (2 * u[:, 1:3] - 1) * cfg.translate
    scale = cfg.scale_min + u[:, 3] * (cfg.scale_max - cfg.scale_min)
    applied = u[:, 4] < cfg.affine_p
    return AffineDraw(angle, translate, scale, applied)


def affine_theta(draw: AffineDraw) -> torch.Tensor:
    """(N, 2, 3) sampling grids for `F.affine_grid`: the inverse of rotate-scale-translate.

    Forward map p_out = s R p_in + t, so p_in = R^T (p_out - t) / s. Translations are in
    normalized coordinates, where the image side spans 2. Unaugmented samples get identity.
    """
    rad = torch.deg2rad(draw.angle)
    cos, sin = torch.cos(rad), torch.sin(rad)
    inv = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)  # R^T, (N,2,2)
    inv = inv / draw.scale.view(-1, 1, 1)
    t = 2 * draw.translate
    offset = -(inv @ t.unsqueeze(-1))  # (N, 2, 1)
    theta = torch.cat([inv, offset], -1)
    identity = torch.eye(2, 3).expand_as(theta)
    return torch.where(draw.applied.view(-1, 1, 1), theta, identity)


def random_affine(pixels: torch.Tensor, cfg: InvertParams, generator: torch.Generator) -> torch.Tensor:
    """Differentiable per-sample random affine of a (N, 3, S, S) batch; outside the moved image
    `cfg.padding` fills zeros (black) or repeats the border (the authors' kornia setting)."""
    return warp(pixels, affine_theta(sample_affine(pixels.shape[0], cfg, generator)), cfg.padding)


def warp(pixels: torch.Tensor, theta: torch.Tensor, padding: str) -> torch.Tensor:
    """(N, 3, S, S) pixels resampled through (N, 2, 3) affine grids `theta`, bilinear."""
    grid = F.affine_grid(theta.to(pixels), list(pixels.shape), align_corners=False)
    return F.grid_sample(pixels, grid, mode="bilinear", padding_mode=padding, align_corners=False)


def total_variation(pixels: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N,) total variation, as in the CLIP-inversion work the paper cites [24].

    For each of four neighbour directions (horizontal, vertical, both diagonals) the L2 norm
    of the differences over the image plane, averaged over channels; the four are summed.
    """
    diffs = (
        pixels[:, :, :, 1:] - pixels[:, :, :, :-1],
        pixels[:, :, 1:, :] - pixels[:, :, :-1, :],
        pixels[:, :, 1:, 1:] - pixels[:, :, :-1, :-1],
        pixels[:, :, 1:, :-1] - pixels[:, :, :-1, 1:],
    )
    return sum(d.flatten(2).norm(dim=-1).mean(dim=1) for d in diffs)


def inversion_loss(sims: torch.Tensor, pixels: torch.Tensor, tv_weight: float, reduction: str = "sum") -> torch.Tensor:
    """Negative Eq. 3 objective per sample, summed (each image gets its own full gradient) or
    averaged over samples (the authors' code, where each image's gradient is 1/N of that).

    sims (N,) are the similarities of the augmented views to the text; pixels (N, 3, S, S).
    """
    per_sample = -sims + tv_weight * total_variation(pixels)  # (N,)
    return per_sample.sum() if reduction == "sum" else per_sample.mean()


def cosine_lr(step: int, total: int, peak: float) -> float:
    """Cosine annealing from `peak` at step 0 to 0 at `total`."""
    return 0.5 * peak * (1 + math.cos(math.pi * step / total))


def to_model_size(pixels: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    """Resize to side `size` (bilinear or bicubic), clamped to [0, 1]; a no-op when it already matches."""
    if pixels.shape[-1] == size:
        return pixels
    return F.interpolate(pixels, size=(size, size), mode=mode, align_corners=False).clamp(0, 1)


def resolution_at(step: int, cfg: InvertParams, model_size: int) -> int:
    """Side of the optimized pixels at `step`.

    Without `cfg.progressive` always the final side (`cfg.image_size` or the model's). With it,
    `progressive_sizes[0]` first, then at each `progressive_steps[i]` the next listed size, and
    after the last listed size the final side (authors' code: 64, 128 at step 900, final at 1800).
    """
    final = cfg.image_size or model_size
    if not cfg.progressive:
        return final
    sizes = (*cfg.progressive_sizes, final)
    return sizes[bisect.bisect_right(cfg.progressive_steps, step)]


def resolution_schedule(cfg: InvertParams, model_size: int) -> list[list[int]]:
    """[first step, side] of every resolution that a run of `cfg.steps` steps goes through."""
    starts = [0, *(s for s in cfg.progressive_steps if s < cfg.steps)] if cfg.progressive else [0]
    schedule: list[list[int]] = []
    for start in starts:
        size = resolution_at(start, cfg, model_size)
        if not schedule or schedule[-1][1] != size:
            schedule.append([start, size])
    return schedule


def check_progressive(cfg: InvertParams, model_size: int) -> None:
    """The progressive schedule only upsizes: each listed size is at most the final side."""
    final = cfg.image_size or model_size
    if cfg.progressive and max(cfg.progressive_sizes, default=0) > final:
        raise ParamsError(f"params 'invert.progressive_sizes' {list(cfg.progressive_sizes)} must not exceed "
                         f"the final image side {final} (invert.image_size or the model's input size)")


def clip_pixel_grad(pixels: torch.Tensor, max_norm: float) -> float:
    """Scale the pixel gradient in place so its total L2 norm is at most `max_norm`; returns the norm before."""
    return float(torch.nn.utils.clip_grad_norm_([pixels], max_norm))


def fresh_pixels(pixels: torch.Tensor, size: int, lr: float, mode: str = "bilinear") -> tuple[torch.Tensor, torch.optim.Adam]:
    """A new leaf tensor of `pixels` resized to side `size` and an Adam optimizer with fresh state."""
    leaf = to_model_size(pixels.detach(), size, mode).clone().requires_grad_(True)
    return leaf, torch.optim.Adam([leaf], lr=lr)


def _freeze(model: Invertible) -> None:
    model.module.eval()
    for p in model.module.parameters():
        p.requires_grad_(False)


def _scheduled(step: int, cfg: InvertParams, model_size: int, pixels: torch.Tensor,
               optimizer: torch.optim.Adam) -> tuple[torch.Tensor, torch.optim.Adam, int]:
    """Pixels and optimizer for `step`: resized with a fresh Adam where the progressive schedule
    upsizes, the learning rate set on the cosine schedule; also the step's side."""
    size = resolution_at(step, cfg, model_size)
    if size != pixels.shape[-1]:
        pixels, optimizer = fresh_pixels(pixels, size, cfg.lr, cfg.interpolation)
    for group in optimizer.param_groups:
        group["lr"] = cosine_lr(step, cfg.steps, cfg.lr)
    return pixels, optimizer, size


def _optimize_step(model: Invertible, pixels: torch.Tensor, optimizer: torch.optim.Optimizer,
                   cfg: InvertParams, generator: torch.Generator, target: Any, where: str, step: int,
                   scaler: torch.amp.GradScaler):
    """One Adam step on pixels (N, 3, s, s): augment, resize views to the model, Eq. 3 (the model's
    forward in `cfg.precision`), clip, clamp.

    A non-finite loss or pixel gradient stops the run (NonFiniteError naming `where` and the step);
    under fp16 an overflowing gradient skips the step instead (`scaler`).
    """
    views = to_model_size(random_affine(pixels, cfg, generator), model.image_size, cfg.interpolation)
    with autocast(cfg.precision, pixels.device):
        sims = model.similarity(views, target, cfg.similarity).float()
    loss = inversion_loss(sims, pixels, cfg.tv_weight, cfg.reduction)
    check_finite(loss, "inversion loss", where, step)
    optimizer.zero_grad(set_to_none=True)
    _step(loss, pixels, optimizer, scaler, lambda: clip_pixel_grad(pixels, cfg.grad_clip) if cfg.grad_clip else None,
          where, step)
    return sims.detach()


def _step(loss: torch.Tensor, pixels: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
          clip, where: str, step: int) -> None:
    """Backpropagate `loss` to the pixels, check and `clip()` their gradient, step, clamp to [0, 1]."""
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    if not scaler.is_enabled():  # fp16's scaler skips a step with a non-finite gradient and lowers its scale
        check_finite(pixels.grad.norm(), "pixel gradient norm", where, step)
    clip()
    scaler.step(optimizer)
    scaler.update()
    with torch.no_grad():
        pixels.clamp_(0.0, 1.0)


def invert_text(
    model: Invertible, text: str, cfg: InvertParams, seed: int = 0, progress: bool = True, name: str = ""
) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimize `cfg.samples` images for `text` (of concept `name`, for messages); returns
    model-size pixels (N, 3, S, S) and final similarities (N,) as `cfg.similarity` measures them.

    With `cfg.progressive` the pixels grow along `resolution_at`; each upsize starts a fresh Adam,
    while the cosine learning-rate schedule runs over the whole `cfg.steps`.
    """
    check_progressive(cfg, model.image_size)
    size = resolution_at(0, cfg, model.image_size)
    generator = torch.Generator().manual_seed(seed)
    pixels = initial_pixels(cfg.samples, size, generator, cfg.init).to(next(model.module.parameters()))
    pixels, optimizer = fresh_pixels(pixels, size, cfg.lr, cfg.interpolation)
    _freeze(model)
    compile_towers(model, cfg.compile)
    scaler = grad_scaler(cfg.precision, pixels.device)
    with autocast(cfg.precision, pixels.device):
        target = model.text_target(text, cfg.similarity)
    where = f"inversion of concept {name!r}" if name else f"inversion of {text[:40]!r}"
    bar = tqdm(range(cfg.steps), desc=f"invert {name or repr(text[:30])}", disable=not progress or not distributed.is_main(),
               leave=False)
    for step in bar:
        pixels, optimizer, size = _scheduled(step, cfg, model.image_size, pixels, optimizer)
        sims = _optimize_step(model, pixels, optimizer, cfg, generator, target, where, step, scaler)
        if step % 25 == 0:
            bar.set_postfix(sim=f"{sims.mean().item():.3f}", side=size)
    with torch.no_grad(), autocast(cfg.precision, pixels.device):
        final = to_model_size(pixels, model.image_size, cfg.interpolation)
        sims = model.similarity(final, target, cfg.similarity).float()
    return final.detach().float().cpu(), sims.detach().cpu()


def stack_targets(targets: list[Any], repeats: int) -> Any:
    """Per-concept targets -> one per image, concept by concept, `repeats` images each: embeddings
    (D,) stacked to (C * repeats, D), token batches (1, L) concatenated key by key."""
    first = targets[0]
    if isinstance(first, torch.Tensor):
        return torch.stack([t.reshape(-1) for t in targets]).repeat_interleave(repeats, dim=0)
    if isinstance(first, dict) and all(isinstance(v, torch.Tensor) for v in first.values()):
        return {key: torch.cat([t[key] for t in targets]).repeat_interleave(repeats, dim=0) for key in first}
    raise TypeError(f"batched inversion cannot stack targets of type {type(first).__name__}; "
                    "set invert.concepts_per_batch: 1")


def batched_similarity(model: Invertible, views: torch.Tensor, target: Any, similarity: str) -> torch.Tensor:
    """(C * N,) each view against its own concept's target (`stack_targets`): a dual encoder's
    embeddings row by row (cosine, or minus the L2 distance of raw embeddings, as its `similarity`),
    a cross-encoder's token rows through its own `similarity`, which pairs image i with text row i."""
    if isinstance(target, torch.Tensor):
        if similarity == "l2":
            return -(model.encode_images(views, normalize=False) - target).norm(dim=-1)
        return (model.encode_images(views) * target).sum(dim=-1)
    return model.similarity(views, target, similarity)


def clip_per_concept(grad: torch.Tensor, concepts: int, max_norm: float) -> None:
    """Scale each concept's share of a (C * N, ...) gradient in place so its L2 norm is at most
    `max_norm`, as `clip_pixel_grad` does for a concept optimized alone (torch's clip_grad_norm_ rule)."""
    per_concept = grad.view(concepts, -1)
    norms = per_concept.norm(dim=1)
    per_concept.mul_((max_norm / (norms + 1e-6)).clamp(max=1.0).unsqueeze(1))


def invert_texts(model: Invertible, texts: list[str], cfg: InvertParams, seeds: list[int], progress: bool = True,
                 names: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`invert_text` for C concepts at once: one batch of C x `cfg.samples` images per forward pass.

    Each concept keeps what a run of it alone has: its seed (starting pixels and every step's
    random affines from its own generator), its text target, its share of the loss (summed, or
    averaged over its own samples), its gradient clip and its Adam state (elementwise), so its
    images equal its own `invert_text` run up to floating-point rounding (the batched matrix
    products round differently). Returns pixels (C, N, 3, S, S) and similarities (C, N).
    """
    names = names or [f"{text[:30]!r}" for text in texts]
    concepts, n = len(texts), cfg.samples
    check_progressive(cfg, model.image_size)
    size = resolution_at(0, cfg, model.image_size)
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    start = torch.cat([initial_pixels(n, size, g, cfg.init) for g in generators])
    pixels, optimizer = fresh_pixels(start.to(next(model.module.parameters())), size, cfg.lr, cfg.interpolation)
    _freeze(model)
    compile_towers(model, cfg.compile)
    scaler = grad_scaler(cfg.precision, pixels.device)
    with autocast(cfg.precision, pixels.device):
        target = stack_targets([model.text_target(text, cfg.similarity) for text in texts], n)
    where = f"batched inversion of concepts {names}"
    bar = tqdm(range(cfg.steps), desc=f"invert {len(texts)} concepts", disable=not progress or not distributed.is_main(),
               leave=False)
    for step in bar:
        pixels, optimizer, size = _scheduled(step, cfg, model.image_size, pixels, optimizer)
        moved = warp(pixels, torch.cat([affine_theta(sample_affine(n, cfg, g)) for g in generators]), cfg.padding)
        with autocast(cfg.precision, pixels.device):
            sims = batched_similarity(model, to_model_size(moved, model.image_size, cfg.interpolation), target,
                                      cfg.similarity).float()
        per_sample = (-sims + cfg.tv_weight * total_variation(pixels)).view(concepts, n)
        loss = per_sample.sum() if cfg.reduction == "sum" else per_sample.mean(dim=1).sum()
        check_finite(loss, "inversion loss", where, step)
        optimizer.zero_grad(set_to_none=True)
        _step(loss, pixels, optimizer, scaler,
              lambda: clip_per_concept(pixels.grad, concepts, cfg.grad_clip) if cfg.grad_clip else None, where, step)
        if step % 25 == 0:
            bar.set_postfix(sim=f"{sims.detach().mean().item():.3f}", side=size)
    with torch.no_grad(), autocast(cfg.precision, pixels.device):
        final = to_model_size(pixels, model.image_size, cfg.interpolation)
        sims = batched_similarity(model, final, target, cfg.similarity).float()
    return final.detach().float().cpu().view(concepts, n, *final.shape[1:]), sims.detach().cpu().view(concepts, n)


def inversion_choices(cfg: InvertParams, model: Invertible) -> dict:
    """The settings where the paper's text and the authors' code differ, as this run used them."""
    return {"image_size": model.image_size, "resize": model.resize_rule, "init": cfg.init, "affine_p": cfg.affine_p,
            "similarity": cfg.similarity, "reduction": cfg.reduction, "padding": cfg.padding,
            "interpolation": cfg.interpolation, "grad_clip": cfg.grad_clip,
            "resolutions": resolution_schedule(cfg, model.image_size)}  # [first step, side]


def run_invert(params: Params, concept_file: Path, out_dir: Path, timing_path: Path | None = None) -> dict:
    """Invert one concept's description with the base model; write its folder atomically.

    The folder holds only what the inputs determine (a rerun writes the same bytes); the wall
    time goes to `timing_path`, a metrics file no stage depends on.
    """
    concept = read_concept_file(concept_file)
    model = load_base_model(params.model)
    start = time.time()
    meta = _invert_into(model, params, concept, out_dir)
    timing = {"concept": concept.name, "seconds": round(time.time() - start, 2), "steps": params.invert.steps}
    if timing_path is not None:
        write_json(timing_path, timing)
    return {**meta, **timing}


def _invert_into(model: Invertible, params: Params, concept: ConceptText, out_dir: Path) -> dict:
    """Invert `concept` and write its folder (images, grid, summary) atomically; returns the summary's meta."""
    seed = concept_seed(params.seed, concept.name)
    pixels, sims = invert_text(model, concept.description, params.invert, seed, name=concept.name)
    return _save_concept(model, params, concept, pixels, sims, out_dir)


def _save_concept(model: Invertible, params: Params, concept: ConceptText, pixels: torch.Tensor, sims: torch.Tensor,
                  out_dir: Path, batch: list[str] | None = None) -> dict:
    meta = {"concept": concept.name, "text": concept.description, "seed": concept_seed(params.seed, concept.name),
            **inversion_choices(params.invert, model), **({"batch": batch} if batch else {})}
    with atomic_dir(out_dir) as tmp:
        save_inversion(tmp, pixels, sims, meta)
    return meta


def _invert_batch_into(model: Invertible, params: Params, batch: list[ConceptText], out_root: Path) -> None:
    """Invert the concepts of `batch` together (`invert_texts`) and write each one's folder."""
    seeds = [concept_seed(params.seed, c.name) for c in batch]
    names = [c.name for c in batch]
    pixels, sims = invert_texts(model, [c.description for c in batch], params.invert, seeds, names=names)
    for i, concept in enumerate(batch):
        _save_concept(model, params, concept, pixels[i], sims[i], out_root / concept.name, batch=names)


# The inversion store: each concept's folder as last computed, under the digest of everything that
# determines its bytes (the concept's name and description, its seed, the invert and model params,
# the base model's files, ktpipe's code and the versions of torch and the model libraries). When
# the stage reruns because one caption changed or a concept was added, the other concepts' folders
# are copied from here, bit for bit, instead of recomputed. It is a plain memo (ktpipe/store.py):
# deleting it (or `--store ''`) only costs time; it lives outside DVC's outputs so that the stage
# stays in DVC's run-cache (DVC leaves a stage with a persistent output out of it).
DEFAULT_STORE = STORE_ROOT / "invert"


def inversion_key(params: Params, concept: ConceptText, model_key: str, device: str) -> str:
    """The store key of one concept's inversion: a digest of every input that determines its folder."""
    record = {"concept": dataclasses.asdict(concept), "seed": concept_seed(params.seed, concept.name),
              "invert": dataclasses.asdict(params.invert), "model": model_key, "code": code_digest(),
              "device": device}
    return record_digest(record)


def run_invert_all(params: Params, concepts_dir: Path, out_root: Path, timing_path: Path | None = None,
                   store: str | Path | None = DEFAULT_STORE, progress: bool = True) -> dict:
    """Invert every concept of `concepts.names` (their files in `concepts_dir`, from the captions
    stage) in one process into `out_root`/<name>/, written atomically as one folder.

    A concept whose folder the store holds under its key (`inversion_key`) is copied from there,
    so a rerun after one changed caption or one added concept computes only that concept, and the
    others' tensors stay bit-identical; each computed folder enters the store. With
    `invert.concepts_per_batch` k > 1 the concepts go k at a time, in `concepts.names` order, through
    `invert_texts`; a concept's bytes then depend on its batch, so its key covers the batch's keys and
    one changed caption recomputes its batch. Returns, per concept, its seconds and whether it was
    computed or reused (also written to `timing_path`).
    """
    names = list(params.concepts.names)
    if not names:
        raise ParamsError("params 'concepts.names' is empty: there is no concept to invert")
    concepts = [read_concept_file(Path(concepts_dir) / f"{name}.json") for name in names]
    model = None  # loaded at the first concept the store lacks
    model_key, device = model_digest(params.model), pick_device(params.model.device).split(":")[0]
    timings: dict[str, dict] = {}
    start = time.time()
    per_batch = params.invert.concepts_per_batch
    batches = [concepts[i:i + per_batch] for i in range(0, len(concepts), per_batch)]
    mine = batches[distributed.rank()::distributed.world_size()]  # over several processes, each its share
    with distributed.shared_atomic_dir(out_root) as tmp:
        for batch in tqdm(mine, desc="invert", disable=not progress or len(mine) == 1):
            mark = time.time()
            keys = [inversion_key(params, concept, model_key, device) for concept in batch]
            if per_batch > 1:  # a batched concept's bytes depend on its batch
                keys = [sha256_bytes(f"{key}|{','.join(keys)}".encode()) for key in keys]
            stored = [Path(store) / key for key in keys] if store else None
            if stored is not None and all((s / SUMMARY_FILE).is_file() for s in stored):
                for concept, entry in zip(batch, stored):
                    shutil.copytree(entry, tmp / concept.name)
                how = "reused"
            else:
                model = model or load_base_model(params.model)
                if per_batch == 1:
                    _invert_into(model, params, batch[0], tmp / batch[0].name)
                else:
                    _invert_batch_into(model, params, batch, tmp)
                for concept, entry in zip(batch, stored or []):
                    _store(tmp / concept.name, entry)
                how = "computed"
            for concept in batch:
                timings[concept.name] = {"seconds": round((time.time() - mark) / len(batch), 2), "how": how,
                                         **({"rank": distributed.rank()} if distributed.active() else {})}
        found = {name: entry for part in distributed.gather_objects(timings) for name, entry in part.items()}
    timing = {"seconds": round(time.time() - start, 2), "steps": params.invert.steps,
              "concepts": {name: found[name] for name in names}}
    if timing_path is not None and distributed.is_main():
        write_json(timing_path, timing)
    return timing


def _store(folder: Path, stored: Path) -> None:
    """Copy a computed concept folder into the store (atomically: a crash leaves no half entry)."""
    if stored.exists():
        return
    with atomic_dir(stored) as tmp:
        shutil.copytree(folder, tmp, dirs_exist_ok=True)
