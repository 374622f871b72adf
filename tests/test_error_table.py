"""docs/errors.md's table of bad inputs, row by row: each row's case runs its command on a tiny
project and must print exactly the row's error line, exit with status 2, print no traceback, and
leave no output of the failed step behind.

A row is `| `id` | what is wrong | command | error line |` (`...` in a line stands for any
text: the lists of known keys that grow with the params); `CASES` holds each id's set-up and
command. Commands run in-process through the `ktpipe` click group (conftest `run_stage_here`: the
same code and exit path as `python -m stages.<stage>`, without the interpreter's start-up). A
full disk and a read-only folder are a patched writer (the tests run as root, whom no folder
refuses, and mounting a small tmpfs needs privileges CI lacks); a file standing where an output
folder goes is real.
"""
from __future__ import annotations

import errno
import json
import os
import pathlib
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, make_project, read_params, run_stage_here, write_params
from test_bad_input import EVAL_ARGS, INVERT_ARGS, prepare_eval, segmentation_set, write_concepts, write_image_root

TABLE = REPO / "docs" / "errors.md"
ROW = re.compile(r"^\| `([a-z0-9-]+)` \| (.+?) \| (.+?) \| (.+) \|$")
CAPTIONS = ("captions", "captions/demo.yaml", "captions/generated.yaml", "data/concepts", "data/world.json",
            "data/known.json")
INVERT = ("invert", *INVERT_ARGS)
EVALUATE = ("evaluate", *EVAL_ARGS)
DATA = ("data", "data/world.json", "data/eval")


def rows() -> dict[str, str]:
    """id -> the error line docs/errors.md gives it."""
    found = {}
    for line in TABLE.read_text().splitlines():
        match = ROW.match(line)
        if match:
            assert match.group(1) not in found, f"row {match.group(1)!r} twice in docs/errors.md"
            found[match.group(1)] = match.group(4).strip()
    return found


# --- the cases: id -> (set-up of the tiny project, the command's arguments, outputs that must not exist) ---


def params(**overrides):
    return lambda project: write_params(project, **overrides)


def raw_params(old: str, new: str):
    def edit(project: Path) -> None:
        path = project / "params.yaml"
        text = path.read_text()
        assert old in text
        path.write_text(text.replace(old, new))
    return edit


def captions_file(text: str, names: list[str] | None = None):
    def edit(project: Path) -> None:
        (project / "captions/demo.yaml").write_text(text)
        if names:
            write_params(project, concepts={"names": names})
    return edit


def then(*steps):
    def edit(project: Path) -> None:
        for step in steps:
            step(project)
    return edit


def relative_image_root(project: Path) -> None:
    """Concept files, images/{val,test}/<concept>/ and the data stage's manifests, the sets' roots
    relative to the project (so error lines name them the same in every tmp folder)."""
    prepare_eval(project)
    write_params(project, evaluate={"sets": {split: {"root": f"images/{split}"} for split in ("val", "test")}})
    assert run_stage_here(project, *DATA).returncode == 0


def truncate_png(project: Path) -> None:
    relative_image_root(project)
    path = project / "images/val/dax/0000.png"
    path.write_bytes(path.read_bytes()[:60])


def karpathy_without_test_split(project: Path) -> None:
    write_concepts(project)
    root = project / "flickr"
    root.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(root / "0.jpg")
    entry = {"filename": "0.jpg", "split": "train", "sentences": [{"raw": "a dog."}] * 5}
    (root / "dataset_flickr30k.json").write_text(json.dumps({"images": [entry]}))
    write_params(project, evaluate={"sets": {"flickr": {"task": "retrieval", "format": "karpathy", "root": "flickr",
                                                        "labels": "dataset_flickr30k.json", "split": "test"}}},
                 report={"target_set": None, "retention_set": None})


def mask_of_another_size(project: Path) -> None:
    segmentation_set(project)
    Image.fromarray(np.zeros((12, 16), dtype=np.uint8)).save(project / "seg/masks/b.png")


def weights_of_another_architecture(project: Path) -> None:
    """A local-dir checkpoint whose config is the tiny CLIP and whose weights file holds another model's
    tensors (those of a CLIP one block deeper, with a wider embedding)."""
    from safetensors.torch import save_file

    from ktpipe.models import OpenClipModel

    write_concepts(project)
    source = Path(read_params(project)["model"]["name"].removeprefix("local-dir:"))
    folder = project / "mixed"
    shutil.copytree(source, folder)
    config = json.loads((source / "open_clip_config.json").read_text())["model_cfg"]
    other = {**config, "embed_dim": 24, "vision_cfg": {**config["vision_cfg"], "layers": 2}}
    weights = next(folder.glob("*.safetensors"))
    save_file(OpenClipModel.from_config(other).module.state_dict(), str(weights))
    write_params(project, model={"name": f"local-dir:{folder}"})


def stale_evaluations(project: Path) -> None:
    """The evaluations scored `test` as classification; params now make it a retrieval set."""
    for model in ("baseline", "paper", "full"):
        path = project / f"metrics/eval/{model}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"tasks": {"val": "classification", "test": "classification"}, "metrics": {},
                                    "summary": {}}))
    write_params(project, evaluate={"sets": {"test": {"task": "retrieval"}}})


def file_in_the_way(project: Path) -> None:
    write_concepts(project)
    (project / "data/inverted").write_text("not a folder\n")


def committed_params(project: Path) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    for cmd in (["git", "init", "-q"], ["git", "add", "params.yaml"], ["git", "commit", "-q", "-m", "params"]):
        subprocess.run(cmd, cwd=project, check=True, env=env)
    write_params(project, lr=3e-5)


# case -> the OSError every text file written through pathlib fails with while its command runs
FAILING_WRITES = {"disk-full": errno.ENOSPC, "folder-read-only": errno.EROFS}


def fail_writes(code: int, patch: pytest.MonkeyPatch) -> None:
    def write_text(self, *args, **kwargs):
        raise OSError(code, os.strerror(code), str(self))
    patch.setattr(pathlib.Path, "write_text", write_text)


NO_CUDA = not torch.cuda.is_available()

CASES = {
    # params
    "unknown-key": (params(invert={"stepz": 3}), CAPTIONS, ["data/concepts"]),
    "unknown-top-key": (params(sede=1), CAPTIONS, ["data/concepts"]),
    "samples-zero": (params(invert={"samples": 0}), CAPTIONS, ["data/concepts"]),
    "nproc-zero": (params(distributed={"nproc_per_node": 0}), CAPTIONS, ["data/concepts"]),
    "steps-negative": (params(invert={"steps": -1}), CAPTIONS, ["data/concepts"]),
    "lr-nan": (raw_params("lr: 0.0001", "lr: .nan"), CAPTIONS, ["data/concepts"]),
    "lr-negative": (params(lr=-1), CAPTIONS, ["data/concepts"]),
    "lr-string": (params(lr="abc"), CAPTIONS, ["data/concepts"]),
    "concept-twice": (params(concepts={"names": ["dax", "blicket", "dax"]}), CAPTIONS, ["data/concepts"]),
    "concept-dotdot": (params(concepts={"names": ["../blicket"]}), CAPTIONS, ["data/concepts"]),
    "concept-slash": (params(concepts={"names": ["blicket/dax"]}), CAPTIONS, ["data/concepts"]),
    "concept-non-ascii": (params(concepts={"names": ["blické"]}), CAPTIONS, ["data/concepts"]),
    "device-cuda": (params(model={"device": "cuda"}), CAPTIONS, ["data/concepts"]),
    "device-unknown": (params(model={"device": "gpu"}), CAPTIONS, ["data/concepts"]),
    "recipe-baseline": (params(recipes={"baseline": {}}), CAPTIONS, ["data/concepts"]),
    "report-set-unknown": (params(report={"target_set": "nope"}), CAPTIONS, ["data/concepts"]),
    # the captions file
    "captions-not-yaml": (captions_file("concepts:\n  blicket: {description: [unclosed\n"), CAPTIONS, ["data/concepts"]),
    "captions-empty": (captions_file("concepts:\n  blicket: {description: ''}\n", ["blicket"]), CAPTIONS,
                       ["data/concepts"]),
    "captions-no-description": (captions_file("concepts:\n  blicket: {description: a striped orange ring}\n"
                                              "  dax: {role: novel}\n", ["blicket", "dax"]), CAPTIONS, ["data/concepts"]),
    "captions-missing": (None, ("captions", "captions/nope.yaml", *CAPTIONS[2:]), ["data/concepts"]),
    "concept-undescribed": (params(concepts={"names": ["blicket", "moongate"]}), CAPTIONS, ["data/concepts"]),
    # models
    "unknown-backend": (then(write_concepts, params(model={"backend": "tensorflow"})), INVERT, ["data/inverted/blicket"]),
    "unknown-model-name": (then(write_concepts, params(model={"name": "ViT-Nope-99"})), INVERT, ["data/inverted/blicket"]),
    "pretrained-folder": (then(write_concepts, lambda p: (p / "weights").mkdir(),
                               params(model={"name": "ViT-B-32", "pretrained": "weights"})), INVERT,
                          ["data/inverted/blicket"]),
    "demo-checkpoint-missing": (then(write_concepts, params(model={"backend": "demo", "name": "ktpipe-demo",
                                                                   "pretrained": "models/nowhere"})), INVERT,
                                ["data/inverted/blicket"]),
    "weights-of-another-model": (weights_of_another_architecture, INVERT, ["data/inverted/blicket"]),
    "checkpoint-missing": (relative_image_root, ("evaluate", "paper", "models/nope", *EVAL_ARGS[2:]),
                           ["metrics/eval/baseline.json"]),
    # data
    "png-truncated": (truncate_png, EVALUATE, ["metrics/eval/baseline.json"]),
    "root-missing": (then(write_concepts, params(evaluate={"sets": {"val": {"format": "folder", "root": "nowhere/val"}}})),
                     DATA, ["data/eval"]),
    "env-unset": (then(write_concepts, params(evaluate={"sets": {"val": {"format": "folder",
                                                                         "root": "$KTPIPE_NO_SUCH_VAR/val"}}})),
                  DATA, ["data/eval"]),
    "class-folder-empty": (then(write_concepts, lambda p: write_image_root(p / "images", per_class=0),
                                params(evaluate={"sets": {s: {"format": "folder", "root": f"images/{s}"}
                                                          for s in ("val", "test")}})), DATA, ["data/eval"]),
    "karpathy-split-missing": (karpathy_without_test_split, DATA, ["data/eval"]),
    "mask-size": (mask_of_another_size, DATA, ["data/eval"]),
    "data-stage-not-run": (write_concepts, EVALUATE, ["metrics/eval/baseline.json"]),
    "concept-file-missing": (None, INVERT, ["data/inverted/blicket"]),
    # outputs
    "evaluation-stale-task": (stale_evaluations, ("report",), ["reports/results.md"]),
    "output-is-a-file": (file_in_the_way, INVERT, []),
    "disk-full": (None, CAPTIONS, ["data/concepts"]),  # FAILING_WRITES
    "folder-read-only": (None, CAPTIONS, ["data/concepts"]),
    "preset-over-edits": (committed_params, ("preset", "table1_vit_b32", "--presets-dir", str(REPO / "presets")), []),
}


def test_every_row_has_a_case_and_every_case_a_row():
    assert len(CASES) >= 30
    assert set(rows()) == set(CASES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_prints_the_tables_error_line(case, tiny_checkpoint, tmp_path, monkeypatch):
    if case == "device-cuda" and not NO_CUDA:
        pytest.skip("this machine has a CUDA device")
    setup, args, absent = CASES[case]
    project = make_project(tmp_path / "project", tiny_checkpoint)
    text = (project / "params.yaml").read_text()
    if setup is not None:
        setup(project)
    if case in FAILING_WRITES:  # for the command only
        fail_writes(FAILING_WRITES[case], monkeypatch)
    result = run_stage_here(project, *args)
    monkeypatch.undo()
    detail = f"exit {result.returncode}\nstderr:\n{result.stderr}"
    assert result.returncode == 2 and "Traceback" not in result.stderr, detail
    lines = [line for line in result.stderr.splitlines() if line.startswith("ktpipe: error: ")]
    assert len(lines) == 1, detail
    line = lines[0].removeprefix("ktpipe: error: ").replace(f"{project}/", "")  # set roots given absolute
    expected = rows().get(case)
    pattern = ".*".join(map(re.escape, (expected or "").split("..."))) if expected else None  # "...": any text
    assert pattern and re.fullmatch(pattern, line), \
        f"docs/errors.md row {case!r} says\n  {expected}\nthe command printed\n  {line}"
    for out in absent:
        assert not (project / out).exists(), f"{out} exists after the failed run"
    if case == "preset-over-edits":  # the edits survive
        assert read_params(project)["lr"] == 3e-5 and (project / "params.yaml").read_text() != text


def test_an_unreachable_remote_fails_the_push_and_changes_nothing(tmp_path):
    """docs/errors.md: an S3 remote whose endpoint refuses the connection (nothing listens on port 9)."""
    import sys

    from test_dvc_e2e import Repo

    repo = Repo(tmp_path / "repo")
    repo.root.mkdir()
    repo.git("init", "-q")
    repo.dvc("init", "-q")
    (repo.root / "a.txt").write_text("an output\n")
    repo.dvc("add", "-q", "a.txt")
    repo.dvc("remote", "add", "-d", "bucket", "s3://ktpipe-team/cache")
    repo.dvc("remote", "modify", "bucket", "endpointurl", "http://127.0.0.1:9")
    before = sorted(str(p.relative_to(repo.root)) for p in repo.root.rglob("*") if ".dvc/tmp" not in str(p))
    env = {**repo.env, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_MAX_ATTEMPTS": "1"}
    done = subprocess.run([sys.executable, "-m", "dvc", "push"], cwd=repo.root, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 255, done.stderr
    assert 'ERROR: unexpected error - Could not connect to the endpoint URL: "http://127.0.0.1:9/' in done.stderr
    after = sorted(str(p.relative_to(repo.root)) for p in repo.root.rglob("*") if ".dvc/tmp" not in str(p))
    assert after == before
