"""The params reference (docs/params.md), rendered from the dataclasses of `ktpipe/params.py`.

It reads that file's source (`ast` for the fields, `tokenize` for their trailing `# ...`
comments), so it runs without importing the library or torch. Regenerate the page with

    python -m ktpipe.paramsdoc > docs/params.md

`tests/test_docs.py` fails when the page and the dataclasses disagree.
"""
from __future__ import annotations

import ast
import io
import json
import tokenize
from dataclasses import dataclass
from pathlib import Path

PARAMS_SOURCE = Path(__file__).with_name("params.py")
REGENERATE = "python -m ktpipe.paramsdoc > docs/params.md"


@dataclass(frozen=True)
class FieldDoc:
    key: str  # full params key, e.g. 'evaluate.sets.<name>.task'
    type: str  # the annotation as written in params.py
    default: str  # the default as written in params.yaml (YAML spelling)
    description: str  # the trailing comment, continuation lines joined


@dataclass(frozen=True)
class SectionDoc:
    key: str  # params key of the section ('' for the top level)
    cls: str  # dataclass name
    doc: str  # the class docstring, or ''
    fields: tuple[FieldDoc, ...]


def read_comments(source: str) -> tuple[dict[int, str], set[int]]:
    """Comment text by line number, and the lines that hold nothing but a comment."""
    comments, alone = {}, set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            line = token.start[0]
            comments[line] = token.string.lstrip("#").strip()
            if not token.line[: token.start[1]].strip():
                alone.add(line)
    return comments, alone


def field_comment(node: ast.AnnAssign, comments: dict[int, str], alone: set[int]) -> str:
    """The comment after a field, joined with the comment-only lines right below it."""
    line = node.end_lineno
    parts = [comments[line]] if line in comments and line not in alone else []
    line += 1
    while parts and line in alone:
        parts.append(comments[line])
        line += 1
    return " ".join(parts)


def dataclass_nodes(tree: ast.Module) -> dict[str, ast.ClassDef]:
    """Every `@dataclass` class of the module, by name."""
    def is_dataclass(node: ast.ClassDef) -> bool:
        names = [d.func if isinstance(d, ast.Call) else d for d in node.decorator_list]
        return any(isinstance(n, ast.Name) and n.id == "dataclass" for n in names)

    return {n.name: n for n in tree.body if isinstance(n, ast.ClassDef) and is_dataclass(n)}


def constants(tree: ast.Module) -> dict[str, object]:
    """Module-level names bound to literals (PAPER_PROMPT, FAMILY_KEYS, ...)."""
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                found[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                continue
    return found


def yaml_value(node: ast.expr, source: str, names: dict[str, object]) -> str:
    """A default as params.yaml spells it: null, true, [a, b], "text", numbers as written."""
    if isinstance(node, ast.Constant):
        if node.value is None or isinstance(node.value, bool):
            return {None: "null", True: "true", False: "false"}[node.value]
        if isinstance(node.value, str):
            return json.dumps(node.value)
        return ast.get_source_segment(source, node)
    if isinstance(node, (ast.Tuple, ast.List)):
        return "[" + ", ".join(yaml_value(e, source, names) for e in node.elts) + "]"
    if isinstance(node, ast.Name) and isinstance(names.get(node.id), str):
        return json.dumps(names[node.id])
    return ast.get_source_segment(source, node)


def default_of(node: ast.AnnAssign, source: str, names: dict[str, object], classes: set[str]) -> str:
    """The field's default; a `field(default_factory=...)` shows what the factory makes."""
    value = node.value
    if value is None:
        return "(required)"
    if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "field":
        factory = next((k.value for k in value.keywords if k.arg == "default_factory"), None)
        if isinstance(factory, ast.Name) and factory.id in classes:
            return "(section)"
        if isinstance(factory, ast.Name):
            return {"dict": "{}", "list": "[]", "tuple": "[]"}.get(factory.id, factory.id + "()")
    return yaml_value(value, source, names)


def nested(annotation: ast.expr, classes: set[str]) -> tuple[str, bool] | None:
    """(dataclass, keyed by name) when a field holds a section: `X`, `X | None` or `dict[str, X]`."""
    if isinstance(annotation, ast.Name) and annotation.id in classes:
        return annotation.id, False
    if isinstance(annotation, ast.BinOp) and isinstance(annotation.op, ast.BitOr):
        return nested(annotation.left, classes) or nested(annotation.right, classes)
    if isinstance(annotation, ast.Subscript) and isinstance(annotation.value, ast.Name):
        if annotation.value.id == "dict" and isinstance(annotation.slice, ast.Tuple):
            inner = nested(annotation.slice.elts[-1], classes)
            return (inner[0], True) if inner else None
    return None


def collect_sections(source: str) -> list[SectionDoc]:
    """The sections reachable from `Params`, depth first in field order (params.yaml's order)."""
    tree = ast.parse(source)
    classes = dataclass_nodes(tree)
    names = constants(tree)
    comments, alone = read_comments(source)
    out: list[SectionDoc] = []

    def visit(key: str, cls: str) -> None:
        node = classes[cls]
        fields, children = [], []
        for item in node.body:
            if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
                continue
            name = item.target.id
            full = f"{key}.{name}" if key else name
            description = field_comment(item, comments, alone)
            inner = nested(item.annotation, set(classes))
            if inner:
                children.append((f"{full}.<name>" if inner[1] else full, inner[0]))
                description = f"{description} (section `{children[-1][0]}` below)".strip()
            fields.append(FieldDoc(full, ast.get_source_segment(source, item.annotation),
                                   default_of(item, source, names, set(classes)), description))
        out.append(SectionDoc(key, cls, ast.get_docstring(node) or "", tuple(fields)))
        for child_key, child_cls in children:
            visit(child_key, child_cls)

    visit("", "Params")
    return out


def cell(text: str) -> str:
    """Text safe inside a Markdown table cell: no column breaks, and no `<name>` read as an HTML
    tag outside code spans (inside them Markdown shows it as written)."""
    parts = text.replace("|", "\\|").split("`")
    return "`".join(p if i % 2 else p.replace("<", "&lt;") for i, p in enumerate(parts))


def code(text: str) -> str:
    return "`" + text.replace("|", "\\|") + "`"


def render_section(section: SectionDoc) -> list[str]:
    title = f"`{section.key}`" if section.key else "Top level"
    lines = [f"## {title} ({section.cls})", ""]
    if section.doc:
        lines += [" ".join(section.doc.split()), ""]
    lines += ["| key | type | default | description |", "|---|---|---|---|"]
    for f in section.fields:
        lines.append(f"| {code(f.key)} | {code(f.type)} | {code(f.default)} | {cell(f.description)} |")
    return lines + [""]


def render_params_reference(source: str | None = None) -> str:
    """docs/params.md: one table per params section (key, type, default, description)."""
    source = PARAMS_SOURCE.read_text() if source is None else source
    names = constants(ast.parse(source))
    lines = [
        f"<!-- Generated from ktpipe/params.py by `{REGENERATE}`; edit the dataclasses' comments, not this page. -->",
        "",
        "# Parameters",
        "",
        "Every key `params.yaml` may hold, one table per section. Each section is a frozen dataclass in",
        "`ktpipe/params.py`; a params file is read as YAML 1.2, and an unknown key or a wrong type stops",
        "a stage with a message naming the key. *Default* is the dataclass default (for the method, the",
        "paper's setting), which a key left out of `params.yaml` takes; `params.yaml` sets the demo's",
        "values and each file of `presets/` a paper experiment's. `<name>` stands for a name you choose",
        "(an evaluation set, a recipe, a model family).",
        "",
    ]
    if "FAMILY_KEYS" in names and "FAMILY_OWN_KEYS" in names:
        lines += [
            "`recipes.<name>` takes any key of the `finetune` section and overrides it for that recipe.",
            "`families.<name>` is a merge patch (RFC 7386) of this file for another model family: it may",
            "set " + ", ".join(f"`{k}`" for k in names["FAMILY_KEYS"]) + ", and must set "
            + ", ".join(f"`{k}`" for k in names["FAMILY_OWN_KEYS"]) + ".",
            "",
        ]
    for section in collect_sections(source):
        lines += render_section(section)
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(render_params_reference(), end="")
