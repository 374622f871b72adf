"""Model backends: registry, open_clip loading paths without downloads, tower parameters, the
vision tower's intermediate tokens (VisionFeatures) and the lazy backend imports."""
import json
import subprocess
import sys

import open_clip
import pytest
import torch
from safetensors.torch import save_file

import ktpipe.models.base
from archs import ARCHS, EMBED_DIMS
from conftest import STAGE_ENV
from ktpipe.models import (BACKENDS, EmbedsImages, ModelLoadError, OpenClipModel, VisionFeatures, build_demo_model,
                           load_model)
from ktpipe.models.openclip import CONFIG_FILE, WEIGHTS_FILE

TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}


@pytest.fixture(autouse=True)
def offline(no_downloads):
    """Every test here runs with downloads blocked."""


def test_registry_lists_backends_and_rejects_unknown():
    assert {"open_clip", "demo"} <= set(BACKENDS)
    with pytest.raises(ModelLoadError, match="unknown model backend 'nope'"):
        load_model("nope", "ViT-B-32")


def test_unknown_open_clip_name_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="ViT-Nope-99"):
        load_model("open_clip", "ViT-Nope-99", device="cpu")


def test_missing_checkpoint_file_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="neither a known tag"):
        load_model("open_clip", "ViT-B-32", str(tmp_path / "missing.safetensors"), device="cpu")


def test_builtin_name_with_local_weights_file_loads_without_download(tmp_path):
    open_clip.add_model_config(_write_config(tmp_path))
    source = OpenClipModel.from_config(TINY)
    weights = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in source.module.state_dict().items()}, str(weights))
    model = load_model("open_clip", "ktpipe-tiny-test", str(weights), device="cpu")
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(model.encode_images(x), source.encode_images(x))


def test_local_dir_round_trip_through_plain_open_clip(tmp_path):
    source = OpenClipModel.from_config(TINY)
    source.save(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / CONFIG_FILE).is_file() and (tmp_path / "ckpt" / WEIGHTS_FILE).is_file()
    module, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'ckpt'}")
    tokens = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'ckpt'}")(["a red circle"])
    torch.testing.assert_close(module.encode_text(tokens), source.module.encode_text(tokens))


def test_vit_b32_architecture_shapes_and_towers():
    """The real ViT-B/32 architecture, random init: input size, embedding width, tower split."""
    model = load_model("open_clip", "ViT-B-32", None, device="cpu")
    assert model.image_size == 224
    with torch.no_grad():
        image = model.encode_images(torch.rand(1, 3, 224, 224))
        text = model.encode_texts(["a moongate", "a tonometer"])
    assert image.shape == (1, 512) and text.shape == (2, 512)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(2))
    visual = {id(p) for p in model.tower_parameters("visual")}
    text_params = {id(p) for p in model.tower_parameters("text")}
    assert visual and text_params and not visual & text_params
    assert visual == {id(p) for p in model.module.visual.parameters()}
    assert id(model.module.logit_scale) not in visual | text_params


# ViT-L/14 (428M parameters) takes about 11 s on one thread to build, save, load and run once.
# The folders come from conftest's session fixture `random_checkpoint` (archs.save_random_checkpoint,
# built once per session and shared with the preset tests).
@pytest.mark.parametrize("arch", ARCHS)
def test_real_architecture_loads_offline_from_its_folder(arch, random_checkpoint):
    """Random-init real architectures at 224 px: local-dir load, unit embeddings, tower split."""
    folder = random_checkpoint(arch)
    model = OpenClipModel.load(f"local-dir:{folder}")
    assert model.image_size == 224
    with torch.no_grad():
        images = model.encode_images(torch.rand(2, 3, 224, 224))  # (2, D)
        texts = model.encode_texts(["a chest x ray", "a photo of a lung"])  # (2, D)
    dim = EMBED_DIMS[arch]
    assert images.shape == (2, dim) and texts.shape == (2, dim)
    torch.testing.assert_close(images.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(texts.norm(dim=-1), torch.ones(2))
    visual = {id(p) for p in model.tower_parameters("visual")}
    text = {id(p) for p in model.tower_parameters("text")}
    assert visual and text and not visual & text
    assert visual == {id(p) for p in model.module.visual.parameters()}


def test_biomedclip_layout_uses_hf_text_tower_and_tokenizer(random_checkpoint):
    """CustomTextCLIP: BERT word-piece tokens, text params under `text.`, timm blocks selectable."""
    model = OpenClipModel.load(f"local-dir:{random_checkpoint('biomedclip')}")
    assert isinstance(model.module, open_clip.CustomTextCLIP)
    tokens = model.tokenize(["a chest x ray"])
    assert tokens.shape == (1, 256) and tokens[0, 0].item() == 2 and 1 not in tokens[0, :6].tolist()  # [CLS], no [UNK]
    names = {id(p): n for n, p in model.module.named_parameters()}
    assert all(names[id(p)].startswith("text.") for p in model.tower_parameters("text"))
    top = [names[id(p)] for p in model.tower_parameters("visual", last_blocks=2)]
    assert {n.split(".")[3] for n in top if ".blocks." in n} == {"10", "11"}
    assert "visual.head.proj.weight" in top and not any("patch_embed" in n or "pos_embed" in n for n in top)


@pytest.mark.parametrize("arch", ["tiny", "biomedclip"])
def test_tokenize_remembers_texts_and_matches_the_tokenizer(arch, random_checkpoint):
    """Cached token ids equal the tokenizer's own batch output, for repeated and new texts."""
    if arch == "tiny":
        model = OpenClipModel.from_config(TINY)
    else:
        model = OpenClipModel.load(f"local-dir:{random_checkpoint('biomedclip')}")
    texts = ["a photo of a dax.", "an outlined pink triangle on a gray background.", "a photo of a dax.",
             "a very long caption " * 30]
    first = model.tokenize(texts)
    torch.testing.assert_close(first, model.tokenizer(texts), rtol=0, atol=0)
    assert model._token_row.cache_info().hits == 1
    again = model.tokenize(["a photo of a wug.", *texts])
    torch.testing.assert_close(again, model.tokenizer(["a photo of a wug.", *texts]), rtol=0, atol=0)
    assert model._token_row.cache_info().hits == 5
    again[1] += 1  # the returned ids are a copy: editing them leaves the cache intact
    torch.testing.assert_close(model.tokenize(texts[:1]), first[:1], rtol=0, atol=0)


def test_demo_model_preprocess_gives_unit_range_pixels():
    from PIL import Image

    model = build_demo_model()
    pixels = model.preprocess(Image.new("RGB", (48, 40), (255, 0, 0)))
    assert pixels.shape == (3, 32, 32)
    assert pixels.min() >= 0 and pixels.max() <= 1 and pixels[0].mean() > 0.99


def test_demo_backend_without_checkpoint_says_what_to_run(tmp_path):
    with pytest.raises(ModelLoadError, match="dvc repro base_model` first"):
        load_model("demo", "ktpipe-demo", str(tmp_path / "nowhere"), device="cpu")


def test_model_load_error_lives_in_base_and_is_exported():
    assert ModelLoadError is ktpipe.models.base.ModelLoadError


def test_importing_ktpipe_models_imports_no_backend():
    """Capability interfaces stay light: open_clip (seconds to import) loads on first use only."""
    code = "import sys, ktpipe.models; print(sorted(m for m in ('open_clip', 'timm') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], env=STAGE_ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr
    from ktpipe.models.openclip import OpenClipModel as backend_class

    assert ktpipe.models.OpenClipModel is backend_class  # resolved on first use (module __getattr__)
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        ktpipe.models.Nope


# --- VisionFeatures: one block's tokens, read and edited -------------------------------------


class Store:
    """An edit that keeps its input and returns it unchanged."""

    def __init__(self):
        self.tokens = None

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens = tokens
        return tokens


def check_vision_features(model, pixels: torch.Tensor, tokens: int, width: int, layers: list[int]) -> None:
    """Through each of `layers`: an identity edit reproduces encode_images and sees (B, N, W)
    tokens; zeroing the tokens changes the embedding. A layer out of range is an error."""
    assert isinstance(model, VisionFeatures) and isinstance(model, EmbedsImages)
    model.module.eval()
    with torch.no_grad():
        plain = model.encode_images(pixels)  # (B, D)
        for layer in layers:
            store = Store()
            through = model.encode_images_through(pixels, layer, store)
            torch.testing.assert_close(through, plain)
            assert store.tokens.shape == (len(pixels), tokens, width)
            zeroed = model.encode_images_through(pixels, layer, torch.zeros_like)
            assert zeroed.shape == plain.shape and not torch.allclose(zeroed, plain, atol=1e-3)
        torch.testing.assert_close(model.encode_images(pixels), plain)  # the hook is gone afterwards
    for layer in (-1, model.vision_layers):
        with pytest.raises(ValueError, match=f"vision layer {layer} out of range"):
            model.encode_images_through(pixels, layer, Store())


def test_vision_features_of_a_tiny_vit():
    torch.manual_seed(0)
    model = OpenClipModel.from_config({**TINY, "vision_cfg": {**TINY["vision_cfg"], "layers": 2}})
    assert model.vision_layers == 2
    pixels = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    check_vision_features(model, pixels, tokens=1 + (16 // 8) ** 2, width=32, layers=[0, 1])  # class + 2x2 patches


def test_vision_features_of_biomedclip_timm_trunk(random_checkpoint):
    """BiomedCLIP's vision tower is a timm ViT (`visual.trunk.blocks`), not open_clip's own."""
    model = OpenClipModel.load(f"local-dir:{random_checkpoint('biomedclip')}")
    assert model.vision_layers == 12
    pixels = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    check_vision_features(model, pixels, tokens=1 + (224 // 16) ** 2, width=768, layers=[0, 11])  # first, last


def _write_config(tmp_path):
    path = tmp_path / "ktpipe-tiny-test.json"
    path.write_text(json.dumps(TINY))
    return path
