"""Prompt templates, kept as data files in ktpipe/data/templates/."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from ktpipe.errors import InputMissingError, KtpipeError


def packaged_templates() -> list[str]:
    """Every template of every packaged template file, in file-name order."""
    folder = resources.files("ktpipe") / "data" / "templates"
    names = sorted(entry.name[:-4] for entry in folder.iterdir() if entry.name.endswith(".txt"))
    return [t for name in names for t in load_templates(name)]


def load_templates(name_or_path: str) -> list[str]:
    """Templates ('{}' marks the class name) from a packaged name or a file path."""
    path = Path(name_or_path)
    if path.suffix == ".txt" and path.is_file():
        text = path.read_text()
    else:
        packaged = resources.files("ktpipe") / "data" / "templates" / f"{name_or_path}.txt"
        if not packaged.is_file():
            raise InputMissingError(f"unknown prompt templates {name_or_path!r}: not a packaged name or .txt file")
        text = packaged.read_text()
    templates = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    bad = [t for t in templates if "{}" not in t]
    if bad or not templates:
        raise KtpipeError(f"templates {name_or_path!r} must be non-empty lines containing '{{}}'; bad: {bad}")
    return templates
