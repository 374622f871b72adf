"""The documentation stays true to the project: docs/params.md is what `ktpipe.paramsdoc` renders
from ktpipe/params.py and lists every field of every params section, README.md fits on a screen
(at most 15,000 bytes) and links to every docs page, and every relative link in README.md and
docs/ points to a file that exists (and, with a `#fragment`, to a heading of that file).
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

import ktpipe.params
from ktpipe.paramsdoc import REGENERATE, render_params_reference

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
PARAMS_DOC = REPO / "docs" / "params.md"
README_LIMIT = 15_000  # bytes
WRITTEN_BY_REPORT = "reports/figures/"  # the report stage writes these; a fresh clone may lack them

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCED = re.compile(r"^\s*```.*?^\s*```", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
SECTION = re.compile(r"^## (.+) \((\w+)\)$")
ROW_KEY = re.compile(r"^\| `([^`]+)` \|")


def links(text: str) -> list[str]:
    """Targets of the Markdown links and images of `text`, outside code blocks and code spans."""
    prose = INLINE_CODE.sub("", FENCED.sub("", text))
    return LINK.findall(prose)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCED.sub("", path.read_text())
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


def broken_links(path: Path, repo: Path = REPO) -> list[str]:
    """Relative links of a Markdown file whose target file (or heading) does not exist."""
    problems = []
    for target in links(path.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        file_part, _, fragment = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path.resolve()
        try:
            relative = resolved.relative_to(repo).as_posix()
        except ValueError:
            problems.append(f"{target}: outside the repository")
            continue
        if relative.startswith(WRITTEN_BY_REPORT):
            continue
        if not resolved.is_file():
            problems.append(f"{target}: no file {relative}")
        elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            problems.append(f"{target}: no heading #{fragment} in {relative}")
    return problems


def documented_keys(markdown: str) -> dict[str, set[str]]:
    """Dataclass name -> the field names its sections' tables list (the last part of each key)."""
    found: dict[str, set[str]] = {}
    current = None
    for line in markdown.splitlines():
        heading = SECTION.match(line)
        if heading:
            current = found.setdefault(heading.group(2), set())
            continue
        row = ROW_KEY.match(line)
        if row and current is not None:
            current.add(row.group(1).split(".")[-1])
    return found


def missing_fields(markdown: str, module=ktpipe.params) -> list[str]:
    """`Class.field` for every field of every dataclass of `module` that the page does not list."""
    listed = documented_keys(markdown)
    classes = [c for c in vars(module).values()
               if isinstance(c, type) and dataclasses.is_dataclass(c) and c.__module__ == module.__name__]
    assert classes, f"no dataclasses found in {module.__name__}"
    return [f"{c.__name__}.{f.name}" for c in classes for f in dataclasses.fields(c)
            if f.name not in listed.get(c.__name__, set())]


def docs_not_linked(readme: Path, docs: list[Path]) -> list[str]:
    """Docs pages that README links nowhere."""
    targets = {(readme.parent / t.partition("#")[0]).resolve() for t in links(readme.read_text())}
    return [page.name for page in docs if page.resolve() not in targets]


def test_params_reference_is_regenerated():
    assert PARAMS_DOC.is_file(), f"docs/params.md is missing; write it with `{REGENERATE}`"
    assert PARAMS_DOC.read_text() == render_params_reference(), \
        f"docs/params.md differs from ktpipe/params.py; regenerate it with `{REGENERATE}`"


def test_params_reference_lists_every_field_of_every_section():
    missing = missing_fields(PARAMS_DOC.read_text())
    assert not missing, f"docs/params.md does not list {missing}; check ktpipe/paramsdoc.py, then `{REGENERATE}`"


def test_readme_fits_on_a_screen():
    size = len(README.read_bytes())
    assert size <= README_LIMIT, f"README.md is {size} bytes (at most {README_LIMIT}): move details into docs/"


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_point_to_files_that_exist(path):
    problems = broken_links(path)
    assert not problems, f"{path.relative_to(REPO)}:\n" + "\n".join(problems)


def test_readme_links_every_docs_page():
    assert DOCS, "docs/ holds no Markdown page"
    unlinked = docs_not_linked(README, DOCS)
    assert not unlinked, f"README.md links no {unlinked}: add them to its Documentation list"


def test_the_checks_catch_a_broken_link_a_missing_field_and_an_unlinked_page(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Title\n\n## Some `code` heading\n")
    page = tmp_path / "README.md"
    page.write_text("[ok](docs/a.md) [frag](docs/a.md#some-code-heading) [bad](docs/b.md) "
                    "[badfrag](docs/a.md#nowhere) `[code](docs/c.md)` [web](https://example.org) "
                    "![fig](reports/figures/later.png)\n```\n[fenced](docs/d.md)\n```\n")
    assert broken_links(page, tmp_path) == ["docs/b.md: no file docs/b.md",
                                            "docs/a.md#nowhere: no heading #nowhere in docs/a.md"]
    pages = [tmp_path / "docs" / name for name in ("a.md", "c.md", "d.md")]  # c, d: linked in code only
    assert docs_not_linked(page, pages) == ["c.md", "d.md"]
    rendered = render_params_reference()
    assert not missing_fields(rendered)
    dropped = "\n".join(line for line in rendered.splitlines() if "`invert.tv_weight`" not in line)
    assert missing_fields(dropped) == ["InvertParams.tv_weight"]
