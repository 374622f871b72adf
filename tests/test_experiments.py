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
