"""The CLI dispatcher: help, unknown commands, family selection, error → one line + exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from neuromoe.cli.main import FAMILY_VERBS, main


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for verb in [*FAMILY_VERBS, "info", "synth", "preprocess", "report", "demo"]:
        assert verb in out


def test_family_verb_without_family_fails_with_choices(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train"])
    assert exc.value.code == 2
    assert "--family is required" in capsys.readouterr().err


def test_unknown_family_is_rejected(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["segment", "--family", "denseformer"])
    assert exc.value.code == 2


def test_console_script_runs_as_module():
    proc = subprocess.run(
        [sys.executable, "-m", "neuromoe.cli.main", "--version"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and proc.stdout.startswith("neuromoe ")


@pytest.mark.parametrize(
    ("argv", "flag", "message"),
    [
        (["segment", "--model", "m", "--t1", "a.nii.gz", "--output", "o.nii.gz"], ["--config", "nope"], "unknown preset"),
        (["predict", "--family", "brainmoe", "--model", "m", "--input", "i", "--output", "o.csv"], ["--set", "a.b=1"],
         "unknown config key"),
        (["predict", "--family", "denseformer", "--model", "m", "--input", "i", "--output", "o.csv"],
         ["--set", "train.lr=fast"], "train.lr"),
        (["embed", "--model", "m", "--data", "d", "--out", "o.csv"], ["--config", "no_such_preset"], "unknown preset"),
        # the free-form preprocessing section: a typo was exit 0 (predict replays the model's own preprocessing)
        (["predict", "--family", "denseformer", "--model", "m", "--input", "i", "--output", "o.csv"],
         ["--set", "preprocessing.spacng=4"], "spacng"),
        (["segment", "--model", "m", "--t1", "a.nii.gz", "--output", "o.nii.gz"],
         ["--set", "preprocessing.spacing=banana"], "banana"),
    ],
)
def test_inference_verbs_check_config_options(argv, flag, message, capsys):
    """predict/segment/embed run the model's stored config, but a typo in --config/--set is still exit 2 (it was
    accepted with exit 0, unlike on train)."""
    assert main([*argv, *flag]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "argv",
    [
        ["predict", "--family", "brainmoe", "--model", "m", "--input", "i", "--output", "o.csv"],
        ["embed", "--model", "m", "--data", "d", "--out", "o.csv"],
    ],
)
def test_brainmoe_inference_honours_device(argv, capsys, monkeypatch):
    """--device cuda reaches BrainMoE predict/embed (it used to be dropped and the scans ran on the CPU)."""
    from neuromoe.pipelines import brainmoe

    seen = {}

    def spy(*args, device, **kw):
        seen["device"] = device
        return ([], []) if argv[0] == "predict" else (Path("o.csv"), [])

    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr(brainmoe, argv[0], spy)
    assert main([*argv, "--device", "cuda"]) == 0 and seen == {"device": "cuda"}


@pytest.mark.parametrize("verb", ["evaluate", "predict"])
def test_verbs_that_do_not_train_run_on_rank_0_alone_under_torchrun(verb, tmp_path, capsys, monkeypatch):
    """No process group opens for a command that does not train, so under torchrun every rank ran the whole
    DenseFormer evaluate/predict on the same GPU and wrote the same files; now rank 0 alone runs it, and says so."""
    from neuromoe.pipelines import denseformer

    calls = []
    monkeypatch.setattr(denseformer, verb, lambda *a, **k: calls.append(verb) or (
        (tmp_path / "metrics.json") if verb == "evaluate" else ([], [])))
    io = ["--data", "d", "--out", str(tmp_path)] if verb == "evaluate" else ["--input", "i", "--output", "o.csv"]
    argv = [verb, "--family", "denseformer", "--model", "m", *io, "--device", "cpu"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(argv) == 0 and calls == []
    monkeypatch.setenv("RANK", "0")
    with pytest.warns(UserWarning, match="rank 0 does it alone"):
        assert main(argv) == 0
    assert calls == [verb]


def test_brainmoe_evaluate_trains_so_every_rank_runs_it(tmp_path, monkeypatch):
    """BrainMoE's evaluate fits the router and adapter per fold: its ranks share the work, none leaves early."""
    from neuromoe.pipelines import brainmoe

    calls = []
    monkeypatch.setattr(brainmoe, "evaluate", lambda *a, **k: calls.append(1) or tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    argv = ["evaluate", "--family", "brainmoe", "--experts", "e", "--data", "d", "--out", str(tmp_path)]
    assert main([*argv, "--device", "cpu"]) == 0 and calls == [1]


@pytest.mark.parametrize("verb", ["evaluate", "train"])
def test_an_output_folder_that_is_a_file_is_refused_before_any_work(verb, tmp_path, capsys):
    """--out naming a file failed only after the whole run, with "File exists" (exit 1)."""
    (tmp_path / "plain").write_text("a file")
    io = ["--model", "m"] if verb == "evaluate" else ["--config", "tiny"]
    for out, says in ((tmp_path / "plain", "is a file, not a folder"), (tmp_path / "plain" / "run", "which is a file")):
        assert main([verb, "--family", "mome", *io, "--data", str(tmp_path), "--out", str(out), "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1


def test_cuda_without_a_gpu_is_refused_before_any_output(tmp_path, capsys, monkeypatch):
    """``train --device cuda`` on a CPU machine used to write OUT/config.yaml before the device error."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    out = tmp_path / "run"
    argv = ["train", "--family", "mome", "--config", "tiny", "--data", str(tmp_path), "--out", str(out)]
    assert main([*argv, "--device", "cuda"]) == 2
    assert "no CUDA GPU is available" in capsys.readouterr().err and not out.exists()


def test_warnings_read_as_one_neuromoe_line() -> None:
    """A UserWarning printed its message and then the source line that raised it (`return extract_timeseries(...)`)."""
    import subprocess
    import sys

    from neuromoe.cli.main import _one_line_warning

    assert _one_line_warning("3 ROIs outside", UserWarning, "x.py", 1) == "neuromoe: warning: 3 ROIs outside\n"
    assert _one_line_warning("old", FutureWarning, "x.py", 1) == "neuromoe: FutureWarning: old\n"
    code = ("import warnings, neuromoe.cli.main as m, neuromoe.cli.info as i; "
            "i.describe = lambda p: warnings.warn('3 ROIs outside') or {'path': p, 'verdict': 'FAIL', 'reasons': ['x']}; "
            "m.main(['info', 'a.nii']); warnings.formatwarning is m._one_line_warning and print('leaked')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stderr == "neuromoe: warning: 3 ROIs outside\n" and "leaked" not in proc.stdout, proc


def test_running_out_of_memory_is_one_line_with_what_to_change(capsys, monkeypatch):
    """A paper preset on a small machine ended in a raw RuntimeError traceback; other RuntimeErrors stay raised."""
    from neuromoe.pipelines import denseformer

    def oom(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 98304000000 bytes")

    monkeypatch.setattr(denseformer, "train", oom)
    assert main(["train", "--family", "denseformer", "--data", "d", "--out", "o"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("neuromoe: error: out of memory") and "smaller preset" in err and err.count("\n") == 1

    def bug(*args, **kwargs):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(denseformer, "train", bug)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        main(["train", "--family", "denseformer", "--data", "d", "--out", "o"])
