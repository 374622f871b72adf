"""Checkpoints that leave the pipeline: plain open_clip loads what `OpenClipModel.save` writes,
by built-in name plus weights file and as a local-dir folder, with no ktpipe import needed."""
import json

import open_clip
import pytest
import torch
from PIL import Image

from ktpipe.models import OpenClipModel
from ktpipe.models.openclip import CONFIG_FILE, WEIGHTS_FILE, builtin_arch, needs_quick_gelu


@pytest.fixture(autouse=True)
def offline(no_downloads):
    """Every test here runs with downloads blocked."""


def test_finetuned_vit_b32_loads_in_plain_open_clip_by_name(tmp_path):
    """Random-init ViT-B/32 at 224 px, visual weights changed as fine-tuning would, saved; then
    `create_model_and_transforms("ViT-B-32", pretrained=<file>)` gives the same network."""
    torch.manual_seed(0)
    model = OpenClipModel.from_config(open_clip.get_model_config("ViT-B-32"))
    with torch.no_grad():
        for param in model.tower_parameters("visual", last_blocks=2):
            param.add_(0.05 * torch.randn_like(param))
    model.save(tmp_path / "ckpt")

    config = json.loads((tmp_path / "ckpt" / CONFIG_FILE).read_text())
    assert config["arch"] == "ViT-B-32"
    plain, _, preprocess = open_clip.create_model_and_transforms(
        config["arch"], pretrained=str(tmp_path / "ckpt" / WEIGHTS_FILE))
    ours, theirs = model.module.state_dict(), plain.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)

    pixels = preprocess(Image.new("RGB", (320, 250), (200, 30, 90)))
    assert pixels.shape == (3, 224, 224)
    batch = torch.randn(3, 3, 224, 224)
    model.module.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain.eval().encode_image(batch), model.module.encode_image(batch))


def test_hf_text_checkpoint_loads_in_plain_open_clip_as_local_dir(tmp_path, random_checkpoint):
    """BiomedCLIP layout (timm ViT + BERT): the folder carries its tokenizer; encoders match."""
    folder = random_checkpoint("biomedclip")  # archs.save_random_checkpoint, once per session
    model = OpenClipModel.load(f"local-dir:{folder}")
    model.save(tmp_path / "copy")
    plain, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'copy'}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'copy'}")
    tokens = tokenizer(["a chest x ray", "normal lung"])
    torch.testing.assert_close(tokens, model.tokenize(["a chest x ray", "normal lung"]))
    image = torch.rand(1, 3, 224, 224)
    model.module.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain.eval().encode_text(tokens), model.module.encode_text(tokens))
        torch.testing.assert_close(plain.encode_image(image), model.module.encode_image(image))
    assert preprocess(Image.new("RGB", (300, 300))).shape == (3, 224, 224)
    assert json.loads((tmp_path / "copy" / CONFIG_FILE).read_text())["arch"] is None


def test_builtin_arch_matches_configs_by_content():
    config = open_clip.get_model_config("ViT-B-32")
    assert builtin_arch(config) == "ViT-B-32"
    assert builtin_arch({**config, "quick_gelu": True}, hint="ViT-B-32") == "ViT-B-32-quickgelu"
    assert builtin_arch({**config, "embed_dim": 7}) is None


def test_openai_tags_get_quick_gelu_under_the_plain_name(tmp_path):
    config = open_clip.get_model_config("ViT-B-32")
    assert needs_quick_gelu("ViT-B-32", "openai", config)
    assert not needs_quick_gelu("ViT-B-32-quickgelu", "openai", open_clip.get_model_config("ViT-B-32-quickgelu"))
    assert not needs_quick_gelu("ViT-B-32", "laion2b_s34b_b79k", config)
    assert not needs_quick_gelu("ViT-B-32", str(tmp_path / "weights.safetensors"), config)
