"""open_clip CoCa behind the captioning capabilities: caption generation and the CoCa loss's inputs.

A CoCa is an open_clip CLIP with an autoregressive text decoder that cross-attends to the image
tokens; `OpenClipModel.load` returns this class for any CoCa config (`coca_ViT-B-32`,
`coca_ViT-L-14`, their LAION-2B and MSCOCO-fine-tuned tags, local files and folders, the demo's).

Decoding is done here on the CoCa's own forward pass (its text decoder's next-token logits), with
transformers' logits processors. open_clip 3.3's `CoCa.generate` needs transformers'
`BeamSearchScorer`, which transformers 5 removed (open_clip issue #1129), and without it open_clip
disables every generation type. The settings keep open_clip's names (`ktpipe.params.GenerationParams`).
`method: open_clip` is `CoCa.generate`'s default decoding, group beam search as its
`_generate_beamsearch` runs it (`group_beam_search`); `method: beam_search` is ktpipe's own beam
search on log-probabilities (`beam_search`), which is not open_clip's.
"""
from __future__ import annotations

import re
from typing import Any, Iterable

import open_clip
import torch
import torch.nn.functional as F
from open_clip.tokenizer import HFTokenizer

from ktpipe.models.openclip import OpenClipModel

SOT_TOKEN = 49406  # open_clip SimpleTokenizer's <start_of_text> (CoCa.generate's default)
EOT_TOKEN = 49407  # <end_of_text>
GENERATION_METHODS = ("open_clip", "beam_search", "top_k", "top_p")


def special_tokens(tokenizer: Any) -> tuple[int, int, int]:
    """(start, end, pad) token ids of a CoCa tokenizer: open_clip's SimpleTokenizer, or an HF one."""
    if isinstance(tokenizer, HFTokenizer):
        hf = tokenizer.tokenizer
        start = hf.bos_token_id if hf.bos_token_id is not None else hf.cls_token_id
        end = hf.eos_token_id if hf.eos_token_id is not None else hf.sep_token_id
        return int(start), int(end), int(hf.pad_token_id or 0)
    return getattr(tokenizer, "sot_token_id", SOT_TOKEN), getattr(tokenizer, "eot_token_id", EOT_TOKEN), 0


def clean_caption(tokenizer: Any, ids: list[int], end: int) -> str:
    """Generated token ids -> text without special tokens or surrounding space."""
    if end in ids:
        ids = ids[:ids.index(end)]
    if isinstance(tokenizer, HFTokenizer):
        return tokenizer.tokenizer.decode(ids, skip_special_tokens=True).strip()
    text = tokenizer.decode(ids)
    for token in ("<start_of_text>", "<end_of_text>"):
        text = text.replace(token, " ")
    return re.sub(r"\s+([.,;:!?])", r"\1", " ".join(text.split()))  # BPE decoding spaces out punctuation


def next_token_logits(module: torch.nn.Module, tokens: torch.Tensor, image_latent: torch.Tensor,
                      image_embs: torch.Tensor, context: int, pad_id: int, block_special: bool = True) -> torch.Tensor:
    """(N, V) the decoder's logits for the token after `tokens` (N, L), given the images' encodings,
    with the padding and start tokens ruled out unless `block_special` is False (open_clip rules
    out neither). A text tower without a class token (the demo's) has a causal mask of its
    `context`'s size only, so the tokens are padded to it; causal attention keeps the padding out
    of position L - 1. There is no cache of earlier positions: each step reruns the text tower and
    the decoder, as open_clip's own `generate` does."""
    length = tokens.shape[1]
    if getattr(module.text, "cls_emb", None) is None:  # a causal mask of the context's size only
        tokens = F.pad(tokens, (0, context - length), value=pad_id)
    out = module(None, tokens, image_latent=image_latent, image_embs=image_embs, output_labels=False)
    logits = out["logits"][:, length - 1].float()
    if block_special:
        logits[:, [pad_id, int(tokens[0, 0])]] = float("-inf")  # never the padding or the start token
    return logits


def logits_processors(settings: Any, end: int):
    """transformers' processors for the minimum length and the repetition penalty (open_clip's pair)."""
    from transformers import LogitsProcessorList, MinLengthLogitsProcessor, RepetitionPenaltyLogitsProcessor

    return LogitsProcessorList([MinLengthLogitsProcessor(settings.min_length, end),
                                RepetitionPenaltyLogitsProcessor(settings.repetition_penalty)])


@torch.no_grad()
def beam_search(module: torch.nn.Module, images: torch.Tensor, settings: Any, start: int, end: int, pad_id: int,
                context: int) -> list[list[int]]:
    """Each image's best finished token sequence (start token dropped) under ktpipe's beam search:
    `beams` hypotheses scored by summed log-probabilities (temperature applied), the best finished
    one by score / length ** `length_penalty`. Not open_clip's decoding (`group_beam_search`)."""
    image_latent, image_embs = module._encode_image(images)
    n, k = images.shape[0], settings.beams
    image_latent = image_latent.repeat_interleave(k, 0)
    image_embs = image_embs.repeat_interleave(k, 0)
    tokens = torch.full((n * k, 1), start, dtype=torch.long, device=images.device)
    scores = torch.zeros(n, k, device=images.device)
    scores[:, 1:] = float("-inf")  # every beam starts as the same sequence: expand the first only
    processors = logits_processors(settings, end)
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(n)]
    open_ = torch.ones(n, dtype=torch.bool)
    for _ in range(min(settings.max_length, context) - 1):
        logits = processors(tokens, next_token_logits(module, tokens, image_latent, image_embs, context, pad_id))
        logp = F.log_softmax(logits / settings.temperature, dim=-1)
        vocab = logp.shape[1]
        total = (scores.reshape(-1, 1) + logp).reshape(n, k * vocab)
        best, index = total.topk(2 * k, dim=1)
        beam, token = index // vocab, index % vocab
        rows, next_scores = [], torch.full((n, k), float("-inf"), device=images.device)
        for i in range(n):
            kept = 0
            for score, b, t in zip(best[i].tolist(), beam[i].tolist(), token[i].tolist()):
                if kept == k or score == float("-inf"):
                    break
                row = i * k + b
                if t == end:  # a finished hypothesis (its end token counted in its length)
                    if open_[i]:
                        length = tokens.shape[1]
                        finished[i].append((score / length ** settings.length_penalty, tokens[row, 1:].tolist()))
                    continue
                rows.append((row, t))
                next_scores[i, kept] = score
                kept += 1
            while kept < k:  # too few live candidates: pad with a dead copy
                rows.append((i * k, end))
                kept += 1
            if len(finished[i]) >= k:
                open_[i] = False
        source = torch.tensor([r for r, _ in rows], device=images.device)
        new = torch.tensor([t for _, t in rows], device=images.device).unsqueeze(1)
        tokens = torch.cat([tokens[source], new], dim=1)
        scores = next_scores
        if not open_.any():
            break
    for i in range(n):
        if not finished[i]:  # nothing ended within max_length: the best live beam, cut there
            length = tokens.shape[1] - 1
            finished[i].append((scores[i, 0].item() / max(length, 1) ** settings.length_penalty,
                                tokens[i * k, 1:].tolist()))
    return [max(found, key=lambda f: f[0])[1] for found in finished]


class FinishedBeams:
    """One search's `size` best finished sequences, as transformers 4's `BeamHypotheses` keeps them:
    each scored by its summed score / its length ** `length_penalty`, with its stopping test."""

    def __init__(self, size: int, length_penalty: float):
        self.size, self.length_penalty = size, length_penalty
        self.found: list[tuple[float, list[int]]] = []

    def add(self, tokens: list[int], total: float, length: int) -> None:
        score = total / length ** self.length_penalty
        if len(self.found) < self.size or score > min(f[0] for f in self.found):
            self.found.append((score, tokens))
            if len(self.found) > self.size:  # drop the worst (the earliest found of equal ones)
                del self.found[min(range(len(self.found)), key=lambda j: self.found[j][0])]

    def is_done(self, best_total: float, length: int) -> bool:
        """Full, and no live beam can beat the worst kept (early_stopping=False's heuristic)."""
        return (len(self.found) >= self.size
                and min(f[0] for f in self.found) >= best_total / length ** self.length_penalty)


@torch.no_grad()
def group_beam_search(module: torch.nn.Module, images: torch.Tensor, settings: Any, start: int, end: int,
                      pad_id: int, context: int) -> list[list[int]]:
    """Each image's caption tokens (start dropped) under open_clip's `CoCa.generate` default, its
    `_generate_beamsearch` with transformers 4's `BeamSearchScorer`.

    The `beams` of an image form `beam_groups` groups of g beams that search apart, each group
    starting from one live beam. A beam's score is the sum of its tokens' processed logits (no
    softmax, no temperature); an end token finishes a hypothesis only among the group's g best
    candidates of a step, its length counting the start and end tokens; a group stops once its
    g-th best finished score beats what its best candidate could reach, and at `max_length` its
    live beams join the finished ones. The caption is the best of all groups'. open_clip passes no
    diversity penalty, so its groups search identically: `beam_groups: 1` with beams / groups beams
    gives the same captions at a fraction of the cost.
    """
    groups, g = settings.beam_groups, settings.beams // settings.beam_groups
    searches = images.shape[0] * groups  # search s = image s // groups, group s % groups; its rows s*g ... s*g+g-1
    image_latent, image_embs = module._encode_image(images)
    image_latent = image_latent.repeat_interleave(settings.beams, 0)
    image_embs = image_embs.repeat_interleave(settings.beams, 0)
    device = images.device
    tokens = torch.full((searches * g, 1), start, dtype=torch.long, device=device)
    scores = torch.full((searches, g), -1e9, device=device)
    scores[:, 0] = 0.0  # open_clip's start: the group's other beams at -1e9
    processors = logits_processors(settings, end)
    finished = [FinishedBeams(g, settings.length_penalty) for _ in range(searches)]
    done = [False] * searches
    while True:
        length = tokens.shape[1] + 1  # a hypothesis ending now: start and end tokens counted
        logits = processors(tokens, next_token_logits(module, tokens, image_latent, image_embs, context, pad_id,
                                                      block_special=False))
        vocab = logits.shape[1]
        best, index = (logits + scores.reshape(-1, 1)).reshape(searches, g * vocab).topk(2 * g, dim=1)
        source = torch.arange(searches * g, device=device)  # a done search keeps its rows, padded, as open_clip
        new = torch.full((searches * g,), pad_id, dtype=torch.long, device=device)
        next_scores = torch.zeros(searches, g, device=device)
        for s in range(searches):
            if done[s]:
                continue
            kept = 0
            for rank, (score, i) in enumerate(zip(best[s].tolist(), index[s].tolist())):
                row, token = s * g + i // vocab, i % vocab
                if token == end:
                    if rank < g:
                        finished[s].add(tokens[row, 1:].tolist(), score, length)
                    continue
                source[s * g + kept], new[s * g + kept], next_scores[s, kept] = row, token, score
                kept += 1
                if kept == g:
                    break
            done[s] = finished[s].is_done(best[s, 0].item(), length)
        tokens = torch.cat([tokens[source], new.unsqueeze(1)], dim=1)
        scores = next_scores
        if all(done) or tokens.shape[1] >= min(settings.max_length, context):
            break
    for s in range(searches):
        if not done[s]:  # max_length reached: the live beams are candidates too
            for j in range(g):
                finished[s].add(tokens[s * g + j, 1:].tolist(), scores[s, j].item(), tokens.shape[1])
    found = [[f for s in range(i * groups, (i + 1) * groups) for f in finished[s].found]
             for i in range(images.shape[0])]
    return [sorted(candidates, key=lambda f: f[0])[-1][1] for candidates in found]


@torch.no_grad()
def sample(module: torch.nn.Module, images: torch.Tensor, settings: Any, start: int, end: int, pad_id: int,
           context: int, generator: torch.Generator) -> list[list[int]]:
    """Each image's sampled token sequence (top-k or nucleus), seeded by `generator`."""
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    image_latent, image_embs = module._encode_image(images)
    warper = TopKLogitsWarper(settings.top_k) if settings.method == "top_k" else TopPLogitsWarper(settings.top_p)
    processors = logits_processors(settings, end)
    tokens = torch.full((images.shape[0], 1), start, dtype=torch.long, device=images.device)
    done = torch.zeros(images.shape[0], dtype=torch.bool, device=images.device)
    for _ in range(min(settings.max_length, context) - 1):
        logits = warper(tokens, processors(tokens, next_token_logits(module, tokens, image_latent, image_embs, context, pad_id)))
        probs = F.softmax(logits / settings.temperature, dim=-1)
        drawn = torch.multinomial(probs.cpu(), 1, generator=generator).to(images.device).squeeze(1)
        drawn = torch.where(done, torch.full_like(drawn, end), drawn)
        tokens = torch.cat([tokens, drawn.unsqueeze(1)], dim=1)
        done |= drawn == end
        if done.all():
            break
    return [row[1:] for row in tokens.tolist()]


class OpenClipCaptioner(OpenClipModel):
    """An open_clip CoCa: a dual encoder that also generates captions and learns from a captioning loss."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.start_token, self.end_token, self.pad_id = special_tokens(self.tokenizer)
        self.module.pad_id = self.pad_id
        self.context_length = int(self.tokenizer.context_length)  # tokens a caption may take, start and end included

    def generate_captions(self, pixels: torch.Tensor, **settings: Any) -> list[str]:
        """(B, 3, S, S) pixels -> B captions under the decoding settings (GenerationParams fields)."""
        from ktpipe.params import GenerationParams

        cfg = GenerationParams(**settings)
        was_training = self.module.training
        self.module.eval()
        images = self.normalize(pixels.to(self.device))
        try:
            if cfg.method == "open_clip":
                ids = group_beam_search(self.module, images, cfg, self.start_token, self.end_token, self.pad_id,
                                        self.context_length)
            elif cfg.method == "beam_search":
                ids = beam_search(self.module, images, cfg, self.start_token, self.end_token, self.pad_id,
                                  self.context_length)
            else:
                generator = torch.Generator().manual_seed(cfg.seed)
                ids = sample(self.module, images, cfg, self.start_token, self.end_token, self.pad_id,
                             self.context_length, generator)
        finally:
            self.module.train(was_training)
        return [clean_caption(self.tokenizer, row, self.end_token) for row in ids]

    def caption_loss_inputs(self, pixels: torch.Tensor, texts: list[str], targets: list[str]) -> dict[str, torch.Tensor]:
        """What open_clip's `CoCaLoss` takes, for B images: their embeddings and those of `texts`
        (the contrastive pairs), and the decoder's logits with the labels of `targets` (the
        captions it learns to generate; teacher forcing, as `CoCa.forward`)."""
        image_latent, image_embs = self.module._encode_image(self.normalize(pixels.to(self.device)))
        target_tokens = self.tokenize(targets)
        text_latent, token_embs = self.module._encode_text(target_tokens)
        if texts != targets:  # fine-tuning contrasts concept captions; pretraining generates the same texts
            text_latent, _ = self.module._encode_text(self.tokenize(texts))
        logits = self.module.text_decoder(image_embs, token_embs[:, :-1])
        return {"image_features": image_latent, "text_features": text_latent, "logits": logits,
                "labels": target_tokens[:, 1:], "logit_scale": self.module.logit_scale.exp()}

    def decoder_parameters(self) -> Iterable[torch.nn.Parameter]:
        """The text decoder's parameters (CoCa's captioning head)."""
        return self.module.text_decoder.parameters()


def is_coca(module: torch.nn.Module) -> bool:
    return isinstance(module, open_clip.CoCa)
