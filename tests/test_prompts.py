"""Prompt-only baselines (ktpipe.prompts): DCLIP descriptor prompts, CuPL prompts from an LLM,
and the ensemble embedding that scores either as one class.

The LLM is test_describe's random-init one-layer Llama (built offline, `save_tiny_lm`): its
answers are noise, but questions, chat templating, seeding and cleaning behave as with a real
instruction model. The CLIP is conftest's tiny random-init open_clip checkpoint.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import ktpipe.prompts
from ktpipe.concepts import ConceptsError, ConceptText
from ktpipe.errors import KtpipeError
from ktpipe.eval.embeddings import EmbeddingCache
from ktpipe.params import GeneratorParams
from ktpipe.prompts import (CUPL_QUESTIONS, answer_seed, clean_answer, cupl_prompts, dclip_prompts, descriptors,
                            ensemble_embedding, names_class)
from test_describe import save_tiny_lm

CONCEPTS = [ConceptText("moongate", "", label="moon gate"), ConceptText("owl", "")]
# the random LLM's answers stop at max_new_tokens mid-sentence (test_cut_answer_warns checks the warning)
pytestmark = pytest.mark.filterwarnings("ignore:the answer to .* stopped at max_new_tokens")


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    return save_tiny_lm(tmp_path_factory.mktemp("lm") / "tiny-llama")


def generator(model: Path, **overrides) -> GeneratorParams:
    return GeneratorParams(model=str(model), max_new_tokens=8, device="cpu", **overrides)


# --- descriptors -----------------------------------------------------------------------------


@pytest.mark.parametrize("description, expected", [
    ("a round object with orange stripes, a thin black outline and a small hole in the middle",
     ["round object with orange stripes", "thin black outline", "small hole in the middle"]),
    ("a striped orange ring", ["striped orange ring"]),  # one clause
    ("a striped orange ring.", ["striped orange ring"]),  # trailing period
    ("It has a brass dial. It has silver rings that spin!", ["brass dial", "silver rings that spin"]),
    ("orange stripes; Orange stripes, a hole, orange stripes.", ["orange stripes", "hole"]),  # repeats, any case
    ("red, green, and blue", ["red", "green", "blue"]),  # Oxford comma: the leading 'and' goes
    ("with stripes, and with a hole", ["stripes", "hole"]),
    # ' and ' cuts only after more than one word: adjectives joined by 'and' stay one descriptor
    ("black and white stripes and a long tail", ["black and white stripes", "long tail"]),
    ("stripes and a hole", ["stripes and a hole"]),
    ("a sandy band and a handle", ["sandy band", "handle"]),  # 'and' inside a word never cuts
    ("another hole, the theory, a-frame roof", ["another hole", "theory", "a-frame roof"]),  # whole words only
    ("2.5 cm wide, 1,000 threads", ["2.5 cm wide", "1,000 threads"]),  # numbers stay whole
    ("MRI-visible rim. Dark core", ["MRI-visible rim", "dark core"]),  # acronyms keep their case
    ("", []),
    (" . ; , a, and", []),
])
def test_descriptors(description, expected):
    assert descriptors(description) == expected


def test_descriptor_limit_keeps_the_first():
    text = "a brass dial, silver rings, a grey arch"
    assert descriptors(text, limit=2) == ["brass dial", "silver rings"]
    assert descriptors(text, limit=5) == ["brass dial", "silver rings", "grey arch"]
    with pytest.raises(KtpipeError, match="limit must be at least 1"):
        descriptors(text, limit=0)


def test_dclip_prompts():
    description = "a round object with orange stripes, a thin black outline and a small hole in the middle."
    assert dclip_prompts("blicket", description) == [
        "blicket, which has round object with orange stripes.",
        "blicket, which has thin black outline.",
        "blicket, which has small hole in the middle.",
    ]
    template = "a photo of a {name}, with {descriptor}"
    assert dclip_prompts("moon gate", "a grey arch; brass dials", template=template) == [
        "a photo of a moon gate, with grey arch", "a photo of a moon gate, with brass dials"]
    assert dclip_prompts("blicket", " . ") == ["blicket"]  # no descriptor: the bare name
    with pytest.raises(KtpipeError, match="must contain"):
        dclip_prompts("blicket", "a ring", template="{name} with {}")


# --- CuPL: cleaning --------------------------------------------------------------------------


@pytest.mark.parametrize("reply, name, prompt", [
    ("A moon gate is a round opening in a wall. It is old.", "moon gate", "A moon gate is a round opening in a wall."),
    ("Sure! Moon gates are round openings in walls.", "moon gate", "Moon gates are round openings in walls."),
    ('  "An owl has big\n eyes."  ', "owl", "An owl has big eyes."),
    ("Round grey stone arch", "moon gate", "A photo of a moon gate: round grey stone arch."),
    ("It has big eyes. Owls hoot", "owl", "Owls hoot."),  # the sentence that names the class wins
    ("It has big eyes.", "owl", "A photo of an owl: it has big eyes."),
    ("The gatekeeper stands.", "gate", "A photo of a gate: the gatekeeper stands."),  # whole words only
    (". , . It is grey", "owl", "A photo of an owl: it is grey."),
    (" . , ", "owl", ""),
])
def test_clean_answer(reply, name, prompt):
    assert clean_answer(reply, name) == prompt


def test_names_class():
    assert names_class("Two Moon Gates.", "moon gate") and names_class("boxes", "box")
    assert not names_class("a moongate", "moon gate") and not names_class("owlet", "owl")


# --- CuPL: the LLM ---------------------------------------------------------------------------


@pytest.fixture
def asked(monkeypatch) -> list[tuple[str, int]]:
    """Every (model input, seed) that cupl_prompts generates from, in order; the real LLM answers."""
    calls: list[tuple[str, int]] = []
    real = ktpipe.prompts.generate_reply

    def spy(model, tokenizer, text, cfg, seed):
        calls.append((text, seed))
        return real(model, tokenizer, text, cfg, seed)

    monkeypatch.setattr(ktpipe.prompts, "generate_reply", spy)
    return calls


def test_cupl_asks_each_question_and_names_the_class(tiny_lm, asked):
    prompts = cupl_prompts(CONCEPTS, generator(tiny_lm), n=3)
    assert list(prompts) == ["moongate", "owl"] and all(len(p) == 3 for p in prompts.values())
    for concept in CONCEPTS:
        assert all(names_class(p, concept.text_name) for p in prompts[concept.name])
    # the chat template of test_describe's tokenizer around each question, in CUPL_QUESTIONS order
    assert [text for text, _ in asked] == [
        "<s><|user|> Describe what a moon gate looks like. <|assistant|> ",
        "<s><|user|> How can you identify a moon gate? <|assistant|> ",
        "<s><|user|> What does a moon gate look like? <|assistant|> ",
        "<s><|user|> Describe what an owl looks like. <|assistant|> ",
        "<s><|user|> How can you identify an owl? <|assistant|> ",
        "<s><|user|> What does an owl look like? <|assistant|> ",
    ]
    assert len({seed for _, seed in asked}) == 6  # one seed per (concept, question)


def test_cupl_sampling_is_seeded_per_concept_and_question(tiny_lm, asked):
    # seeds 1 and 2: at seed 0 the random LLM ends one answer at once (an error, see below)
    sampled = cupl_prompts(CONCEPTS, generator(tiny_lm, do_sample=True, seed=1), n=2)
    assert sampled == cupl_prompts(CONCEPTS, generator(tiny_lm, do_sample=True, seed=1), n=2)
    assert all(len(set(p)) == 2 for p in sampled.values())  # another question, another answer
    other = cupl_prompts(CONCEPTS, generator(tiny_lm, do_sample=True, seed=2), n=2)
    assert other["moongate"] != sampled["moongate"] and other["owl"] != sampled["owl"]
    # a concept's prompts do not depend on the concepts asked about with it
    assert cupl_prompts(CONCEPTS[1:], generator(tiny_lm, do_sample=True, seed=1), n=2) == {"owl": sampled["owl"]}
    assert [seed for _, seed in asked[:4]] == [answer_seed(generator(tiny_lm, seed=1), c.name, i)
                                               for c in CONCEPTS for i in range(2)]


def test_cupl_asks_again_with_new_seeds_past_the_last_question(tiny_lm, asked):
    n = len(CUPL_QUESTIONS) + 1
    prompts = cupl_prompts(CONCEPTS[1:], generator(tiny_lm, do_sample=True), n=n)
    assert len(prompts["owl"]) == n
    assert asked[0][0] == asked[-1][0] and asked[0][1] != asked[-1][1]  # the first question, another seed
    assert prompts["owl"][0] != prompts["owl"][-1]
    with pytest.raises(KtpipeError, match="greedy decoding answers a repeated question"):
        cupl_prompts(CONCEPTS, generator(tiny_lm), n=n)
    with pytest.raises(KtpipeError, match="at least 1"):
        cupl_prompts(CONCEPTS, generator(tiny_lm), n=0)


def test_cupl_empty_answer_is_an_error(tiny_lm, monkeypatch):
    monkeypatch.setattr(ktpipe.prompts, "generate_reply", lambda *args: (' \n "" ', False))
    with pytest.raises(ConceptsError, match="empty answer to 'Describe what an owl looks like.'"):
        cupl_prompts(CONCEPTS[1:], generator(tiny_lm), n=1)


def test_cut_answer_warns(tiny_lm, monkeypatch):
    monkeypatch.setattr(ktpipe.prompts, "generate_reply", lambda *args: ("an owl with big round", True))
    with pytest.warns(UserWarning, match="'Describe what an owl looks like.' stopped at max_new_tokens"):
        assert cupl_prompts(CONCEPTS[1:], generator(tiny_lm), n=1) == {"owl": ["an owl with big round."]}
    monkeypatch.setattr(ktpipe.prompts, "generate_reply", lambda *args: ("An owl hoots. It has big", True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a whole first sentence: nothing to warn about
        assert cupl_prompts(CONCEPTS[1:], generator(tiny_lm), n=1) == {"owl": ["An owl hoots."]}


def test_cupl_uses_the_answers_it_gets(tiny_lm, monkeypatch):
    replies = iter(["An owl has big round eyes. It hoots.", "Feathers", "Owls hunt at night!"])
    monkeypatch.setattr(ktpipe.prompts, "generate_reply", lambda *args: (next(replies), False))
    assert cupl_prompts(CONCEPTS[1:], generator(tiny_lm), n=3) == {
        "owl": ["An owl has big round eyes.", "A photo of an owl: feathers.", "Owls hunt at night!"]}


@pytest.mark.parametrize("trust", [False, True])
def test_cupl_trusts_remote_code_only_when_told(tiny_lm, monkeypatch, trust):
    import transformers

    seen = []
    for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        real = cls.from_pretrained

        def spy(*args, real=real, **kwargs):
            seen.append(kwargs["trust_remote_code"])
            return real(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    cupl_prompts(CONCEPTS[1:], generator(tiny_lm, trust_remote_code=trust), n=1)
    assert seen == [trust, trust]


# --- ensemble embedding ----------------------------------------------------------------------


def test_ensemble_embedding_is_the_renormalized_mean(tiny_checkpoint):
    from ktpipe.models import OpenClipModel

    model = OpenClipModel.load(f"local-dir:{tiny_checkpoint}")
    prompts = ["owl, which has big eyes.", "owl, which has grey feathers.", "A photo of an owl: it hoots."]
    with torch.no_grad():
        rows = model.encode_texts(prompts).float()  # (3, D), each unit-norm
    mean = rows.sum(0) / len(prompts)
    expected = mean / mean.norm()
    got = ensemble_embedding(model, prompts)
    assert got.shape == (rows.shape[1],)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert abs(float(got.norm()) - 1) < 1e-6 and mean.norm() < 0.999  # the mean alone is shorter
    assert all(not torch.allclose(got, row, atol=1e-4) for row in rows)  # all prompts count
    assert torch.equal(got, EmbeddingCache().class_embeddings(model, [prompts])[0])  # evaluation's class row
    torch.testing.assert_close(ensemble_embedding(model, prompts[:1]), rows[0], rtol=0, atol=1e-6)
    with pytest.raises(KtpipeError, match="no prompts"):
        ensemble_embedding(model, [])


# --- the DCLIP prompt-only baseline in zero-shot classification ----------------------------------


def test_classification_scores_the_dclip_baseline_as_its_prompts_ensembled(rendered_project):
    from pathlib import Path

    from ktpipe.datasets import load_eval_set
    from ktpipe.eval import ZeroShotClassification, run_evaluate
    from ktpipe.eval.classification import build_candidates, embed_images
    from ktpipe.models import load_base_model
    from ktpipe.params import load_params
    from ktpipe.templates import load_templates
    from ktpipe.concepts import read_concepts

    params = load_params("params.yaml")
    result = run_evaluate(params, "baseline", Path("unused"), Path("data/eval"), Path("data/concepts"),
                          Path("metrics/baseline.json"), None)
    metrics = result["metrics"]["test"]["classification"]
    model, manifest = load_base_model(params.model), load_eval_set(Path("data/eval"), "test")
    concepts = read_concepts(Path("data/concepts"), params.concepts.names)
    candidates = build_candidates(list(manifest.classes), concepts, load_templates("demo"))
    rows = torch.stack([ensemble_embedding(model, dclip_prompts(c.name, c.description)) for c in candidates])
    predicted = (embed_images(model, manifest.paths, 32, progress=False) @ rows.T).argmax(-1)
    labels = torch.tensor(manifest.labels)
    target = torch.tensor([c.group == "target" for c in candidates])[labels]
    assert metrics["dclip_target_acc"] == pytest.approx(float((predicted == labels)[target].float().mean()))
    assert metrics["dclip_retention_acc"] == pytest.approx(float((predicted == labels)[~target].float().mean()))
    assert result["summary"]["test"]["classification"]["dclip_target"] == metrics["dclip_target_acc"]
    # the report's table: a DCLIP column, and the verdict against transfer
    moved = {**metrics, "name_target_acc": 1.0}
    lines = ZeroShotClassification().report_table({"baseline": metrics, "paper": moved}, concepts)
    assert lines[0] == "| Class | Group | Baseline | Description prompt | DCLIP prompts | Transfer (paper) |"
    best = max(metrics["description_target_acc"], metrics["dclip_target_acc"])
    assert lines[-1].endswith(f"Transfer, name prompts: `paper` 100.0% ({'beats it' if best < 1 else 'does not beat it'}).")
