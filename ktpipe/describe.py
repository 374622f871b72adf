"""The concepts stage: every concept described, by its file or an instruction LLM (paper Sec. 4.2,
params `concepts.generator`).

The paper asks Llama-3-8B-Instruct to describe each class with the prompt of
`ktpipe.params.PAPER_PROMPT`. Here any transformers causal LM with a chat template does: the
prompt becomes one user message, the reply (new tokens only) becomes the description.
`run_concepts` calls `describe_concepts` only for concepts that neither the concepts file nor
the generated file describes, and caches the result in the generated file.
"""
from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from ktpipe.concepts import (ConceptsError, ConceptText, check_text_lengths, load_concepts_file, load_generated,
                             undescribed_error, wanted_concepts, world_concepts, write_concept_files, write_generated)
from ktpipe.concepts import concept_seed as shared_concept_seed
from ktpipe.io import atomic_dir, write_json
from ktpipe.params import ConceptsParams, GeneratorParams, ParamsError, check_device

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ktpipe.models import TextBudget

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUOTE_PAIRS = {'"': '"', "'": "'", "“": "”", "‘": "’", "`": "`"}  # opening -> closing quote


def build_messages(concept: ConceptText, prompt: str) -> list[dict[str, str]]:
    """The chat: one user message, the prompt with '{name}' replaced by the concept's name."""
    if "{name}" not in prompt:
        raise ConceptsError("params 'concepts.generator.prompt' must contain '{name}', where the concept name goes")
    try:
        text = prompt.format(name=concept.text_name)
    except (KeyError, IndexError, ValueError) as err:
        raise ConceptsError(f"params 'concepts.generator.prompt' has a placeholder other than '{{name}}' ({err!r}); "
                            "write literal braces as '{{' and '}}'") from err
    return [{"role": "user", "content": text}]


def pick_device(name: str) -> torch.device:
    """'auto' is cuda when available, else cpu; any other name must be one this machine has
    (`ktpipe.params.check_device`, as for `model.device`)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        check_device(name, "concepts.generator.device")
    except ParamsError as err:
        raise ConceptsError(str(err)) from err
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is bfloat16 on cuda (how instruction LLMs ship) and float32 on cpu."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ConceptsError(f"params 'concepts.generator.dtype' must be auto or one of {list(DTYPES)}, got {name!r}")
    return DTYPES[name]


def load_generator(cfg: GeneratorParams) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """Tokenizer and causal LM of `cfg.model` (hub id or local folder), on the chosen device."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = pick_device(cfg.device)
    if cfg.model.startswith(("/", ".")) and not Path(cfg.model).is_dir():
        raise ConceptsError(f"params 'concepts.generator.model': model folder {cfg.model} not found")
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            cfg.model, dtype=pick_dtype(cfg.dtype, device), trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as err:  # missing folder or id, no network, unknown architecture
        raise ConceptsError(f"cannot load params 'concepts.generator.model' {cfg.model!r}: {err}") from err
    if not tokenizer.chat_template:
        raise ConceptsError(f"the tokenizer of params 'concepts.generator.model' {cfg.model!r} has no chat "
                            "template: use an instruction (chat) model, e.g. meta-llama/Meta-Llama-3-8B-Instruct")
    return tokenizer, model.to(device).eval()


def render_prompt(tokenizer: PreTrainedTokenizerBase, concept: ConceptText, prompt: str) -> str:
    """The model's input text: the chat template applied to the user message, ready for a reply."""
    return tokenizer.apply_chat_template(build_messages(concept, prompt), tokenize=False, add_generation_prompt=True)


def concept_seed(cfg: GeneratorParams, name: str) -> int:
    """Sampling seed of one concept, so each description is reproducible on its own."""
    return shared_concept_seed(cfg.seed, name)


def generation_kwargs(cfg: GeneratorParams, tokenizer: PreTrainedTokenizerBase) -> dict:
    """Arguments of `generate`: greedy, or nucleus sampling at cfg.temperature and cfg.top_p."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs = {"max_new_tokens": cfg.max_new_tokens, "do_sample": cfg.do_sample, "pad_token_id": pad}
    if cfg.do_sample:
        kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p)
    else:  # override sampling defaults from the model's generation_config, unused when greedy
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs


def generate_reply(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, text: str,
                   cfg: GeneratorParams, seed: int) -> tuple[str, bool]:
    """The model's reply to `text` (new tokens only, special tokens dropped), and whether it was cut."""
    inputs = tokenizer(text, add_special_tokens=False, return_tensors="pt").to(model.device)
    if cfg.do_sample:
        torch.manual_seed(seed)
    with torch.no_grad():
        output = model.generate(**inputs, **generation_kwargs(cfg, tokenizer))
    new_tokens = output[0, inputs["input_ids"].shape[1]:]  # (T,)
    cut = len(new_tokens) >= cfg.max_new_tokens and int(new_tokens[-1]) != tokenizer.eos_token_id
    return tokenizer.decode(new_tokens, skip_special_tokens=True), cut


def clean_description(text: str) -> str:
    """One paragraph: whitespace runs become one space, quotes around the whole text go."""
    text = " ".join(text.split())
    while len(text) >= 2 and QUOTE_PAIRS.get(text[0]) == text[-1]:
        text = text[1:-1].strip()
    return text


def generation_source(cfg: GeneratorParams, prompt: str, seed: int) -> str:
    """What a generated entry records: model, decoding settings and the exact prompt."""
    decoding = (f"sampling (temperature {cfg.temperature}, top_p {cfg.top_p}, seed {seed})"
                if cfg.do_sample else "greedy decoding")
    return f"generated with {cfg.model}, {decoding}, max_new_tokens {cfg.max_new_tokens}; prompt: {prompt}"


def describe_concept(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, concept: ConceptText,
                     cfg: GeneratorParams) -> ConceptText:
    """The concept with the LLM's description and a source that says how it was made."""
    seed = concept_seed(cfg, concept.name)
    reply, cut = generate_reply(model, tokenizer, render_prompt(tokenizer, concept, cfg.prompt), cfg, seed)
    description = clean_description(reply)
    if not description:
        raise ConceptsError(f"{cfg.model} wrote an empty description of {concept.name!r}; raise params "
                            "'concepts.generator.max_new_tokens' or change its prompt")
    if cut:
        warnings.warn(f"the description of {concept.name!r} stopped at max_new_tokens "
                      f"({cfg.max_new_tokens}); edit it in the generated file or raise the limit", stacklevel=2)
    prompt = build_messages(concept, cfg.prompt)[0]["content"]
    return replace(concept, description=description, source=generation_source(cfg, prompt, seed))


def describe_concepts(concepts: list[ConceptText], cfg: GeneratorParams) -> list[ConceptText]:
    """Describe each concept with the LLM of `cfg`, loaded once."""
    tokenizer, model = load_generator(cfg)
    return [describe_concept(model, tokenizer, c, cfg) for c in tqdm(concepts, desc="describe", unit="concept")]


def complete_concepts(wanted: list[ConceptText], generated: dict[str, ConceptText],
                      generator: GeneratorParams | None, concepts_file: Path,
                      generated_file: Path) -> tuple[list[ConceptText], list[ConceptText]]:
    """Describe every wanted concept: its own text, else the generated file's, else a new LLM one.

    Returns (all concepts in order, the newly generated ones). The LLM runs only when needed.
    """
    known = {n: c for n, c in generated.items() if c.described}
    todo = [c for c in wanted if not c.described and c.name not in known]
    if todo and generator is None:
        raise undescribed_error([c.name for c in todo], concepts_file, generated_file)
    new: list[ConceptText] = []
    if todo:
        new = describe_concepts(todo, generator)
    known.update({c.name: c for c in new})
    filled = [c if c.described else replace(c, description=known[c.name].description,
                                            source=known[c.name].source) for c in wanted]
    return filled, new


def run_concepts(concepts_file: Path, generated_file: Path, cfg: ConceptsParams, out_dir: Path,
                 budget: "TextBudget | None" = None, world_path: Path | None = None,
                 known_path: Path | None = None) -> list[ConceptText]:
    """Describe every concept of `cfg.names` and split the descriptions into one file per concept.

    Concepts `concepts_file` leaves undescribed take the entry of `generated_file`, or a new one
    from the `cfg.generator` LLM, which is added there. `generated_file` always exists afterwards
    (a DVC output), untouched when nothing new was generated. With a `budget` every text must fit
    the text tower (see check_text_lengths). `world_path` receives the demo world's concepts
    (world_concepts), a file of its own so that editing a description does not rerun pretraining;
    `known_path` the known ones alone, all that pretraining reads, so adding a novel concept does not
    rerun it either (the world checks that every novel concept takes a held-out combination).
    """
    concepts_file, generated_file = Path(concepts_file), Path(generated_file)
    entries = load_concepts_file(concepts_file)
    wanted = wanted_concepts(entries, tuple(cfg.names))
    generated = load_generated(generated_file)
    concepts, new = complete_concepts(wanted, generated, cfg.generator, concepts_file, generated_file)
    if budget is not None:
        concepts = check_text_lengths(concepts, budget, cfg.truncate)
    if new or not generated_file.exists():
        write_generated(generated_file, new)
    with atomic_dir(out_dir) as tmp:
        write_concept_files(concepts, tmp)
    drawn = world_concepts(entries)
    if drawn and (world_path is not None or known_path is not None):
        from ktpipe.demo.world import load_world

        load_world(concepts=drawn)  # a novel concept on a combination pretraining shows is an error here
    if world_path is not None:
        write_json(world_path, drawn)
    if known_path is not None:
        write_json(known_path, {name: c for name, c in drawn.items() if c["role"] == "known"})
    return concepts
