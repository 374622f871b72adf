"""Concepts and their descriptions: read from `captions/*.yaml`, checked against the text tower,
written one file per concept, turned into fine-tuning captions.

A concepts file may leave a concept undescribed (`name:` with no `description`); the concepts
stage (`ktpipe.describe.run_concepts`) then takes its description from the generated file
(`concepts.generated`), asking the LLM of `concepts.generator` only for concepts that file does
not hold yet.
"""
from __future__ import annotations

import json
import re
import zlib
from dataclasses import asdict, dataclass, replace
from io import StringIO
from pathlib import Path
from typing import TYPE_CHECKING

from ruamel.yaml import YAML

from ktpipe.errors import KtpipeError, warn
from ktpipe.io import write_text

if TYPE_CHECKING:
    from ktpipe.models import TextBudget

ROLES = ("novel", "known")
CONCEPT_KEYS = ("description", "role", "aliases", "prompt", "source", "label", "render")  # keys of a concepts-file entry
RENDER_KEYS = ("shape", "color", "fill")  # a demo-world concept's `render` entry
GENERATED_KEYS = ("description", "source")  # keys of a generated entry (the rest belongs in the concepts file)

# Top of a new generated file; the stage keeps whatever a user writes below it.
GENERATED_HEADER = """\
# Concept descriptions written by an LLM (params `concepts.generator`) for the concepts that the
# concepts file (params `concepts.file`) leaves undescribed. The concepts stage reuses every entry
# here and runs the LLM only for concepts that have none, so this file caches the LLM's work and
# can be committed. Edit freely: your edits are kept. Delete an entry to regenerate it. Move an
# entry into your concepts file to make it hand-written (a description there always wins).
# Each entry's `source` records the model, the decoding settings and the prompt it came from.
concepts: {}
"""


class ConceptsError(KtpipeError):
    """A concepts file is missing, malformed, or lacks a concept that params ask for."""


NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")  # concept names become file and stage names


@dataclass(frozen=True)
class ConceptText:
    name: str  # identifier in params, file names and metrics ("moongate", "lung_cancer")
    description: str  # visual description, no name in it
    role: str = "novel"  # novel: to be learned; known: already known (rehearsal, retention)
    aliases: tuple[str, ...] = ()  # other names of the class (extra zero-shot prompts)
    prompt: str | None = None  # class prompt override for zero-shot classification
    source: str = ""  # where the description comes from (paper table, hand-written, LLM)
    label: str = ""  # the name as written in prompts and captions ("" : name with '_' as spaces)
    render: dict | None = None  # demo world only: {shape, color, fill} it is drawn with (None: not drawn)
    truncated: dict | None = None  # text -> what the text tower keeps, when concepts.truncate cut it

    @property
    def described(self) -> bool:
        """False for a concept its concepts file leaves to be generated."""
        return bool(self.description)

    @property
    def text_name(self) -> str:
        """The name as written in prompts and captions ("lung cancer")."""
        return self.label or self.name.replace("_", " ")


def article(word: str) -> str:
    """'a' or 'an' for the word that follows (by its first letter)."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def lower_first(text: str) -> str:
    """Lower-case the first letter unless the first word is an acronym ('CT', 'MRI')."""
    first = text.split(" ", 1)[0]
    if len(first) > 1 and first[:2].isupper():
        return text
    return text[:1].lower() + text[1:]


def concept_seed(seed: int, name: str) -> int:
    """A per-concept seed that does not change when other concepts are added."""
    return seed * 1_000_003 + zlib.crc32(name.encode())


def finetune_caption(concept: ConceptText, name_prefix: bool = True) -> str:
    """'A <name> is <description>.' (paper Sec. 3.1.2), or the description alone (Fig. 5)."""
    description = concept.description.strip().rstrip(".")
    if not name_prefix:
        return description[:1].upper() + description[1:] + "."
    name = concept.text_name.strip()
    return f"{article(name).capitalize()} {name} is {lower_first(description)}."


def check_name(name: object, where: str) -> str:
    """A concept name usable in file names, stage names and metric keys, or a ConceptsError."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ConceptsError(
            f"{where}: concept name {name!r} is not an identifier: use letters, digits, '_' and '-' "
            "(e.g. lung_cancer), and put the name as written in captions in 'label'")
    return name


def _string(raw: dict, key: str, name: str, path: Path, default: str | None) -> str | None:
    """raw[key] if it is a non-empty string, `default` if absent or null, else a ConceptsError."""
    value = raw.get(key)
    if value is None:
        return default
    if not isinstance(value, str) or not value.strip():
        raise ConceptsError(f"{path}: concept {name!r}: {key} must be a non-empty string")
    return value


def _parse_concept(name: object, raw: object, source: str, path: Path,
                   keys: tuple[str, ...] = CONCEPT_KEYS) -> ConceptText:
    """One entry; null, {} or a mapping without `description` leaves the concept to be generated."""
    name = check_name(name, str(path))
    raw = {} if raw is None else {"description": raw} if isinstance(raw, str) else raw
    if not isinstance(raw, dict):
        raise ConceptsError(f"{path}: concept {name!r} must be a mapping, a description string or null")
    unknown = sorted(set(raw) - set(keys))
    if unknown:
        where = "" if keys == CONCEPT_KEYS else " (the other keys belong in the concepts file)"
        raise ConceptsError(f"{path}: concept {name!r} has unknown key(s) {unknown}; known: {sorted(keys)}{where}")
    description = raw.get("description")
    if description is not None and (not isinstance(description, str) or not description.strip()):
        raise ConceptsError(f"{path}: concept {name!r} has no description text; write one, or drop the "
                            "'description' key to have params 'concepts.generator' write it")
    role = raw.get("role", "novel")
    if role not in ROLES:
        raise ConceptsError(f"{path}: concept {name!r} has role {role!r}; expected one of {ROLES}")
    aliases = raw.get("aliases") or []
    if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
        raise ConceptsError(f"{path}: concept {name!r}: aliases must be a list of strings")
    return ConceptText(
        name, (description or "").strip(), role, tuple(aliases),
        prompt=_string(raw, "prompt", name, path, None),
        source=_string(raw, "source", name, path, source),
        label=_string(raw, "label", name, path, "").strip(),
        render=_render(raw.get("render"), name, path),
    )


def _render(raw: object, name: str, path: Path) -> dict | None:
    """A `render` entry: exactly shape, color and fill, as strings (the world checks the values)."""
    if raw is None:
        return None
    if not isinstance(raw, dict) or sorted(raw) != sorted(RENDER_KEYS) or not all(isinstance(v, str) for v in raw.values()):
        raise ConceptsError(f"{path}: concept {name!r}: render must map exactly {list(RENDER_KEYS)} to names, got {raw!r}")
    return {k: raw[k] for k in RENDER_KEYS}


def _read_mapping(path: Path, what: str) -> dict:
    """The top-level mapping of a YAML file, or a ConceptsError naming the file."""
    try:
        data = YAML(typ="safe", pure=True).load(path.read_text())
    except Exception as err:  # ruamel raises several parser error types
        raise ConceptsError(f"cannot parse {what} {path}: {err}") from err
    if not isinstance(data, dict) or "concepts" not in data:
        raise ConceptsError(f"{path}: expected a mapping with a 'concepts' mapping")
    return data


def load_concepts_file(path: str | Path) -> dict[str, ConceptText]:
    """Read a concepts file: {source: ..., concepts: {name: {description, role, label, ...}}}."""
    path = Path(path)
    if not path.is_file():
        raise ConceptsError(f"concepts file not found: {path}")
    data = _read_mapping(path, "concepts file")
    if not isinstance(data["concepts"], dict) or not data["concepts"]:
        raise ConceptsError(f"{path}: expected a mapping with a non-empty 'concepts' mapping")
    source = str(data.get("source", ""))
    return {str(n): _parse_concept(n, raw, source, path) for n, raw in data["concepts"].items()}


def load_generated(path: str | Path) -> dict[str, ConceptText]:
    """Read a generated file (none yet, or `concepts: {}`, is fine): name -> description and source."""
    path = Path(path)
    if not path.exists():
        return {}
    if not path.is_file():
        raise ConceptsError(f"generated descriptions file {path} is not a file")
    entries = _read_mapping(path, "generated descriptions file")["concepts"] or {}
    if not isinstance(entries, dict):
        raise ConceptsError(f"{path}: 'concepts' must be a mapping of name -> {{description, source}}")
    return {str(n): _parse_concept(n, raw, "", path, GENERATED_KEYS) for n, raw in entries.items()}


def undescribed_error(names: list[str], concepts_file: str | Path = "the concepts file",
                      generated_file: str | Path = "params 'concepts.generated'") -> ConceptsError:
    """The error for concepts that nothing describes: where to write them, or how to generate them."""
    listed = ", ".join(repr(n) for n in names)
    subject = f"concept {listed} has" if len(names) == 1 else f"concepts {listed} have"
    return ConceptsError(
        f"{subject} no description in {concepts_file}: write one there, or set params "
        f"'concepts.generator' to have an LLM write it into {generated_file}")


def wanted_concepts(entries: dict[str, ConceptText], names: tuple[str, ...]) -> list[ConceptText]:
    """The concepts params name, in order; a name the file lacks becomes an undescribed novel concept."""
    if not names:
        raise ConceptsError("params 'concepts.names' is empty: nothing to invert")
    return [entries.get(n) or ConceptText(check_name(n, "params 'concepts.names'"), "") for n in names]


def write_generated(path: Path, new: list[ConceptText]) -> None:
    """Add the new entries to the generated file (created with its header if absent), atomically.

    A round-trip load keeps the user's comments and edits to the existing entries.
    """
    yaml = YAML()  # round-trip mode
    yaml.width = 100
    data = yaml.load(path.read_text() if path.exists() else GENERATED_HEADER)
    if data.get("concepts") is None:
        data["concepts"] = yaml.load("{}")
    if new:
        data["concepts"].fa.set_block_style()
    for concept in new:
        data["concepts"][concept.name] = {"description": concept.description, "source": concept.source}
    text = StringIO()
    yaml.dump(data, text)
    write_text(path, text.getvalue())


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
        raise ConceptsError(f"concept file not found: {path}; run the concepts stage first")
    try:
        record = json.loads(path.read_text())
        record["aliases"] = tuple(record.get("aliases", ()))
        return ConceptText(**record)
    except (json.JSONDecodeError, TypeError, AttributeError) as err:
        raise ConceptsError(f"{path}: malformed concept file ({err}); rerun the concepts stage") from err


def concept_texts(concept: ConceptText) -> dict[str, str]:
    """The texts of a concept that reach the text tower: the description (inversion, description
    prompt), the fine-tuning caption and a class-prompt override."""
    texts = {"description": concept.description, "caption": finetune_caption(concept)}
    if concept.prompt:
        texts["prompt"] = concept.prompt
    return texts


def check_text_lengths(concepts: list[ConceptText], budget: "TextBudget", truncate: bool) -> list[ConceptText]:
    """Stop on a text longer than the text tower's context, which its tokenizer would cut without
    a word; with `truncate`, warn instead and record what the tower keeps (`truncated`)."""
    out = []
    for concept in concepts:
        texts = concept_texts(concept)
        long = {kind: n for kind, text in texts.items() if (n := budget.count(text)) > budget.context_length}
        if long and not truncate:
            found = ", ".join(f"its {kind} has {n} tokens" for kind, n in long.items())
            raise ConceptsError(
                f"concept {concept.name!r}: {found}, over the text tower's context of {budget.context_length}; "
                "shorten the description, or set params 'concepts.truncate: true' to cut it (with a warning)")
        if long:
            kept = {kind: budget.kept(texts[kind]) for kind in long}
            warn(f"concept {concept.name!r}: {', '.join(long)} cut to {budget.context_length} tokens: "
                 + "; ".join(f"{kind} used as {text!r}" for kind, text in kept.items()))
            concept = replace(concept, truncated=kept)
        out.append(concept)
    return out


def world_concepts(entries: dict[str, ConceptText]) -> dict[str, dict[str, str]]:
    """name -> {shape, color, fill, role} of every concepts-file entry that the demo world draws."""
    return {c.name: {**c.render, "role": c.role} for c in entries.values() if c.render is not None}


def read_concepts(concepts_dir: Path, names: tuple[str, ...]) -> list[ConceptText]:
    """The per-concept files of `names`, in order."""
    return [read_concept_file(Path(concepts_dir) / f"{name}.json") for name in names]
