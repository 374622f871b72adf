"""Prompt-only baselines: class prompts that change no weight of the model they score with.

- DCLIP (Menon & Vondrick 2023, "Visual Classification via Description from Large Language
  Models"): a class is the ensemble of '<name>, which has <descriptor>.', one prompt per short
  visual descriptor. Here the descriptors are cut from the concept's own description
  (`descriptors`), so no LLM runs.
- CuPL (Pratt et al. 2023, "What does a platypus look like?"): an instruction LLM answers a few
  questions about each class ("What does a {name} look like?") and its answers, one sentence
  each, are the class's prompts (`cupl_prompts`; the LLM of `ktpipe.describe`, as in the concepts
  stage).

Either ensemble scores as one class through `ensemble_embedding`: the renormalized mean of its
prompts' text embeddings, the convention zero-shot evaluation uses for its templates.
"""
from __future__ import annotations

import re
import warnings
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from ktpipe.concepts import ConceptsError, ConceptText, article, concept_seed, lower_first
from ktpipe.describe import clean_description, generate_reply, load_generator
from ktpipe.errors import KtpipeError
from ktpipe.params import GeneratorParams

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DCLIP_TEMPLATE = "{name}, which has {descriptor}."
# CuPL-style questions, asked in this order ('{a}' is the article of the name); after the last
# one they are asked again with new sampling seeds.
CUPL_QUESTIONS = (
    "Describe what {a} {name} looks like.",
    "How can you identify {a} {name}?",
    "What does {a} {name} look like?",
    "Describe a photo of {a} {name}.",
)

CLAUSE_END = re.compile(r";|,(?!\d)|[.!?](?=\s|$)")  # '1,000' and '2.5 cm' stay whole
AND = re.compile(r"\s+and\s+", re.IGNORECASE)
LEADING = re.compile(r"^(?:(?:it|which|that)\s+has|has|with|and|an?|the)(?:\s+|$)", re.IGNORECASE)
SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+")


# --- DCLIP -----------------------------------------------------------------------------------


def strip_descriptor(text: str) -> str:
    """A descriptor without its leading 'a', 'an', 'the', 'it has', 'which has', 'with', 'and'
    (repeatedly), without surrounding punctuation, first letter lower-cased unless an acronym."""
    text = text.strip(" \t\n.!?:\"'")
    while (match := LEADING.match(text)) is not None:
        text = text[match.end():].lstrip()
    return lower_first(text)


def split_and(clause: str) -> list[str]:
    """The clause cut at ' and ' where the words before it (since the last cut, leading words
    stripped) are more than one: 'black and white stripes' stays whole, 'a thin outline and a
    hole' becomes two."""
    pieces: list[str] = []
    for part in AND.split(clause):
        if pieces and len(strip_descriptor(pieces[-1]).split()) <= 1:
            pieces[-1] = f"{pieces[-1]} and {part}"
        else:
            pieces.append(part)
    return pieces


def descriptors(description: str, limit: int | None = None) -> list[str]:
    """Short visual descriptors of a description, DCLIP-style, in order (the first `limit` only).

    The rule: cut at semicolons, commas (not inside a number such as '1,000') and sentence ends
    ('.', '!', '?' before a space or the end, so '2.5 cm' stays whole); cut each clause at ' and '
    as `split_and` says; strip leading articles, 'it/which/that has', 'has', 'with' and 'and' and
    the surrounding punctuation (`strip_descriptor`); drop pieces without a letter or digit and
    repeats (ignoring case).
    """
    if limit is not None and limit < 1:
        raise KtpipeError(f"descriptors: limit must be at least 1 or None, got {limit}")
    found: dict[str, str] = {}  # casefolded -> as written, in order
    for clause in CLAUSE_END.split(description):
        for piece in map(strip_descriptor, split_and(clause)):
            if re.search(r"\w", piece) and piece.casefold() not in found:
                found[piece.casefold()] = piece
    return list(found.values())[:limit]


def dclip_prompts(name: str, description: str, template: str = DCLIP_TEMPLATE) -> list[str]:
    """One prompt per descriptor of `description` ('{name}, which has {descriptor}.'); the bare
    name alone when the description has no descriptor."""
    if "{name}" not in template or "{descriptor}" not in template:
        raise KtpipeError(f"DCLIP template {template!r} must contain '{{name}}' and '{{descriptor}}'")
    found = descriptors(description)
    if not found:
        return [name]
    return [template.format(name=name, descriptor=d) for d in found]


# --- CuPL ------------------------------------------------------------------------------------


def ask(question: str, name: str) -> str:
    """The question about class `name`: '{name}' and its article '{a}' filled in."""
    try:
        return question.format(a=article(name), name=name)
    except (KeyError, IndexError, ValueError) as err:
        raise KtpipeError(f"CuPL question {question!r} has a placeholder other than '{{a}}' and '{{name}}' "
                          f"({err!r})") from err


def render_question(tokenizer: PreTrainedTokenizerBase, question: str) -> str:
    """The model's input: the chat template applied to the question as one user message (as
    `ktpipe.describe.render_prompt` does for the description prompt)."""
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)


def answer_seed(cfg: GeneratorParams, name: str, index: int) -> int:
    """Sampling seed of a concept's `index`-th question, independent of the other concepts."""
    return concept_seed(cfg.seed, f"{name}#{index}")


def names_class(sentence: str, name: str) -> bool:
    """Whether `sentence` has `name` as whole words, any case, plural 's'/'es' allowed."""
    return re.search(rf"(?<!\w){re.escape(name)}(?:e?s)?(?!\w)", sentence, re.IGNORECASE) is not None


def clean_answer(reply: str, name: str) -> str:
    """One prompt from an LLM answer: its first sentence that names the class, else its first
    sentence with a word in it, ended with a full stop when it has no end; an answer that lacks
    the name gets 'A photo of a {name}: ' in front so the prompt still names the class. Empty when
    the answer has no word."""
    sentences = [s for s in SENTENCE_BREAK.split(clean_description(reply)) if re.search(r"\w", s)]
    if not sentences:
        return ""
    sentence = next((s for s in sentences if names_class(s, name)), sentences[0])
    if sentence[-1] not in ".!?":
        sentence += "."
    if names_class(sentence, name):
        return sentence
    return f"A photo of {article(name)} {name}: {lower_first(sentence)}"


def answer_question(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, concept: ConceptText,
                    question: str, cfg: GeneratorParams, seed: int) -> str:
    """The LLM's answer to one question about `concept`, cleaned into a prompt (`clean_answer`)."""
    reply, cut = generate_reply(model, tokenizer, render_question(tokenizer, question), cfg, seed)
    prompt = clean_answer(reply, concept.text_name)
    if not prompt:
        raise ConceptsError(f"{cfg.model} wrote an empty answer to {question!r}; raise max_new_tokens, "
                            "change the sampling seed or the model")
    if cut and not re.search(r"[.!?]", reply):
        warnings.warn(f"the answer to {question!r} stopped at max_new_tokens ({cfg.max_new_tokens}) "
                      "before its first sentence ended", stacklevel=2)
    return prompt


def check_count(n: int, cfg: GeneratorParams, questions: tuple[str, ...]) -> None:
    """n >= 1, and no more than the questions when greedy decoding would answer a repeat alike."""
    if n < 1:
        raise KtpipeError(f"CuPL: n must be at least 1, got {n}")
    if n > len(questions) and not cfg.do_sample:
        raise KtpipeError(f"CuPL: n {n} is more than the {len(questions)} questions, and greedy decoding "
                          "answers a repeated question the same way: lower n or set do_sample")


def cupl_prompts(concepts: list[ConceptText], cfg: GeneratorParams, n: int,
                 questions: tuple[str, ...] = CUPL_QUESTIONS) -> dict[str, list[str]]:
    """Concept name -> n CuPL prompts, one LLM answer each to `questions` in turn.

    The LLM of `cfg` (loaded once, remote code only when `cfg.trust_remote_code`) answers each
    question, sampled with a seed of its own (concept, question index) when `cfg.do_sample`, so a
    run is reproducible and a concept's prompts do not depend on the other concepts. Each answer
    is cut to one sentence that names the class, prefixed with 'A photo of a {name}: ' when it
    does not (`clean_answer`).
    """
    check_count(n, cfg, questions)
    tokenizer, model = load_generator(cfg)
    prompts = {}
    for concept in tqdm(concepts, desc="cupl", unit="concept"):
        prompts[concept.name] = [
            answer_question(model, tokenizer, concept, ask(questions[i % len(questions)], concept.text_name),
                            cfg, answer_seed(cfg, concept.name, i))
            for i in range(n)]
    return prompts


# --- scoring ---------------------------------------------------------------------------------


def ensemble_embedding(model, prompts: list[str]) -> torch.Tensor:
    """(D,): the renormalized mean of the prompts' text embeddings, one class's row exactly as
    zero-shot evaluation computes it (`EmbeddingCache.class_embeddings`)."""
    if not prompts:
        raise KtpipeError("ensemble_embedding: no prompts to average")
    from ktpipe.eval.embeddings import EmbeddingCache  # here: zero-shot classification imports this module

    return EmbeddingCache().class_embeddings(model, [prompts])[0]
