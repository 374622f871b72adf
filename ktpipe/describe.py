"""Concept descriptions written by an instruction LLM (paper Sec. 4.2, params `captions.generator`).

The paper asks Llama-3-8B-Instruct to describe each class with the prompt of
`ktpipe.params.PAPER_PROMPT`. Here any transformers causal LM with a chat template does: the
prompt becomes one user message, the reply (new tokens only) becomes the description. The
captions stage (ktpipe.captions) calls `describe_concepts` only for concepts that neither the
captions file nor the generated file describes, and caches the result in the generated file.
"""
from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from ktpipe.captions import CaptionsError, ConceptText
from ktpipe.captions import concept_seed as shared_concept_seed
from ktpipe.params import GeneratorParams

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUOTE_PAIRS = {'"': '"', "'": "'", "“": "”", "‘": "’", "`": "`"}  # opening -> closing quote


def build_messages(concept: ConceptText, prompt: str) -> list[dict[str, str]]:
    """The chat: one user message, the prompt with '{name}' replaced by the concept's name."""
    if "{name}" not in prompt:
        raise CaptionsError("params 'captions.generator.prompt' must contain '{name}', where the concept name goes")
    try:
        text = prompt.format(name=concept.text_name)
    except (KeyError, IndexError, ValueError) as err:
        raise CaptionsError(f"params 'captions.generator.prompt' has a placeholder other than '{{name}}' ({err!r}); "
                            "write literal braces as '{{' and '}}'") from err
    return [{"role": "user", "content": text}]


def pick_device(name: str) -> torch.device:
    """'auto' is cuda when available, else cpu; any other name must be usable here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise CaptionsError(f"params 'captions.generator.device': unknown device {name!r}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CaptionsError(f"params 'captions.generator.device' is {name!r} but no CUDA device is available")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is bfloat16 on cuda (how instruction LLMs ship) and float32 on cpu."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise CaptionsError(f"params 'captions.generator.dtype' must be auto or one of {list(DTYPES)}, got {name!r}")
    return DTYPES[name]


def load_generator(cfg: GeneratorParams) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """Tokenizer and causal LM of `cfg.model` (hub id or local folder), on the chosen device."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = pick_device(cfg.device)
    if cfg.model.startswith(("/", ".")) and not Path(cfg.model).is_dir():
        raise CaptionsError(f"params 'captions.generator.model': model folder {cfg.model} not found")
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            cfg.model, dtype=pick_dtype(cfg.dtype, device), trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as err:  # missing folder or id, no network, unknown architecture
        raise CaptionsError(f"cannot load params 'captions.generator.model' {cfg.model!r}: {err}") from err
    if not tokenizer.chat_template:
        raise CaptionsError(f"the tokenizer of params 'captions.generator.model' {cfg.model!r} has no chat "
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
        raise CaptionsError(f"{cfg.model} wrote an empty description of {concept.name!r}; raise params "
                            "'captions.generator.max_new_tokens' or change its prompt")
    if cut:
        warnings.warn(f"the description of {concept.name!r} stopped at max_new_tokens "
                      f"({cfg.max_new_tokens}); edit it in the generated file or raise the limit", stacklevel=2)
    prompt = build_messages(concept, cfg.prompt)[0]["content"]
    return replace(concept, description=description, source=generation_source(cfg, prompt, seed))


def describe_concepts(concepts: list[ConceptText], cfg: GeneratorParams) -> list[ConceptText]:
    """Describe each concept with the LLM of `cfg`, loaded once."""
    tokenizer, model = load_generator(cfg)
    return [describe_concept(model, tokenizer, c, cfg) for c in tqdm(concepts, desc="describe", unit="concept")]
