"""ViLT backend: a cross-encoder that only scores image-text pairs (image-text matching, ITM),
through transformers' `ViltForImageAndTextRetrieval` and `ViltProcessor`.

A checkpoint is a hub id or a local folder in transformers' layout (`config.json`, weights,
tokenizer files); 'local-dir:<folder>' names a folder as the other backends do. The match score
is one logit: a retrieval checkpoint's `rank_output`, or, for checkpoints that keep ViLT's
pretraining head (`itm_score.fc`, two-way: no match, match), its log-odds (row 1 minus row 0, for
weight and bias), which ranks pairs as the softmax match probability does. A checkpoint with
neither is refused: `from_pretrained` would start the head at random.

Images go through the checkpoint's own `ViltImageProcessor`, as in ViLT: `preprocess` resizes
the shorter side to the processor's shortest edge (384), the longer to at most 1333/800 of it,
both rounded down to multiples of 32 (bicubic), and keeps pixels in [0, 1] at that size;
`collate_images` pads a batch to its largest image with the processor's `pad` and returns the
pixel mask (PaddedPixels). Square (B, 3, S, S) tensors (inverted images, fine-tuning batches)
do not go through the processor: they enter as they are with an all-ones mask, which is what
the processor gives an S x S image when S is its shortest edge and a multiple of 32 (ViLT's
checkpoints: `image_size` 384). The backend normalizes (ViLT's mean and std, 0.5; padding stays
0, as the processor pads after normalizing). The demo ViLT (ktpipe.demo.vilt) keeps the
square crop at its 32 px (`keeps_aspect` False).

Texts take at most `max_position_embeddings` tokens (40), start and end included. Evaluation cuts
longer texts to that limit (`fit_texts`), as ViLT's own text pipeline truncates at 40; a longer
text given to `tokenize` (descriptions at inversion, fine-tuning captions) is an error naming it.

A checkpoint that keeps ViLT's masked-language-modelling head (`mlm_score.*`, as
`dandelin/vilt-b32-mlm-itm` and `ViltForMaskedLM` checkpoints do) also predicts masked words
(masked language modelling fine-tuning, paper Sec. 8.9); the head rides along in the module as
`mlm_score`, so fine-tuning and saving treat it as the rest of the network. Its masker picks
whole words at 15% and, as ViLT's whole-word collator (BERT's recipe), turns 80% of the picked
tokens into [MASK], 10% into a random token and leaves 10% unchanged (the demo ViLT: all [MASK]).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open

from ktpipe.models import LOCAL_DIR
from ktpipe.models.base import CROSS_ENCODER, SQUARE_RESIZE, ModelLoadError, PaddedPixels, square_pixels

ITM_HEAD = ("itm_score.fc.weight", "itm_score.fc.bias")  # ViLT pretraining's two-way head
RANK_HEAD = ("rank_output.weight", "rank_output.bias")  # transformers' one-logit retrieval head
MLM_HEAD = "mlm_score."  # ViLT pretraining's masked-language-modelling head
PAIR_CHUNK = 64  # image-text pairs per forward pass when scoring every pair
MASKING_RATE = 0.15  # share of a text's words masked for masked language modelling (ViLT, BERT)
REPLACE_SPLIT = (0.8, 0.1)  # of the masked tokens: share made [MASK], share made a random token (rest kept)
PROCESSOR_RULE = ("ViLT's image processor: shorter side to {shortest} px, longer at most 1333/800 of it, both "
                  "rounded down to multiples of 32 (bicubic), padded in a batch with a pixel mask; square "
                  "{size}x{size} tensors (inverted images) enter as they are")
RESIZE_RULE = (SQUARE_RESIZE + "; ViLT's own processor keeps the aspect ratio (shorter side {size}, longer at "
               "most 640/384 of it, multiples of 32) and masks the padding: the square crop fills the patch grid")


def checkpoint_source(name: str) -> str:
    """A hub id or a folder, from a model name ('local-dir:<folder>' as the other backends)."""
    return name[len(LOCAL_DIR):] if name.startswith(LOCAL_DIR) else name


def checkpoint_file(source: str) -> Path:
    """The weights file of a folder or hub checkpoint: model.safetensors, else pytorch_model.bin."""
    names = ("model.safetensors", "pytorch_model.bin")
    if Path(source).is_dir():
        found = [Path(source) / name for name in names if (Path(source) / name).is_file()]
    else:  # a hub id, reached only at sites with hub access (or its cache)
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        found = []
        for name in names:
            try:
                found.append(Path(hf_hub_download(source, name)))
                break
            except EntryNotFoundError:
                continue
    if not found:
        raise ModelLoadError(f"ViLT checkpoint {source!r} has neither {names[0]} nor {names[1]}")
    return found[0]


def checkpoint_tensors(source: str, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors whose names start with one of `prefixes` (heads that the model
    class does not hold): read from safetensors by name, or from a PyTorch file with weights_only."""
    path = checkpoint_file(source)
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys() if key.startswith(prefixes)}
    state = torch.load(path, weights_only=True, map_location="cpu")
    return {key: value for key, value in state.items() if key.startswith(prefixes)}


def match_head(missing: list[str], state: dict[str, torch.Tensor], source: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(weight (1, H), bias (1,)) of the one match logit when the checkpoint has no `rank_output`:
    the two-way ITM head's log-odds. None when `rank_output` loaded; an error when neither head
    is in the checkpoint (`state`: its head tensors)."""
    absent = [key for key in RANK_HEAD if key in missing]
    if not absent:
        return None
    if not all(key in state for key in ITM_HEAD):
        raise ModelLoadError(
            f"ViLT checkpoint {source!r} has no image-text matching head: missing {absent} (retrieval head) and "
            f"{[k for k in ITM_HEAD if k not in state]} (pretraining head); transformers would start it at random"
        )
    weight, bias = (state[key] for key in ITM_HEAD)
    if weight.shape[0] != 2:
        raise ModelLoadError(f"ViLT checkpoint {source!r}: {ITM_HEAD[0]} has {weight.shape[0]} rows, expected 2")
    return (weight[1] - weight[0]).unsqueeze(0), (bias[1] - bias[0]).reshape(1)


def masked_word_head(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> torch.nn.Module | None:
    """ViLT's MLM head (`ViltMLMHead`) from the checkpoint's `mlm_score.*` tensors, or None when it
    has none. Where the checkpoint leaves the decoder weight out (ViLT ties it to the word
    embeddings), the head starts from a copy of them; any other missing tensor is an error."""
    from transformers.models.vilt.modeling_vilt import ViltMLMHead

    tensors = {key[len(MLM_HEAD):]: value for key, value in state.items() if key.startswith(MLM_HEAD)}
    if not tensors:
        return None
    head = ViltMLMHead(module.config)
    if "decoder.weight" not in tensors:
        tensors["decoder.weight"] = module.vilt.embeddings.text_embeddings.word_embeddings.weight.detach().clone()
    missing = sorted(set(head.state_dict()) - set(tensors))
    if missing:
        raise ModelLoadError(f"ViLT checkpoint {source!r}: its masked-language-modelling head lacks "
                             f"{[MLM_HEAD + key for key in missing]}")
    head.load_state_dict(tensors, strict=False)
    return head


def replace_masked(input_ids: torch.Tensor, labels: torch.Tensor, split: tuple[float, float], vocab_size: int,
                   generator: torch.Generator) -> torch.Tensor:
    """BERT's replacement of masked tokens, token by token as ViLT's collator draws it: of the
    positions with a label (B, L), a share split[0] stays [MASK], split[1] becomes a random token of
    the vocabulary, the rest gets its own token (the label) back."""
    masked = labels != -100
    draw = torch.rand(labels.shape, generator=generator)
    to_random = masked & (draw >= split[0]) & (draw < split[0] + split[1])
    kept = masked & (draw >= split[0] + split[1])
    out = input_ids.clone()
    out[to_random] = torch.randint(vocab_size, labels.shape, generator=generator)[to_random]
    out[kept] = labels[kept]
    return out


class ViltTextBudget:
    """The text budget of a ViLT tokenizer: `context_length` tokens, [CLS] and [SEP] included."""

    def __init__(self, tokenizer: Any, context_length: int):
        self.tokenizer, self.context_length = tokenizer, int(context_length)

    def count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def kept(self, text: str) -> str:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][: self.context_length - 2]
        return self.tokenizer.decode(ids)


class ViltCrossEncoder:
    """A ViLT image-text matching model behind the ktpipe interface (ScoresPairs, PadsImages,
    CutsTexts, Invertible, Trainable, and PredictsMaskedWords when the checkpoint has an MLM head)."""

    kind = CROSS_ENCODER
    keeps_aspect = True  # images through ViLT's image processor (False: the square crop, the demo's)
    replace_split = REPLACE_SPLIT  # what masked tokens become (the demo ViLT: every one [MASK])

    def __init__(self, module: torch.nn.Module, processor: Any, device: str = "cpu", base_model: str | None = None):
        if device == "cpu":
            # ViLT gathers each image's patches by index; on a multi-threaded CPU the gather's
            # backward accumulates in whatever order the threads finish, so training twice on the
            # same inputs gave different bytes. Deterministic kernels make a rerun of a stage write
            # the same bytes, so DVC skips what follows (process-wide; warn, never fail).
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.module = module.to(device)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.device = device
        self.base_model = base_model
        config = module.config
        self.image_size = int(config.image_size)
        self.context_length = int(config.max_position_embeddings)
        self.mean = torch.tensor(processor.image_processor.image_mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(processor.image_processor.image_std, device=device).view(1, 3, 1, 1)
        self._to_pixels = square_pixels(self.image_size)
        if self.keeps_aspect:
            self.resize_rule = PROCESSOR_RULE.format(shortest=processor.image_processor.size["shortest_edge"],
                                                     size=self.image_size)
        else:
            self.resize_rule = RESIZE_RULE.format(size=self.image_size)

    @classmethod
    def load(cls, name: str, pretrained: str | None = None, device: str = "cpu") -> "ViltCrossEncoder":
        """A hub id or a folder; the match head as the module docstring says."""
        from transformers import ViltForImageAndTextRetrieval, ViltProcessor
        from transformers.utils import logging as hf_logging

        source = checkpoint_source(pretrained or name)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # its load report lists the heads this method handles below
        try:
            module, info = ViltForImageAndTextRetrieval.from_pretrained(source, output_loading_info=True)
            processor = ViltProcessor.from_pretrained(source)
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"cannot load ViLT checkpoint {source!r}: {err}") from err
        finally:
            hf_logging.set_verbosity(verbosity)
        state = checkpoint_tensors(source, (*ITM_HEAD, MLM_HEAD))
        head = match_head(info["missing_keys"], state, source)
        if head is not None:
            with torch.no_grad():
                module.rank_output.weight.copy_(head[0])
                module.rank_output.bias.copy_(head[1])
        words = masked_word_head(module, state, source)
        if words is not None:
            module.add_module(MLM_HEAD.rstrip("."), words)
        module.eval()
        return cls(module, processor, device, base_model=source)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """(3, H, W) pixels in [0, 1] resized by ViLT's image processor (module docstring); with
        `keeps_aspect` False, (3, S, S): shorter side resized to S, center crop."""
        if not self.keeps_aspect:
            return self._to_pixels(image.convert("RGB"))
        found = self.processor.image_processor(image.convert("RGB"), do_normalize=False, do_pad=False,
                                               return_tensors="pt")
        return found["pixel_values"][0]

    def collate_images(self, images: list[torch.Tensor]) -> PaddedPixels:
        """One batch of `preprocess` outputs, padded to the largest by ViLT's image processor, with
        its pixel mask."""
        padded, masks = self.processor.image_processor.pad(list(images), return_mask=True)
        return PaddedPixels(torch.stack(padded), torch.stack(masks))

    def fit_texts(self, texts: list[str]) -> list[str]:
        """Each text cut to `context_length` tokens ([CLS] and [SEP] included), as ViLT truncates
        its texts; a text that fits comes back unchanged."""
        budget = ViltTextBudget(self.tokenizer, self.context_length)
        return [budget.kept(text) if budget.count(text) > self.context_length else text for text in texts]

    def _encode(self, texts: list[str], **extra: Any) -> list[dict[str, list[int]]]:
        """Each text's token ids (with [CLS] and [SEP]); a text over the context is an error naming
        it and its length."""
        encoded = [self.tokenizer(text, **extra) for text in texts]
        for text, tokens in zip(texts, encoded):
            if len(tokens["input_ids"]) > self.context_length:
                raise ModelLoadError(f"text {text[:60]!r} has {len(tokens['input_ids'])} tokens; "
                                     f"ViLT reads at most {self.context_length}")
        return encoded

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask, token_type_ids (T, L), padded to the context length."""
        batch = self.tokenizer.pad(self._encode(texts), padding="max_length", max_length=self.context_length,
                                   return_tensors="pt")
        return {key: value.to(self.device) for key, value in batch.items()}

    def _pixel_inputs(self, pixels: torch.Tensor | PaddedPixels) -> dict[str, torch.Tensor]:
        """ViLT's pixel_values (normalized; padding 0) and pixel_mask (all ones for a square batch)."""
        if isinstance(pixels, PaddedPixels):
            mask = pixels.mask.to(self.device)
            values = (pixels.pixels.to(self.device) - self.mean) / self.std * mask.unsqueeze(1)
            return {"pixel_values": values, "pixel_mask": mask}
        mask = torch.ones(pixels.shape[0], *pixels.shape[-2:], dtype=torch.long, device=self.device)
        return {"pixel_values": (pixels.to(self.device) - self.mean) / self.std, "pixel_mask": mask}

    def _image_tokens(self, pixels: torch.Tensor | PaddedPixels) -> tuple[torch.Tensor, torch.Tensor]:
        """ViLT's embedded image tokens (B, P, D) and their mask (B, P). ViLT's patch sampling
        draws the order of each image's patches at random; attention does not depend on it, but
        float sums do, so the draw is seeded here and the same inputs give the same bytes (the
        global random state is left as it was)."""
        inputs = self._pixel_inputs(pixels)
        values = inputs["pixel_values"]
        devices = [values.device.index or 0] if values.is_cuda else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(0)
            embeds, masks, _ = self.module.vilt.embeddings.visual_embed(
                inputs["pixel_values"], inputs["pixel_mask"], max_image_length=self.module.config.max_image_length)
        return embeds, masks

    def match_logits(self, pixels: torch.Tensor | PaddedPixels, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """(N,) match logits of N (image, text) pairs, row by row."""
        embeds, masks = self._image_tokens(pixels)
        return self.module(image_embeds=embeds, pixel_mask=masks, **tokens).logits[:, 0]

    def text_targets(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenize(texts)

    def score_targets(self, pixels: torch.Tensor | PaddedPixels, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T) match logits of every image with every text, PAIR_CHUNK pairs per pass; each
        image's patch embeddings are computed once and shared by its pairs."""
        n_images, n_texts = len(pixels), targets["input_ids"].shape[0]
        image_index = torch.arange(n_images, device=self.device).repeat_interleave(n_texts)
        text_index = torch.arange(n_texts, device=self.device).repeat(n_images)
        embeds, masks = self._image_tokens(pixels)
        scores = []
        for start in range(0, n_images * n_texts, PAIR_CHUNK):
            images, texts = image_index[start:start + PAIR_CHUNK], text_index[start:start + PAIR_CHUNK]
            tokens = {key: value[texts] for key, value in targets.items()}
            scores.append(self.module(image_embeds=embeds[images], pixel_mask=masks[images], **tokens).logits[:, 0])
        return torch.cat(scores).reshape(n_images, n_texts)

    def score_pairs(self, pixels: torch.Tensor | PaddedPixels, texts: list[str]) -> torch.Tensor:
        return self.match_logits(pixels, self.tokenize(texts))

    def text_target(self, text: str, similarity: str = "cosine") -> dict[str, torch.Tensor]:
        return self.tokenize([text])

    def similarity(self, pixels: torch.Tensor, target: dict[str, torch.Tensor], similarity: str = "cosine") -> torch.Tensor:
        """(N,) log-probability that each image matches the text: maximizing it is the
        cross-entropy to 'match' that inverting ViLT minimizes."""
        tokens = {key: value.expand(pixels.shape[0], -1) for key, value in target.items()}
        return F.logsigmoid(self.match_logits(pixels, tokens))

    def word_masker(self, seed: int) -> Callable[[list[str]], dict[str, torch.Tensor]]:
        """Whole-word masking at 15% (ViLT's MLM setup) through transformers'
        `DataCollatorForLanguageModeling`, seeded: texts -> input_ids with masked words, labels
        (-100 where nothing is predicted), attention_mask, token_type_ids. Of the masked tokens,
        `replace_split` says the shares that become [MASK] and a random token (80% and 10%, as
        ViLT's whole-word collator); the rest keep their token. The collator's whole-word mode
        makes every masked token [MASK], so `replace_masked` redraws the split afterwards."""
        from transformers import DataCollatorForLanguageModeling

        collator = DataCollatorForLanguageModeling(self.tokenizer, mlm_probability=MASKING_RATE, whole_word_mask=True,
                                                   mask_replace_prob=1.0, random_replace_prob=0.0, seed=seed)
        generator = torch.Generator().manual_seed(seed + 1)  # a stream apart from the collator's (`seed`)

        def mask(texts: list[str]) -> dict[str, torch.Tensor]:
            # padded one by one (padding never cuts, so the length check still sees a long text): the
            # collator cannot pad the offset mapping that whole-word masking reads
            encoded = self._encode(texts, padding="max_length", max_length=self.context_length,
                                   return_special_tokens_mask=True, return_offsets_mapping=True)
            batch = collator(encoded)
            if self.replace_split != (1.0, 0.0):
                batch["input_ids"] = replace_masked(batch["input_ids"], batch["labels"], self.replace_split,
                                                    len(self.tokenizer), generator)
            return {key: value.to(self.device) for key, value in batch.items()}

        return mask

    def masked_word_loss(self, pixels: torch.Tensor, masked: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy of the masked tokens, predicted by the MLM head from the text positions of
        the joint sequence; 0 (with a gradient path) when the masker happened to mask nothing."""
        if not hasattr(self.module, MLM_HEAD.rstrip(".")):
            raise ModelLoadError(f"ViLT checkpoint {self.base_model!r} has no masked-language-modelling head "
                                 f"({MLM_HEAD}*): masked language modelling needs a ViltForMaskedLM or "
                                 "vilt-b32-mlm-itm checkpoint")
        tokens = {key: value for key, value in masked.items() if key != "labels"}
        embeds, masks = self._image_tokens(pixels)
        hidden = self.module.vilt(image_embeds=embeds, pixel_mask=masks, **tokens).last_hidden_state
        logits = self.module.mlm_score(hidden[:, : tokens["input_ids"].shape[1]])
        labels = masked["labels"]
        if not (labels != -100).any():
            return logits.sum() * 0.0
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)

    def tower_parameters(self, tower: str, last_blocks: int | None = None) -> Iterable[torch.nn.Parameter]:
        """ViLT is one transformer over both modalities: `text` is its text embeddings, `visual`
        everything else (patch embeddings, encoder, pooler, match and MLM heads; with `last_blocks`,
        only the last blocks and what follows them), `both` all of it."""
        if tower not in ("visual", "text", "both"):
            raise ValueError(f"tower must be visual, text or both, got {tower!r}")
        layers = self.module.config.num_hidden_layers
        first = 0 if last_blocks is None else layers - last_blocks
        for name, param in self.module.named_parameters():
            text = name.startswith("vilt.embeddings.text_embeddings.")
            if tower == "text" and text or tower == "both":
                yield param
            elif tower == "visual" and not text and self._after(name, first):
                yield param

    @staticmethod
    def _after(name: str, first: int) -> bool:
        """Whether parameter `name` is in encoder block `first` or later, or after the encoder."""
        if name.startswith("vilt.encoder.layer."):
            return int(name.split(".")[3]) >= first
        return first == 0 or not name.startswith("vilt.embeddings.")

    def save(self, out_dir: Path) -> None:
        """transformers' folder layout (safetensors weights, config, processor), loadable by name;
        an MLM head is saved as `mlm_score.*` beside the retrieval weights."""
        out_dir = Path(out_dir)
        self.module.save_pretrained(out_dir, safe_serialization=True)
        self.processor.save_pretrained(out_dir)


def load_vilt_text_budget(name: str, pretrained: str | None = None) -> ViltTextBudget:
    """The text budget of a ViLT checkpoint, from its tokenizer and config alone."""
    from transformers import AutoTokenizer, ViltConfig

    source = checkpoint_source(pretrained or name)
    try:
        return ViltTextBudget(AutoTokenizer.from_pretrained(source),
                              ViltConfig.from_pretrained(source).max_position_embeddings)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load ViLT tokenizer of {source!r}: {err}") from err
