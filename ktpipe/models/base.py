"""Small capability interfaces that inversion, fine-tuning and evaluation talk to.

A backend implements the capabilities its model family has: an open_clip CLIP embeds images and
texts, scores pairs, exposes its vision blocks and trains; a cross-encoder (ViLT) only scores
pairs; a captioner (CoCa) also generates captions. Images enter as float pixels in [0, 1], shape
(B, 3, S, S) with S = `image_size` (evaluation batches of a PadsImages model: PaddedPixels); each
backend applies its own normalization, so inversion can optimize raw pixels. Callers ask
`isinstance(model, <capability>)`, never which family a model is.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, runtime_checkable

import torch
from PIL import Image

from ktpipe.errors import KtpipeError

class ModelLoadError(KtpipeError):
    """A model name, pretrained tag or checkpoint cannot be resolved (each backend raises it for its own)."""


DUAL_ENCODER = "dual_encoder"  # separate image and text embeddings (CLIP, CoCa, BiomedCLIP)
CROSS_ENCODER = "cross_encoder"  # scores an image-text pair jointly (ViLT)


@runtime_checkable
class TakesImages(Protocol):
    """Decoded images to the pixels every other capability takes."""

    image_size: int
    resize_rule: str  # how `preprocess` brings an image to S x S, in words (recorded beside inversions)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> (3, S, S) float tensor in [0, 1] ((3, H, W) of its own size for PadsImages)."""


@dataclass(frozen=True)
class PaddedPixels:
    """Images of different sizes as one batch: `pixels` (B, 3, H, W) in [0, 1], each image at the
    top left and zeros beyond it, and `mask` (B, H, W), 1 on an image's own pixels (ViLT's pixel_mask)."""

    pixels: torch.Tensor
    mask: torch.Tensor

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def __getitem__(self, index: Any) -> "PaddedPixels":
        return PaddedPixels(self.pixels[index], self.mask[index])


@runtime_checkable
class PadsImages(TakesImages, Protocol):
    """Images kept at their own aspect ratio (ViLT's processor): `preprocess` sizes differ, so the
    model batches them itself, padded, with a mask; its pair scores take PaddedPixels too."""

    def collate_images(self, images: list[torch.Tensor]) -> PaddedPixels:
        """(3, H_i, W_i) pixels from `preprocess` -> one padded batch."""


@runtime_checkable
class CutsTexts(Protocol):
    """A model whose own library cuts texts past its text limit (ViLT: 40 tokens). Evaluation cuts
    its texts (captions, class prompts) the same way; descriptions and fine-tuning captions over the
    limit stay errors naming the text."""

    def fit_texts(self, texts: list[str]) -> list[str]:
        """Each text cut to the model's text limit; a text that fits comes back unchanged."""


@runtime_checkable
class EmbedsImages(TakesImages, Protocol):
    """Pixels to embeddings (dual encoders)."""

    def encode_images(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, 3, S, S) pixels in [0, 1] -> (B, D) embeddings, L2-normalized unless `normalize` is False."""


@runtime_checkable
class EmbedsTexts(Protocol):
    """Texts to embeddings in the image embeddings' space (dual encoders)."""

    def encode_texts(self, texts: list[str], normalize: bool = True) -> torch.Tensor:
        """Texts -> (T, D) embeddings, L2-normalized unless `normalize` is False."""

    def logit_scale(self) -> torch.Tensor:
        """The temperature multiplier applied to cosine similarities (a scalar)."""


@runtime_checkable
class ScoresPairs(TakesImages, Protocol):
    """Match scores of images against texts (every model; a cross-encoder's only view)."""

    def text_targets(self, texts: list[str]) -> Any:
        """What `score_targets` compares images with: the (T, D) normalized text embeddings of a
        dual encoder (computed once when its text tower is frozen), the texts for a cross-encoder."""

    def score_targets(self, pixels: torch.Tensor, targets: Any) -> torch.Tensor:
        """(B, 3, S, S) pixels against T targets -> (B, T) scores (cosine, or a match logit)."""

    def score_pairs(self, pixels: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """(B, 3, S, S) pixels and B aligned texts -> (B,) scores."""


@runtime_checkable
class PredictsMaskedWords(TakesImages, Protocol):
    """Masked language modelling on an image and a text (ViLT's MLM head)."""

    def word_masker(self, seed: int) -> Callable[[list[str]], Any]:
        """A seeded masker: texts -> the model's masked token batch and labels (whole words at
        the model's masking rate); each call masks anew."""

    def masked_word_loss(self, pixels: torch.Tensor, masked: Any) -> torch.Tensor:
        """Cross-entropy of the masked tokens predicted from (B, 3, S, S) pixels and B masked texts."""


@runtime_checkable
class GeneratesCaptions(TakesImages, Protocol):
    """Image captioning (CoCa)."""

    def generate_captions(self, pixels: torch.Tensor, **settings: Any) -> list[str]:
        """(B, 3, S, S) pixels -> B captions, cleaned of special tokens; `settings` are the
        decoding settings (method, beams, max length, ...)."""


@runtime_checkable
class LearnsCaptions(Protocol):
    """A captioning loss to train on (CoCa): the inputs of open_clip's CoCaLoss, and its decoder."""

    pad_id: int  # the token id the captioning loss ignores

    def caption_loss_inputs(self, pixels: torch.Tensor, texts: list[str], targets: list[str]) -> dict[str, torch.Tensor]:
        """For B images: image and `texts` embeddings (contrastive pairs), and the decoder's logits
        and labels for generating `targets` (teacher forcing)."""

    def decoder_parameters(self) -> Iterable[torch.nn.Parameter]:
        """The text decoder's parameters."""


@runtime_checkable
class VisionFeatures(Protocol):
    """A vision tower's intermediate tokens, and the forward pass continued from edited ones
    (saliency: M2IB's bottleneck replaces one block's output)."""

    vision_layers: int  # number of vision transformer blocks

    def vision_token_grid(self) -> tuple[int, int, int]:
        """How a block's output tokens (B, N, W) lie: (prefix, rows, cols), N = prefix + rows * cols,
        the prefix (class and register tokens) first, then the patches row by row."""

    def encode_images_through(self, pixels: torch.Tensor, layer: int,
                              edit: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """(B, D) normalized image embeddings, computed with the output tokens (B, N, W) of vision
        block `layer` (0-based) replaced by `edit(tokens)`; an edit that stores its input reads them."""


@runtime_checkable
class Invertible(Protocol):
    """What inversion (paper Eq. 3) optimizes pixels against."""

    image_size: int
    module: torch.nn.Module

    def text_target(self, text: str, similarity: str = "cosine") -> Any:
        """What `similarity` compares views with (a text embedding; the text itself for a cross-encoder)."""

    def similarity(self, pixels: torch.Tensor, target: Any, similarity: str = "cosine") -> torch.Tensor:
        """(N,) differentiable similarity of each image to the target (cosine or -L2; a match score)."""


@runtime_checkable
class Trainable(Protocol):
    """Which parameters fine-tuning trains, and a checkpoint its own library loads again."""

    module: torch.nn.Module  # the underlying network (for .train()/.eval()/.to())

    def tower_parameters(self, tower: str, last_blocks: int | None = None) -> Iterable[torch.nn.Parameter]:
        """Parameters of 'visual' or 'text' (or 'both'); `last_blocks` limits the visual tower
        to its last transformer blocks and head."""

    def save(self, out_dir: Path) -> None:
        """Write a checkpoint folder that the backend's own library loads again."""


def is_dual_encoder(model: Any) -> bool:
    """Whether the model embeds both images and texts, so one similarity matrix scores every pair."""
    return isinstance(model, EmbedsImages) and isinstance(model, EmbedsTexts)


def require(model: Any, capability: type, what: str) -> None:
    """Stop with a clear error when `model` lacks the capability `what` needs."""
    if not isinstance(model, capability):
        raise KtpipeError(f"{what} needs a model that {capability.__doc__.split('(')[0].strip().lower()} "
                          f"({capability.__name__}); {type(model).__name__} does not")


SQUARE_RESIZE = "shorter side to {size} px (bicubic, antialiased), center crop {size}x{size}"


def square_pixels(size: int) -> Callable[[Image.Image], torch.Tensor]:
    """A backend's preprocess: PIL image -> (3, size, size) float pixels in [0, 1], the shorter
    side resized (bicubic, antialiased) and the center cropped (`SQUARE_RESIZE`)."""
    from torchvision.transforms import v2 as T  # heavy to import; only the backends call this

    return T.Compose([
        T.ToImage(),
        T.Resize(size, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
        T.CenterCrop(size),
        T.ToDtype(torch.float32, scale=True),
    ])
