"""LLM descriptions (ktpipe.describe) and the generated-descriptions file of the concepts stage.

The LLM is a random-init one-layer Llama with a word-level tokenizer built offline, saved with
`save_pretrained` like any local model folder: its words are noise, but prompts, decoding,
seeding, caching and errors behave as with Llama-3-8B-Instruct. The concepts stage (`ktpipe
concepts`) runs in-process through the CLI (conftest `run_stage_here`; tests/test_stages.py runs it
as a subprocess).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from conftest import make_project, run_stage_here, write_params
from ktpipe.concepts import ConceptsError, ConceptText, GENERATED_HEADER, load_generated
from ktpipe.describe import (
    build_messages,
    clean_description,
    concept_seed,
    describe_concepts,
    load_generator,
    pick_device,
    pick_dtype,
    render_prompt,
)
from ktpipe.params import PAPER_PROMPT, GeneratorParams

SPECIAL = ["<unk>", "<pad>", "<s>", "</s>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
WORDS = "a round grey stone arch in a garden wall with brass dials and silver rings that spin . ,"
CONCEPTS_FILE = "concepts:\n  blicket: a striped orange ring\n  moongate: {label: moon gate}\n"
CONCEPTS = ["blicket", "moongate", "gyroscope"]  # described, listed without description, absent


def build_tokenizer(chat_template: str | None):
    """A word-level tokenizer over the paper prompt's words (and a few more), with special tokens."""
    from transformers import PreTrainedTokenizerFast

    text = f"{PAPER_PROMPT.format(name='moon gate gyroscope lung cancer')} {WORDS} <|user|> <|assistant|>"
    words = sorted(set(text.replace(".", " . ").replace(",", " , ").split()))
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(SPECIAL + words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                        bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = chat_template
    return tokenizer


def save_tiny_lm(folder: Path, chat_template: str | None = CHAT_TEMPLATE) -> Path:
    """A random-init one-layer Llama and its tokenizer, saved as a local model folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(chat_template)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    return save_tiny_lm(tmp_path_factory.mktemp("lm") / "tiny-llama")


def generator(model: Path, **overrides) -> GeneratorParams:
    return GeneratorParams(model=str(model), max_new_tokens=8, device="cpu", **overrides)


# --- prompt ----------------------------------------------------------------------------------


def test_rendered_prompt_is_the_paper_prompt_with_the_concept_name(tiny_lm):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm)
    text = render_prompt(tokenizer, ConceptText("lung_cancer", ""), PAPER_PROMPT)
    assert PAPER_PROMPT.format(name="lung cancer") in text
    assert "ImageNet class lung cancer without" in text and "{name}" not in text
    assert text.startswith("<s><|user|> ") and text.endswith("<|assistant|> ")  # ready for the reply


def test_messages_use_the_label():
    concept = ConceptText("hair_drier", "", label="hair dryer")
    assert build_messages(concept, "Describe {name}.") == [{"role": "user", "content": "Describe hair dryer."}]


@pytest.mark.parametrize("prompt, message", [
    ("Describe the class.", "must contain '{name}'"),
    ("Describe {name} in {style}.", "placeholder other than"),
])
def test_bad_prompts_are_named(prompt, message):
    with pytest.raises(ConceptsError, match=message):
        build_messages(ConceptText("moongate", ""), prompt)


# --- decoding --------------------------------------------------------------------------------


def descriptions(model: Path, names: list[str], **overrides) -> list[str]:
    concepts = [ConceptText(n, "") for n in names]
    return [c.description for c in describe_concepts(concepts, generator(model, **overrides))]


def test_greedy_generation_is_deterministic(tiny_lm):
    first = descriptions(tiny_lm, ["moongate", "gyroscope"])
    assert first == descriptions(tiny_lm, ["moongate", "gyroscope"])
    assert all(d and d == " ".join(d.split()) for d in first)  # one clean paragraph each


def test_sampling_is_seeded_per_concept(tiny_lm):
    sampled = descriptions(tiny_lm, ["moongate", "gyroscope"], do_sample=True, seed=0)
    assert sampled == descriptions(tiny_lm, ["moongate", "gyroscope"], do_sample=True, seed=0)
    other_seeds = [descriptions(tiny_lm, ["moongate"], do_sample=True, seed=s)[0] for s in (1, 2, 3)]
    assert len({sampled[0], *other_seeds}) > 1  # a random-init model's next-word distribution is flat
    # a concept's seed does not depend on which other concepts are described with it
    assert descriptions(tiny_lm, ["gyroscope"], do_sample=True, seed=0) == sampled[1:]
    assert concept_seed(GeneratorParams(seed=0), "moongate") != concept_seed(GeneratorParams(seed=0), "gyroscope")


def test_source_records_model_decoding_and_prompt(tiny_lm):
    [concept] = describe_concepts([ConceptText("moongate", "", label="moon gate")], generator(tiny_lm))
    assert str(tiny_lm) in concept.source and "greedy decoding" in concept.source
    assert "max_new_tokens 8" in concept.source and PAPER_PROMPT.format(name="moon gate") in concept.source
    assert concept.label == "moon gate" and concept.role == "novel"


@pytest.mark.parametrize("reply, cleaned", [
    ('  "A round\n\n  stone   arch."  ', "A round stone arch."),
    ("“A round arch.”", "A round arch."),
    ('A red sign with the word "STOP"', 'A red sign with the word "STOP"'),
    ("'It is \"round\"'", 'It is "round"'),
])
def test_clean_description(reply, cleaned):
    assert clean_description(reply) == cleaned


def test_empty_reply_is_an_error(tiny_lm, monkeypatch):
    import ktpipe.describe

    monkeypatch.setattr(ktpipe.describe, "generate_reply", lambda *args: (' \n "" ', False))
    with pytest.raises(ConceptsError, match="empty description of 'moongate'.*max_new_tokens"):
        describe_concepts([ConceptText("moongate", "")], generator(tiny_lm))


# --- loading ---------------------------------------------------------------------------------


def test_tokenizer_without_chat_template_is_named(tiny_lm, tmp_path):
    folder = tmp_path / "base-lm"
    shutil.copytree(tiny_lm, folder)
    build_tokenizer(None).save_pretrained(folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(ConceptsError, match="has no chat template"):
        load_generator(generator(folder))


def test_missing_model_folder_is_named(tmp_path):
    with pytest.raises(ConceptsError, match="concepts.generator.model.*not found"):
        load_generator(generator(tmp_path / "nope"))


def test_device_and_dtype():
    cpu = torch.device("cpu")
    assert pick_dtype("auto", cpu) == torch.float32
    assert pick_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert pick_dtype("float16", cpu) == torch.float16
    with pytest.raises(ConceptsError, match="concepts.generator.dtype"):
        pick_dtype("int8", cpu)
    assert pick_device("cpu") == cpu
    with pytest.raises(ConceptsError, match="concepts.generator.device"):
        pick_device("tpu:0")
    if not torch.cuda.is_available():
        assert pick_device("auto") == cpu
        with pytest.raises(ConceptsError, match="no CUDA device"):
            pick_device("cuda")


# --- concepts stage with a generator ---------------------------------------------------------

STAGE_ARGS = ("captions/exp.yaml", "captions/generated.yaml", "data/concepts", "data/world.json", "data/known.json")
# The demo backend's text budget needs no checkpoint; a random tiny LLM's text may run past its
# 24-token context, which `truncate` turns into a warning.
DEMO_MODEL = {"backend": "demo", "name": "ktpipe-demo", "pretrained": "models/baseline"}


@pytest.fixture
def project(tmp_path, tiny_lm) -> Path:
    """A project whose concepts file describes blicket only; moongate and gyroscope are generated."""
    folder = make_project(tmp_path / "project", tmp_path / "no-checkpoint", model=DEMO_MODEL,
                          concepts={"names": CONCEPTS, "file": "captions/exp.yaml",
                                    "generated": "captions/generated.yaml", "truncate": True,
                                    "generator": {"model": str(tiny_lm), "max_new_tokens": 8, "device": "cpu"}})
    (folder / "captions/exp.yaml").write_text(CONCEPTS_FILE)
    return folder


def concept_json(project: Path, name: str) -> dict:
    return json.loads((project / "data/concepts" / f"{name}.json").read_text())


def test_stage_generates_caches_and_keeps_edits(project, tmp_path):
    result = run_stage_here(project, "captions", *STAGE_ARGS)
    assert result.returncode == 0, result.stderr
    generated_file = project / "captions/generated.yaml"
    generated = load_generated(generated_file)
    assert sorted(generated) == ["gyroscope", "moongate"]  # blicket is hand-written
    assert generated_file.read_text().startswith(GENERATED_HEADER.split("concepts:")[0])
    assert "ImageNet class moon gate without" in generated["moongate"].source  # the label went in the prompt
    assert sorted(p.stem for p in (project / "data/concepts").iterdir()) == sorted(CONCEPTS)
    assert concept_json(project, "blicket")["description"] == "a striped orange ring"
    moongate = concept_json(project, "moongate")
    assert moongate["description"] == generated["moongate"].description and moongate["label"] == "moon gate"

    # A user edits an entry; the next run keeps it and never loads the model (it no longer exists).
    edited = generated_file.read_text().replace(generated["moongate"].description, "a hand-edited stone circle", 1)
    generated_file.write_text(edited)
    write_params(project, concepts={"generator": {"model": str(tmp_path / "deleted-model")}})
    result = run_stage_here(project, "captions", *STAGE_ARGS)
    assert result.returncode == 0, result.stderr
    assert concept_json(project, "moongate")["description"] == "a hand-edited stone circle"
    assert generated_file.read_text() == edited  # nothing new to add: the file is left as the user wrote it

    # Deleting an entry asks for a new one: here the model is gone, so that is a named error.
    generated_file.write_text(edited.split("  gyroscope:")[0])
    result = run_stage_here(project, "captions", *STAGE_ARGS)
    assert result.returncode == 2 and "deleted-model" in result.stderr and "Traceback" not in result.stderr


def test_stage_without_generator_names_the_undescribed_concepts(project):
    write_params(project, concepts={"generator": None})
    result = run_stage_here(project, "captions", *STAGE_ARGS)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "concepts 'moongate', 'gyroscope' have no description" in result.stderr
    assert "concepts.generator" in result.stderr
    assert not (project / "data").exists() and not (project / "captions/generated.yaml").exists()


def test_stage_rejects_a_malformed_generated_file(project):
    (project / "captions/generated.yaml").write_text("concepts:\n  moongate: {description: a ring, role: known}\n")
    result = run_stage_here(project, "captions", *STAGE_ARGS)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "captions/generated.yaml: concept 'moongate' has unknown key(s) ['role']" in result.stderr
    assert not (project / "data/concepts").exists()


@pytest.mark.parametrize("text, message", [
    ("concepts: {moongate: [unclosed\n", "cannot parse generated descriptions file"),
    ("- moongate\n", "'concepts'"),
    ("concepts: [moongate]\n", "'concepts' must be a mapping"),
    ("concepts: {moongate: {description: ''}}\n", "'moongate' has no description text"),
    ("concepts: {'moon gate': {description: a ring}}\n", "'moon gate' is not an identifier"),
])
def test_malformed_generated_files_are_named(tmp_path, text, message):
    path = tmp_path / "generated.yaml"
    path.write_text(text)
    with pytest.raises(ConceptsError, match=message):
        load_generated(path)


def test_generated_file_may_be_empty_or_absent(tmp_path):
    assert load_generated(tmp_path / "none-yet.yaml") == {}
    for text in (GENERATED_HEADER, "concepts:\n"):
        (tmp_path / "generated.yaml").write_text(text)
        assert load_generated(tmp_path / "generated.yaml") == {}

