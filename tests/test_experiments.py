"""Tables across experiments, on a frame shaped like `dvc.api.exp_show()` rows: reports/metrics.json
nests `<set>.<task>.<model>.<metric>`, so its columns read like `test.classification.full.target`."""
import pandas as pd
import pytest

from ktpipe.experiments import lr_table, render, seed_table


def frame() -> pd.DataFrame:
    rows = []
    for seed, lr, full, paper in [(0, 1e-3, 0.8, 0.9), (0, 2e-3, 0.9, 0.95), (1, 2e-3, 0.7, 0.85), (2, 2e-3, 0.8, 0.8)]:
        rows.append({"Experiment": f"e{seed}{lr}", "params.yaml:lr": lr, "seed": float(seed),
                     "test.classification.full.target": full, "test.classification.full.retention": 1.0,
                     "test.classification.paper.target": paper, "val.classification.full.target": full - 0.05,
                     "val.classification.full.retention": 0.99, "val.classification.full.blicket": 0.5})
    return pd.DataFrame(rows)


def test_seed_table_mean_and_std_over_seeds_at_one_lr():
    table = seed_table(frame(), 2e-3)
    assert list(table.index) == [0, 1, 2, "mean", "std"]
    assert table.loc["mean", "test.classification.full.target"] == pytest.approx(0.8)
    assert table.loc["std", "test.classification.full.target"] == pytest.approx(((0.01 + 0.01 + 0) / 3) ** 0.5)
    assert table.loc["mean", "test.classification.paper.target"] == pytest.approx((0.95 + 0.85 + 0.8) / 3)


def test_seed_table_rejects_an_lr_without_runs():
    with pytest.raises(ValueError, match="lr = 0.5"):
        seed_table(frame(), 0.5)


def test_lr_table_keeps_target_and_retention_of_one_seed_sorted_by_lr():
    table = lr_table(frame(), seed=0)
    assert list(table.index) == [1e-3, 2e-3]
    assert list(table.columns) == ["val.classification.full.target", "val.classification.full.retention"]
    assert table.loc[2e-3, "val.classification.full.target"] == pytest.approx(0.85)


def test_render_writes_both_tables_as_percentages():
    text = render(frame(), 2e-3, 0)
    assert "(3 seeds)" in text and "| test.classification.full.target" in text and "80.0%" in text
    assert "`val` against learning rate (seed 0)" in text and "`test` over seeds at lr 0.002" in text


def test_render_takes_any_set_names():
    renamed = frame().rename(columns=lambda c: c.replace("test.", "rare.").replace("val.", "rare_val."))
    text = render(renamed, 2e-3, 0, test_set="rare", val_set="rare_val")
    assert "| rare.classification.full.target" in text and "`rare_val` against learning rate" in text


# --- `ktpipe experiments`, end to end on hand-made experiment records ---------------------------


def table_rows(text: str) -> dict[str, list[str]]:
    """Markdown table rows of `text`: first cell -> the other cells, stripped."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and not set(cells[0]) <= set(":-"):
            rows[cells[0]] = cells[1:]
    return rows


def exp_show_rows() -> list[dict]:
    """What `dvc.api.exp_show` returns: finished runs, one of them listed twice under another name,
    a failed and a queued run (whose metrics must not count)."""
    rows = [{**row.to_dict(), "rev": row["Experiment"], "State": "Success", "headline.target": 0.8,
             "val.classification.baseline.retention": 0.995} for _, row in frame().iterrows()]
    again = {**rows[1], "Experiment": "e00.002-again", "rev": "e00.002-again"}
    broken = {**rows[-1], "Experiment": "broken", "State": "Failed", "test.classification.full.target": 0.0}
    queued = {**rows[-1], "Experiment": "queued", "State": "Queued", "test.classification.full.target": 0.0}
    return [*rows, again, broken, queued]


def test_load_experiments_keeps_finished_runs_once(monkeypatch):
    import dvc.api

    from ktpipe.experiments import load_experiments

    monkeypatch.setattr(dvc.api, "exp_show", lambda repo: exp_show_rows())
    loaded = load_experiments(".")
    assert list(loaded["Experiment"]) == list(frame()["Experiment"])  # the repeat, failed and queued runs dropped
    assert list(loaded["test.classification.full.target"]) == [0.8, 0.9, 0.7, 0.8]


def test_experiments_command_renders_the_records_numbers(monkeypatch, tmp_path):
    import dvc.api
    from click.testing import CliRunner

    from stages.cli import main

    monkeypatch.setattr(dvc.api, "exp_show", lambda repo: exp_show_rows())
    out = tmp_path / "reports" / "experiments.md"
    result = CliRunner().invoke(main, ["experiments", "--lr", "2e-3", "--seed", "0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert text.strip() == result.output.strip()
    rows = table_rows(text)
    # seeds 0, 1, 2 at lr 2e-3: full target 0.9, 0.7, 0.8 (mean 0.8, population std sqrt(0.02 / 3))
    assert rows["test.classification.full.target"] == ["90.0%", "70.0%", "80.0%", "80.0%", "8.2%"]
    assert rows["test.classification.paper.target"] == ["95.0%", "85.0%", "80.0%", "86.7%", "6.2%"]
    assert rows["test.classification.full.retention"] == ["100.0%"] * 4 + ["0.0%"]
    assert "(3 seeds)" in text and "failed" not in text
    # seed 0 against lr on val: 0.75 at 1e-3, 0.85 at 2e-3; retention 0.99 both
    assert rows["0.001"] == ["75.0%", "99.0%", "99.5%"] and rows["0.002"] == ["85.0%", "99.0%", "99.5%"]  # last:
    # the base model's retention
    assert [key for key in rows if key.startswith("0.00")] == ["0.001", "0.002"]  # rising lr
    # the lr curve as a PNG beside the Markdown, shown in it
    assert "![Target and retention against learning rate](lr_sweep.png)" in text
    assert (out.parent / "lr_sweep.png").stat().st_size > 10_000
    # the trade-off across the sweep: full at both lrs on val (0.75 and 0.85 target, 0.99 retention), the
    # base model's retention 0.995: 0.85 keeps more than 95% of it, nothing keeps 99% (0.98505)
    assert "![Target against retention across the learning-rate sweep](tradeoff_sweep.png)" in text
    assert "Pareto front: `full lr=0.002`." in text
    assert "| retention >= 95% of the base model's (99.5%) | 85.0% | 99.0% | full lr=0.002 |" in text
    assert (out.parent / "tradeoff_sweep.png").stat().st_size > 10_000


def test_lr_curves_are_each_recipes_target_and_retention_by_lr():
    from ktpipe.experiments import lr_curves

    curves = lr_curves(lr_table(frame(), seed=0))
    assert curves == {"full": [(0.001, 0.75, 0.99), (0.002, 0.85, 0.99)]}


def test_experiments_command_takes_lr_and_seed_from_params(monkeypatch, tmp_path):
    import dvc.api
    from click.testing import CliRunner

    from stages.cli import main

    monkeypatch.setattr(dvc.api, "exp_show", lambda repo: exp_show_rows())
    (tmp_path / "params.yaml").write_text("lr: 2.0e-3\nseed: 0\n")
    out = tmp_path / "experiments.md"
    result = CliRunner().invoke(main, ["experiments", "--params", str(tmp_path / "params.yaml"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "over seeds at lr 0.002 (3 seeds)" in out.read_text()
    (tmp_path / "params.yaml").write_text("lr: 0.5\nseed: 0\n")
    result = CliRunner().invoke(main, ["experiments", "--params", str(tmp_path / "params.yaml"), "--out", str(out)])
    assert result.exit_code == 2 and "lr = 0.5" in result.output


def test_experiments_command_names_an_lr_without_runs(monkeypatch, tmp_path):
    import dvc.api
    from click.testing import CliRunner

    from stages.cli import main

    monkeypatch.setattr(dvc.api, "exp_show", lambda repo: exp_show_rows())
    out = tmp_path / "experiments.md"
    result = CliRunner().invoke(main, ["experiments", "--lr", "0.5", "--out", str(out)])
    assert result.exit_code == 2 and "lr = 0.5" in result.output and not out.exists()
