"""Concept descriptions: read from `captions/*.yaml`, turned into fine-tuning captions."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ruamel.yaml import YAML

from ktpipe.io import atomic_dir

ROLES = ("novel", "known")


class CaptionsError(ValueError):
    """A captions file is missing, malformed, or lacks a concept that params ask for."""


@dataclass(frozen=True)
class ConceptText:
    name: str  # class name as written in prompts ("moongate")
    description: str  # visual description, no name in it
    role: str = "novel"  # novel: to be learned; known: already known (rehearsal, retention)
    aliases: tuple[str, ...] = ()  # other names of the class (extra zero-shot prompts)
    prompt: str | None = None  # class prompt override for zero-shot classification
    source: str = ""  # where the description comes from (paper table, hand-written, LLM)


def article(word: str) -> str:
    """'a' or 'an' for the word that follows (by its first letter)."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def lower_first(text: str) -> str:
    """Lower-case the first letter unless the first word is an acronym ('CT', 'MRI')."""
    first = text.split(" ", 1)[0]
    if len(first) > 1 and first[:2].isupper():
        return text
    return text[:1].lower() + text[1:]


def finetune_caption(concept: ConceptText, name_prefix: bool = True) -> str:
    """'A <name> is <description>.' (paper Sec. 3.1.2), or the description alone (Fig. 5)."""
    description = concept.description.strip().rstrip(".")
    if not name_prefix:
        return description[:1].upper() + description[1:] + "."
    name = concept.name.strip()
    return f"{article(name).capitalize()} {name} is {lower_first(description)}."


def _parse_concept(name: str, raw: object, source: str, path: Path) -> ConceptText:
    if isinstance(raw, str):
        raw = {"description": raw}
    if not isinstance(raw, dict):
        raise CaptionsError(f"{path}: concept {name!r} must be a mapping or a description string")
    known_keys = {"description", "role", "aliases", "prompt", "source"}
    unknown = sorted(set(raw) - known_keys)
    if unknown:
        raise CaptionsError(f"{path}: concept {name!r} has unknown key(s) {unknown}; known: {sorted(known_keys)}")
    description = raw.get("description")
    if not isinstance(description, str) or not description.strip():
        raise CaptionsError(f"{path}: concept {name!r} has no description")
    role = raw.get("role", "novel")
    if role not in ROLES:
        raise CaptionsError(f"{path}: concept {name!r} has role {role!r}; expected one of {ROLES}")
    aliases = raw.get("aliases") or []
    if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
        raise CaptionsError(f"{path}: concept {name!r}: aliases must be a list of strings")
    prompt = raw.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise CaptionsError(f"{path}: concept {name!r}: prompt must be a string")
    return ConceptText(name, description.strip(), role, tuple(aliases), prompt, raw.get("source", source))


def load_captions(path: str | Path) -> dict[str, ConceptText]:
    """Read a captions file: {source: ..., concepts: {name: {description, role, ...}}}."""
    path = Path(path)
    if not path.is_file():
        raise CaptionsError(f"captions file not found: {path}")
    try:
        data = YAML(typ="safe", pure=True).load(path.read_text())
    except Exception as err:  # ruamel raises several parser error types
        raise CaptionsError(f"cannot parse captions file {path}: {err}") from err
    if not isinstance(data, dict) or not isinstance(data.get("concepts"), dict) or not data["concepts"]:
        raise CaptionsError(f"{path}: expected a mapping with a non-empty 'concepts' mapping")
    source = str(data.get("source", ""))
    return {str(n): _parse_concept(str(n), raw, source, path) for n, raw in data["concepts"].items()}


def select_concepts(captions: dict[str, ConceptText], names: list[str] | tuple[str, ...]) -> list[ConceptText]:
    """The concepts that params name, in order; every one must have a description."""
    missing = [n for n in names if n not in captions]
    if missing:
        raise CaptionsError(f"concept(s) {missing} in params have no description; described: {sorted(captions)}")
    if not names:
        raise CaptionsError("params 'concepts' is empty: nothing to invert")
    return [captions[n] for n in names]


def write_concept_files(concepts: list[ConceptText], out_dir: Path) -> None:
    """One JSON per concept, so each inversion depends on its own description only."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for concept in concepts:
        record = asdict(concept)
        (out_dir / f"{concept.name}.json").write_text(json.dumps(record, indent=2) + "\n")


def read_concept_file(path: str | Path) -> ConceptText:
    """Read back a per-concept JSON written by `write_concept_files`."""
    path = Path(path)
    if not path.is_file():
        raise CaptionsError(f"concept file not found: {path}; run the captions stage first")
    try:
        record = json.loads(path.read_text())
        record["aliases"] = tuple(record.get("aliases", ()))
        return ConceptText(**record)
    except (json.JSONDecodeError, TypeError, AttributeError) as err:
        raise CaptionsError(f"{path}: malformed concept file ({err}); rerun the captions stage") from err


def run_captions(captions_file: Path, concept_names: tuple[str, ...], out_dir: Path) -> list[ConceptText]:
    """Validate the experiment's descriptions and split them into one file per concept."""
    concepts = select_concepts(load_captions(captions_file), concept_names)
    with atomic_dir(out_dir) as tmp:
        write_concept_files(concepts, tmp)
    return concepts


def read_concepts(captions_dir: Path, names: tuple[str, ...]) -> list[ConceptText]:
    """The per-concept files of `names`, in order."""
    return [read_concept_file(Path(captions_dir) / f"{name}.json") for name in names]
