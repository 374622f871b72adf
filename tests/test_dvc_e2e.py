"""The real `dvc repro` in a temporary git repo: the pipeline runs, a second run skips every
stage, an lr sweep reruns only what depends on lr, and each typical edit (a description, a new
recipe, one recipe's setting, one family's lr, a new novel concept) makes exactly the stages that
read it stale (`dvc status`, what `dvc repro --dry` would start with; the stages downstream of
them follow once their inputs change).

Reduced params: demo backend pretrained for 3 steps, 3 of the 11 demo concepts (the novel
blicket and dax, whose inversions the checks rerun, two being the fewest the paper recipe's Eq. 2
loss accepts; the known lantern, which the retention metrics
score), 2 images per concept and split, 3 inversion steps, one recipe (`paper`); the demo ViLT
family pretrained for 3 steps (it fine-tunes on the demo CLIP's inversions); the demo CoCa family
pretrained for 3 steps, fine-tuned for one epoch and captioning with 2 beams; the demo CLIP segments
6 renders. The first stage run imports torch, open_clip and transformers itself (5-8 s) and starts
the warm-start server (ktpipe/warm.py) that the later ones are forked from; `pytest -n 0 -s` prints
the parts' wall times (repro 62 s, the lr sweep point 20 s, the queued one 36 s, the team's S3
workflow 88 s, 286 s in all, on an idle 2-core machine on 2026-12-07).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from conftest import REPO, deep_merge

pytestmark = pytest.mark.slow

CONCEPTS = ["blicket", "dax", "lantern"]
REDUCED = {
    "concepts": {"names": CONCEPTS},
    "model": {"device": "cpu"},
    "world": {"val_per_concept": 2, "test_per_concept": 2},  # image_size stays 32 (the demo model's)
    "pretrain": {"steps": 3, "batch_size": 16, "name_batch": 8, "warmup": 1},
    "invert": {"steps": 3, "samples": 2},
    "finetune": {"epochs": 1},
    "families": {"vilt": {"pretrain": {"steps": 3, "batch_size": 8, "warmup": 1}},
                 "coca": {"pretrain": {"steps": 3, "batch_size": 8, "warmup": 1}, "recipes": {"full": {"epochs": 1}},
                          "evaluate": {"generation": {"beams": 2, "max_length": 8}, "spice": False}}},
}
RECIPES = {"paper": {"rehearsal": False}}  # one recipe: every stage kind runs, each run costs a start-up
VILT_STAGES = {"base_model_family@vilt", "finetune_family@vilt", "evaluate_family@vilt"}  # the demo ViLT family
COCA_STAGES = {"base_model_family@coca", "finetune_family@coca", "evaluate_family@coca"}  # the demo captioner
ALL_STAGES = {"data", "base_model", "captions", "invert", "finetune@paper",
              "evaluate_baseline", "evaluate@paper", "report", *VILT_STAGES, *COCA_STAGES}
LR_STAGES = {"finetune@paper", "evaluate@paper", "report"}
RUNNING = re.compile(r"Running stage '([^']+)'")
SKIPPED = re.compile(r"Stage '([^']+)' didn't change, skipping")
PULLED = re.compile(r"Pulling data for stage: '([^']+)'")  # `dvc repro --pull`: outputs fetched, nothing run


def make_env(root: Path) -> dict[str, str]:
    identity = {"GIT_AUTHOR_NAME": "ktpipe tests", "GIT_AUTHOR_EMAIL": "tests@ktpipe.invalid"}
    return {
        **os.environ,
        **identity,
        "GIT_COMMITTER_NAME": identity["GIT_AUTHOR_NAME"],
        "GIT_COMMITTER_EMAIL": identity["GIT_AUTHOR_EMAIL"],
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # `python` in cmd
        "DVC_NO_ANALYTICS": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TQDM_DISABLE": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONWARNINGS": "ignore",
        "PYTHONPATH": str(root),  # `python -m ktpipe` imports the repo copy's ktpipe, as a clone would
    }


class Repo:
    """Commands in one temporary repo; returns stdout+stderr, failing loudly on a non-zero exit."""

    def __init__(self, root: Path):
        self.root, self.env = root, make_env(root)

    def run(self, *cmd: str, timeout: float = 400, stdout_only: bool = False) -> str:
        result = subprocess.run(cmd, cwd=self.root, env=self.env, capture_output=True, text=True, timeout=timeout)
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"{' '.join(cmd)} exited {result.returncode}:\n{output}"
        return result.stdout if stdout_only else output

    def dvc(self, *args: str, **kwargs) -> str:
        return self.run(sys.executable, "-m", "dvc", *args, **kwargs)

    def status(self) -> dict:
        """`dvc status --json`: stage -> what changed (empty when up to date)."""
        return json.loads(self.dvc("status", "--json", stdout_only=True))

    def git(self, *args: str) -> str:
        return self.run("git", *args)

    def commit(self, message: str) -> None:
        self.git("add", "-A")
        self.git("commit", "-q", "-m", message)


def ran_and_skipped(output: str) -> tuple[set[str], set[str]]:
    return set(RUNNING.findall(output)), set(SKIPPED.findall(output))


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Repo:
    """A git+DVC repo holding the project's pipeline files and reduced params, committed."""
    root = tmp_path_factory.mktemp("e2e") / "repo"
    root.mkdir()
    no_cache = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(REPO / name, root / name)
    for folder in ("captions", "ktpipe", "stages"):
        shutil.copytree(REPO / folder, root / folder, ignore=no_cache)
    yaml = YAML(typ="safe", pure=True)
    params = {**deep_merge(yaml.load((REPO / "params.yaml").read_text()), REDUCED), "recipes": RECIPES}
    with (root / "params.yaml").open("w") as fh:
        yaml.dump(params, fh)
    repo = Repo(root)
    repo.git("init", "-q")
    repo.dvc("init", "-q")
    repo.commit("pipeline")
    return repo


@pytest.fixture(scope="module")
def s3_server(repo) -> str:
    """A local S3-compatible server (moto's, in this process) with an empty bucket `ktpipe-team`;
    the repo's commands get its test credentials. Returns its endpoint URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    credentials = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    repo.env.update(credentials)
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket="ktpipe-team")
    yield endpoint
    server.stop()


def test_dvc_pipeline_end_to_end(repo, s3_server):
    start = time.monotonic()
    timings = {}

    # 1. the whole pipeline runs
    ran, _ = ran_and_skipped(repo.dvc("repro"))
    timings["repro"] = time.monotonic() - start
    assert ran == ALL_STAGES
    reports = repo.root / "reports"
    assert "| blicket | target |" in (reports / "results.md").read_text()
    assert "| `vilt` (demo_vilt) | paper |" in (reports / "results.md").read_text()
    metrics = json.loads((reports / "metrics.json").read_text())
    default_lr = YAML(typ="safe", pure=True).load((REPO / "params.yaml").read_text())["lr"]
    assert metrics["lr"] == pytest.approx(default_lr) and 0 <= metrics["test"]["classification"]["paper"]["target"] <= 1
    segmented = metrics["test_segmentation"]["segmentation"]  # the demo's segmentation set, scored per model
    assert set(segmented) == {"baseline", "paper"} and all(0 <= m["dsc"] <= 1 for m in segmented.values())
    assert (repo.root / "metrics/eval/paper/test_segmentation.segmentation.parquet").is_file()
    assert (repo.root / "metrics/eval/families/coca/full/test_captioning.captions.jsonl").is_file()
    cached = set((repo.root / ".dvc/cache/runs").rglob("*"))  # DVC's run-cache: every computing stage enters it
    assert len({p.parent.name for p in cached if p.is_file()}) == len(ALL_STAGES) - 2  # not concepts, report
    assert (reports / "figures").is_dir()
    repo.commit("first run")

    # 2. a second run skips every stage
    ran, skipped = ran_and_skipped(repo.dvc("repro"))
    assert not ran and skipped == ALL_STAGES
    assert "Data and pipelines are up to date." in repo.dvc("status")

    # 2b. the inversions recomputed on their own (the inversion store deleted, so none is copied)
    # write the same bytes (the wall times go to an uncached metrics file no stage reads), so
    # nothing downstream goes stale
    shutil.rmtree(repo.root / ".ktpipe/store/invert")
    ran, _ = ran_and_skipped(repo.dvc("repro", "-s", "-f", "invert"))
    assert ran == {"invert"}
    assert "Data and pipelines are up to date." in repo.dvc("status")
    timing = json.loads((repo.root / "metrics/invert.json").read_text())
    assert {c: t["how"] for c, t in timing["concepts"].items()} == {c: "computed" for c in CONCEPTS}
    assert all(t["seconds"] > 0 for t in timing["concepts"].values())

    # 3. an lr sweep point reruns exactly the stages that read lr or a fine-tuned model
    mark = time.monotonic()
    output = repo.dvc("exp", "run", "-S", "lr=2e-5")
    timings["exp run"] = time.monotonic() - mark
    ran, skipped = ran_and_skipped(output)
    assert ran == LR_STAGES, output
    assert skipped == ALL_STAGES - LR_STAGES, output
    assert json.loads((reports / "metrics.json").read_text())["lr"] == pytest.approx(2e-5)
    assert json.loads((reports / "lr_curve/paper.json").read_text())[0]["lr"] == pytest.approx(2e-5)
    assert json.loads((repo.root / "metrics/finetune/paper.json").read_text())["lr"] == pytest.approx(2e-5)

    # 3b. the README's sweep: a queued point runs in DVC's queue, `dvc exp show` lists the metrics,
    # the lr plot compares experiments and `ktpipe experiments` summarizes them
    repo.commit("lr 2e-5")
    mark = time.monotonic()
    repo.dvc("exp", "run", "--queue", "-S", "lr=5e-5")
    repo.dvc("queue", "start")
    wait_for_queue(repo)
    timings["queued exp"] = time.monotonic() - mark
    shown = json.loads(repo.dvc("exp", "show", "--json", stdout_only=True))
    found = [exp for row in shown for exp in (row.get("experiments") or [])]
    assert found, shown
    plots = repo.dvc("plots", "diff", *[e["name"] for e in found if e.get("name")], "-o", "plots_out")
    assert (repo.root / "plots_out/index.html").is_file(), plots
    table = repo.run(sys.executable, "-m", "stages", "experiments", "--lr", "5e-5", "--out", "reports/experiments.md")
    assert "over seeds at lr 5e-05" in table and "test.classification.paper.target" in table

    # 4. one changed description: the concepts stage reruns; then the invert stage recomputes that
    # concept's images only and copies the others', bit for bit, from the inversion store; the base
    # models, which read the known concepts alone, are not stale
    before = {c: (repo.root / f"data/inverted/{c}/images.safetensors").read_bytes() for c in CONCEPTS}
    concepts_file = repo.root / "captions/demo.yaml"
    concepts_file.write_text(concepts_file.read_text().replace("an outlined pink triangle", "a solid pink triangle"))
    assert set(repo.status()) == {"captions"}
    mark = time.monotonic()
    ran, _ = ran_and_skipped(repo.dvc("repro", "captions"))
    timings["repro concepts"] = time.monotonic() - mark
    assert ran == {"captions"}
    stale = {"invert", "finetune@paper", "evaluate_baseline", "evaluate@paper", "report",  # these read
             "finetune_family@vilt", "evaluate_family@vilt", "finetune_family@coca", "evaluate_family@coca"}  # all
    assert set(repo.status()) == stale  # of data/concepts
    ran, skipped = ran_and_skipped(repo.dvc("repro", "--dry"))
    assert {"data", "base_model", "captions", "base_model_family@vilt", "base_model_family@coca"} <= skipped
    ran, _ = ran_and_skipped(repo.dvc("repro", "-s", "invert"))
    assert ran == {"invert"}
    timing = json.loads((repo.root / "metrics/invert.json").read_text())
    assert {c: t["how"] for c, t in timing["concepts"].items()} == {"blicket": "reused", "dax": "computed",
                                                                      "lantern": "reused"}
    after = {c: (repo.root / f"data/inverted/{c}/images.safetensors").read_bytes() for c in CONCEPTS}
    assert after["dax"] != before["dax"] and all(after[c] == before[c] for c in ("blicket", "lantern"))
    repo.git("checkout", "captions/demo.yaml")
    ran, _ = ran_and_skipped(repo.dvc("repro", "captions", "invert"))  # back as committed: from the run-cache
    assert "Data and pipelines are up to date." in repo.dvc("status")

    # 5. typical params edits make exactly the stages that read them stale
    for edit, expected in PARAMS_EDITS:
        with edited_params(repo.root, edit):
            assert set(repo.status()) == expected, edit.__doc__

    # 6. a novel concept added the README's way: the concepts and data stages rerun and a new
    # inversion appears; no base model is stale (pretraining never reads a novel concept)
    with edited_params(repo.root, add_novel_concept):
        ran, _ = ran_and_skipped(repo.dvc("repro", "captions"))
        status = repo.status()
        assert {"data", "invert"} <= set(status) and not {s for s in status if s.startswith("base_model")}, status
    repo.git("checkout", "dvc.lock")  # back as committed: the captions of the three concepts, from the cache
    repo.dvc("checkout", "captions")

    # 7. the team's shared cache: a remote takes every output and the run-cache
    remote = repo.root.parent / "remote"
    repo.dvc("remote", "add", "-d", "shared", str(remote))
    repo.dvc("push", "--run-cache")
    assert (remote / "runs").is_dir() and any((remote / "files").rglob("*"))

    # 8. a teammate's clone reuses them: `dvc repro --pull` fetches every output and runs nothing
    repo.commit("results and the shared remote")
    teammate = Repo(repo.root.parent / "teammate")
    subprocess.run(["git", "clone", "-q", str(repo.root), str(teammate.root)], check=True, env=repo.env)
    teammate.env["PYTHONPATH"] = str(teammate.root)
    output = teammate.dvc("repro", "--pull")
    ran, skipped = ran_and_skipped(output)
    pulled = set(PULLED.findall(output))
    assert not ran and pulled | skipped == ALL_STAGES, output
    assert {"base_model", "invert", "finetune@paper", "evaluate@paper"} <= pulled, output
    assert (teammate.root / "models/paper").is_dir() and (teammate.root / "data/inverted/blicket").is_dir()
    assert "Data and pipelines are up to date." in teammate.dvc("status")

    # 9. the same through an S3 bucket (a local S3-compatible server), with git on a shared server:
    # A pushes the cache and the run-cache to the bucket; C clones, computes nothing for the
    # committed pipeline, runs a new lr, where only the stages that read lr run, and pushes the
    # experiment; A pulls it and sees its metrics
    mark = time.monotonic()
    repo.dvc("remote", "add", "bucket", "s3://ktpipe-team/cache")
    repo.dvc("remote", "modify", "bucket", "endpointurl", s3_server)
    repo.dvc("push", "-r", "bucket", "--run-cache")
    repo.commit("the team's bucket")
    server = repo.root.parent / "team.git"
    repo.git("init", "-q", "--bare", str(server))
    repo.git("remote", "add", "origin", str(server))
    repo.git("push", "-q", "origin", "HEAD")
    second = Repo(repo.root.parent / "second")
    subprocess.run(["git", "clone", "-q", str(server), str(second.root)], check=True, env=repo.env)
    second.env = {**repo.env, "PYTHONPATH": str(second.root)}  # with the bucket's credentials
    second.dvc("remote", "default", "--local", "bucket")
    ran, skipped = ran_and_skipped(second.dvc("repro", "--pull"))
    assert not ran and "Data and pipelines are up to date." in second.dvc("status")
    output = second.dvc("exp", "run", "--pull", "-S", "lr=3e-5")
    ran, skipped = ran_and_skipped(output)
    assert ran == LR_STAGES and skipped == ALL_STAGES - LR_STAGES, output
    name = re.search(r"Ran experiment\(s\): (\S+)", output).group(1)
    second.dvc("exp", "push", "origin", name)
    repo.dvc("exp", "pull", "-r", "bucket", "origin", name)
    shown = json.loads(repo.dvc("exp", "show", "--json", stdout_only=True))
    pulled = {exp["name"]: exp for row in shown for exp in (row.get("experiments") or [])}
    assert name in pulled, shown
    params = pulled[name]["revs"][0]["data"]["params"]["params.yaml"]["data"]
    assert params["lr"] == pytest.approx(3e-5)
    timings["team (S3)"] = time.monotonic() - mark

    timings["total"] = time.monotonic() - start
    print("e2e timings (s):", {k: round(v, 1) for k, v in timings.items()})


def wait_for_queue(repo: Repo, timeout: float = 400) -> None:
    """Poll `dvc queue status` until no experiment is queued or running; fail on a failed one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = repo.dvc("queue", "status")
        assert "Failed" not in status, status
        if not re.search(r"\b(Queued|Running)\b", status):
            return
        time.sleep(3)
    raise AssertionError(f"the queue did not finish in {timeout} s:\n{status}")


def add_recipe(params: dict) -> None:
    """A new recipe: its own two stages, and the report that lists every recipe."""
    params["recipes"]["one"] = {"concepts": ["blicket"], "loss": "authors"}


def edit_recipe(params: dict) -> None:
    """One recipe's setting: that recipe's stages and the report."""
    params["recipes"]["paper"]["epochs"] = 2


def family_lr(params: dict) -> None:
    """One family's lr: that family's fine-tuning and evaluation, and the report; not its base model."""
    params["families"]["coca"]["lr"] = 5e-4


def add_novel_concept(params: dict) -> None:
    """A novel concept on a held-out combination, described and rendered in the concepts file."""
    params["concepts"]["names"].append("zork")
    path = Path(params["concepts"]["file"])
    path.write_text(path.read_text() + "  zork: {description: an outlined pink star, role: novel, "
                                       "render: {shape: star, color: pink, fill: outlined}}\n")


PARAMS_EDITS = [
    (add_recipe, {"finetune@one", "evaluate@one", "report"}),
    (edit_recipe, {"finetune@paper", "evaluate@paper", "report"}),
    (family_lr, {"finetune_family@coca", "evaluate_family@coca", "report"}),
]


@contextlib.contextmanager
def edited_params(root: Path, edit):
    """params.yaml (and the concepts file) edited in place, restored afterwards."""
    saved = {name: (root / name).read_text() for name in ("params.yaml", "captions/demo.yaml")}
    yaml = YAML(typ="safe", pure=True)
    params = yaml.load(saved["params.yaml"])
    cwd = os.getcwd()
    os.chdir(root)
    try:
        edit(params)
        with (root / "params.yaml").open("w") as fh:
            yaml.dump(params, fh)
        yield
    finally:
        os.chdir(cwd)
        for name, text in saved.items():
            (root / name).write_text(text)
