"""Report sections round-trip to disk and merge into one self-contained HTML page without paths."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from neuromoe.errors import InputError
from neuromoe.eval import plots
from neuromoe.eval.report import PNG_MAGIC, Report, build_report, load_section, scrub_paths


def _metrics_csv(path: Path) -> None:
    steps = np.arange(1, 21)
    df = pd.DataFrame({"step": steps, "epoch": steps // 5, "train/loss": 2.0 / steps, "lr": 1e-3 / steps,
                       "val/loss": np.where(steps % 5 == 0, 2.5 / steps, np.nan),
                       "val/mae": np.where(steps % 5 == 0, 10.0 / steps, np.nan)})
    df.to_csv(path, index=False)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run_a"
    section = Report("test").section("Core demo: age")
    section.add_text("Trained on /very/secret/site/sub-0007/anat/sub-0007_T1w.nii.gz.\n\nSecond paragraph.")
    section.add_metrics({"mae": 3.21, "mae_ci": [3.21, 2.9, 3.6], "val": {"r": 0.81, "n": 12}, "size": [32, 32, 32],
                         "cm": [[2, 1], [0, 3]]}, "Validation metrics")
    section.add_table(pd.DataFrame({"subject": ["sub-0001", "sub-0002"], "age": [61.5, np.nan]}), "preds")
    section.add_figure(plots.pred_vs_true(np.array([50, 60, 70.0]), np.array([52, 59, 73.0]), baseline=60),
                       "pred vs true")
    png = tmp_path / "quick.png"
    plots.bar_chart({"a": 1.0, "b": 2.0}).savefig(png)
    section.add_figure(png, "from a file")
    section.save(run)
    _metrics_csv(run / "metrics.csv")
    return run


def test_scrub_paths() -> None:
    assert scrub_paths("see /home/u/data/sub-01_T1w.nii.gz now") == "see sub-01_T1w.nii.gz now"
    assert scrub_paths(r"C:\data\x\sub-02") == "sub-02"
    assert scrub_paths("ratio 1/2, train/val, 5 mm/s") == "ratio 1/2, train/val, 5 mm/s"
    link = "https://doi.org/10.1109/TMI.2025.3551514"
    assert scrub_paths(f"paper {link} and /data/x/y.nii.gz") == f"paper {link} and y.nii.gz"


def test_section_round_trip(run_dir: Path) -> None:
    section = load_section(run_dir)
    assert section.title == "Core demo: age"
    kinds = [i["kind"] for i in section.items]
    assert kinds == ["text", "table", "table", "figure", "figure"]
    metrics = section.items[1]
    assert ["mae_ci", "3.21 [2.9, 3.6]"] in metrics["rows"] and ["val.r", "0.81"] in metrics["rows"]
    assert ["size", "32, 32, 32"] in metrics["rows"] and ["cm", "[[2, 1], [0, 3]]"] in metrics["rows"]
    assert section.items[2]["rows"][1] == ["sub-0002", "NaN"]
    for item in section.items[3:]:
        assert (run_dir / "report" / item["file"]).read_bytes().startswith(PNG_MAGIC)


def test_build_report_self_contained(run_dir: Path, tmp_path: Path) -> None:
    curves_only = tmp_path / "run_b"
    (curves_only / "finetune").mkdir(parents=True)
    _metrics_csv(curves_only / "finetune" / "metrics.csv")
    out = build_report([run_dir, curves_only], tmp_path / "out" / "report.html", title="My <report>")
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and "My &lt;report&gt;" in page
    assert "/very/secret" not in page and str(tmp_path) not in page and "sub-0007_T1w.nii.gz" in page
    assert 'href="#s1-core-demo-age"' in page and 'id="s2-run-b"' in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 2 + 1 + 1  # two section figures + curves of run_a + curves of run_b/finetune
    assert all(base64.b64decode(b).startswith(PNG_MAGIC) for b in images)
    assert "<img" in page and "src=\"http" not in page and "src=\"/" not in page
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]  # no temp files left


def test_build_report_errors(tmp_path: Path, run_dir: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        build_report([tmp_path / "missing"], tmp_path / "r.html")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="nothing to report"):
        build_report([tmp_path / "empty"], tmp_path / "r.html")
    (run_dir / "report" / "section.json").write_text("{broken")
    with pytest.raises(InputError, match="not valid JSON"):
        build_report([run_dir], tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()
    with pytest.raises(InputError, match="not a PNG"):
        Report("x").section("y").add_figure(tmp_path / "run_a" / "metrics.csv")


def test_plots_return_figures(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 8)
    p = rng.dirichlet(np.ones(3), size=24)
    figs = [
        plots.roc_curves(y, p, ["CN", "MCI", "AD"]),
        plots.roc_curves(np.zeros(4, int), np.full(4, 0.3)),  # single class: no crash
        plots.confusion_matrix_plot([[3, 1], [2, 5]], ["HC", "PD"], normalize=True),
        plots.heatmap(rng.random((3, 8)), ["age", "ad", "pd"], [f"E{i}" for i in range(8)], title="usage"),
        plots.bar_chart({"model": 3.0, "mean": 5.0}, errors={"model": (2.5, 3.6)}, reference=5.0),
        plots.pred_vs_true(np.array([]), np.array([])),
    ]
    _metrics_csv(tmp_path / "metrics.csv")
    curves = plots.training_curves(tmp_path / "metrics.csv")
    titles = {ax.get_title() for ax in curves.axes if ax.get_visible()}
    assert titles == {"loss", "mae", "lr"}  # train/val loss share one panel
    for fig in [*figs, curves]:
        fig.savefig(tmp_path / "f.png")
        assert (tmp_path / "f.png").read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(InputError):
        plots.training_curves(tmp_path / "nope.csv")


def test_cli_report(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from neuromoe.cli.main import main

    out = tmp_path / "cli.html"
    assert main(["report", str(run_dir), "--out", str(out), "--title", "CLI"]) == 0
    assert "<h1>CLI</h1>" in out.read_text()
    assert main(["report", str(tmp_path / "absent"), "--out", str(out)]) == 2
    assert "run directory not found" in capsys.readouterr().err


def test_scrub_paths_with_spaces_in_folder_names(tmp_path: Path) -> None:
    """Path scrubbing stopped at the first space: '/Users/Jane Doe/My Study/…' left 'Jane Doe/My Study/…'."""
    posix = "/Users/Jane Doe/My Study/sub-01/sub-01_T1w.nii.gz"
    assert scrub_paths(f"input {posix}.") == "input sub-01_T1w.nii.gz."
    assert scrub_paths(r"C:\Users\Jane Doe\site A\y.nii.gz") == "y.nii.gz"
    assert scrub_paths("see /home/u/x.nii.gz or train/val") == "see x.nii.gz or train/val"  # prose kept
    section = Report("test").section("privacy")
    section.add_text(f"Trained on {posix} and C:\\Users\\Jane Doe\\site A\\y.nii.gz")
    section.save(tmp_path / "run")
    page = build_report([tmp_path / "run"], tmp_path / "report.html").read_text()
    assert "sub-01_T1w.nii.gz" in page and not any(s in page for s in ("Jane Doe", "My Study", "site A"))


def test_report_refuses_to_replace_a_file_it_reads_or_a_folder(run_dir: Path, tmp_path: Path) -> None:
    from neuromoe.errors import InputError

    metrics = next(run_dir.rglob("metrics.csv"))
    before = metrics.read_bytes()
    with pytest.raises(InputError, match="overwrite the input"):
        build_report([run_dir], metrics)
    assert metrics.read_bytes() == before
    (tmp_path / "dir.html").mkdir()
    with pytest.raises(InputError, match="existing folder"):
        build_report([run_dir], tmp_path / "dir.html")


def test_training_curves_say_which_metrics_they_leave_out() -> None:
    """Past 8 panels the rest (the learning rate first) was dropped without a word."""
    import pandas as pd

    from neuromoe.eval.plots import training_curves

    frame = pd.DataFrame({"step": [1, 2, 3], "lr": [1e-3, 1e-3, 1e-4],
                          **{f"train_loss_t{i}": [1.0, 0.5, 0.2] for i in range(9)}})
    fig = training_curves(frame)
    assert "2 more not shown" in fig._suptitle.get_text() and "lr" in fig._suptitle.get_text()
