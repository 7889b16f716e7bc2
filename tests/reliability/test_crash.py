"""Crash safety (issue 7, item 3): SIGKILL a real training at random steps, resume, compare bit for bit.

After every kill, every file under a final name in the run directory must be complete and parse
(checkpoint, metrics.csv, config.yaml, model files); only ``.name.*.tmp*`` files of
:func:`neuromoe.io.atomic.atomic_path` may be half-written. TensorBoard event files are append-only
logs whose readers skip a truncated last record, so they are not checked. The resumed run must end
with exactly the weights and metrics of an uninterrupted run.

Default run: 2 kills in forked children (no interpreter start-up). ``-m slow``: 5 kills in forked
children and 5 in fresh ``python`` processes.
"""

from __future__ import annotations

import csv
import json
import os
import random
import select
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest
import reliability_crash_child as child
import torch
import torch._dynamo  # imported once here (AdamW needs it), not in every forked child
import torch.utils.tensorboard
import yaml
from safetensors.torch import load_file

from neuromoe.engine import load_checkpoint

CHILD_FILE = Path(__file__).with_name("crash_child.py")
TIMEOUT = 240.0


class Run:
    """One training process (forked or a fresh interpreter) whose ``step N`` lines can be followed."""

    def __init__(self, run_dir: Path, resume: bool, fresh: bool):
        self.pid: int
        if fresh:
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
            args = [sys.executable, str(CHILD_FILE), str(run_dir), *(["--resume"] if resume else [])]
            self.proc: subprocess.Popen[str] | None = subprocess.Popen(
                args, stdout=subprocess.PIPE, text=True, env=env
            )
            self.pid, self.fd = self.proc.pid, self.proc.stdout.fileno()
            return
        self.proc = None
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: train, then leave without running pytest's teardown
            os.close(r)
            code = 0
            try:
                with os.fdopen(w, "w") as stream:
                    child.train(run_dir, resume, stream)
            except BaseException:
                traceback.print_exc()
                code = 1
            os._exit(code)
        os.close(w)
        self.pid, self.fd = pid, r

    def lines(self) -> Iterator[str]:
        buf, deadline = b"", time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.fd], [], [], 1.0)
            if not ready:
                continue
            chunk = os.read(self.fd, 4096)
            if not chunk:
                return
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                yield line.decode()
        raise TimeoutError("training child did not finish")

    def wait(self) -> int:
        if self.proc is not None:
            return self.proc.wait(TIMEOUT)
        return os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdout.close()
        else:
            os.close(self.fd)


def run_to_end(run_dir: Path, resume: bool, fresh: bool) -> None:
    run = Run(run_dir, resume, fresh)
    try:
        assert "done" in list(run.lines())
        assert run.wait() == 0
    finally:
        run.close()


def run_and_kill(run_dir: Path, resume: bool, fresh: bool, step: int, rng: random.Random) -> None:
    """Follow the run until it announces ``step`` (or a later one: a resumed run may start past it when the
    previous kill landed after a later checkpoint), wait 0–30 ms (inside a checkpoint write, often), SIGKILL."""
    run = Run(run_dir, resume, fresh)
    try:
        for line in run.lines():
            if line.startswith("step ") and int(line.split()[1]) >= step:
                time.sleep(rng.uniform(0.0, 0.03))
                os.kill(run.pid, signal.SIGKILL)
                break
        else:  # an earlier kill landed after the run's last step: nothing left to interrupt
            assert run.wait() == 0
            return
        # 0: on a fast machine the last steps and the final save can finish inside the 0–30 ms wait
        assert run.wait() in (-signal.SIGKILL, 0)
    finally:
        run.close()


def check_complete(run_dir: Path) -> int:
    """Every file under a final name parses completely; returns the number of atomic temp files left."""
    temps = 0
    for path in sorted(p for p in run_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(run_dir)
        if rel.parts[0] == "tb":
            continue
        if path.name.startswith(".") and ".tmp" in path.name:
            temps += 1
            continue
        if rel == Path("checkpoints/last.safetensors"):
            assert load_checkpoint(path)["position"]["global_step"] >= 0
        elif path.suffix == ".safetensors":
            assert load_file(str(path))
        elif path.suffix == ".csv":
            text = path.read_text()
            rows = list(csv.reader(text.splitlines()))
            assert text.endswith("\n") and all(len(r) == len(rows[0]) for r in rows), f"{rel} is partial"
        elif path.suffix == ".yaml":
            assert isinstance(yaml.safe_load(path.read_text()), dict), rel
        elif path.suffix == ".json":
            json.loads(path.read_text())
        else:
            pytest.fail(f"unexpected file {rel}")
    return temps


def killed_and_resumed(root: Path, kills: int, fresh: bool, seed: int) -> dict[str, object]:
    rng = random.Random(seed)
    steps = sorted(rng.sample(range(1, child.total_steps() - 1), kills))
    ref, run_dir = root / "uninterrupted", root / "killed"
    run_to_end(ref, False, fresh)
    temps = 0
    for i, step in enumerate(steps):
        run_and_kill(run_dir, i > 0, fresh, step, rng)
        temps += check_complete(run_dir)
    run_to_end(run_dir, True, fresh)
    check_complete(run_dir)
    want, got = (
        load_file(str(ref / "model" / "model.safetensors")),
        load_file(str(run_dir / "model" / "model.safetensors")),
    )
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), f"{key} differs after {kills} kills at steps {steps}"
    assert (ref / "metrics.csv").read_text() == (run_dir / "metrics.csv").read_text()
    return {"kill_steps": steps, "temp_files_left": temps}


def test_sigkill_resume_bit_exact(tmp_path: Path) -> None:
    killed_and_resumed(tmp_path, kills=2, fresh=False, seed=1)


@pytest.mark.slow
def test_five_random_kills_forked(tmp_path: Path) -> None:
    killed_and_resumed(tmp_path, kills=5, fresh=False, seed=int(time.time()))


@pytest.mark.slow
def test_five_random_kills_fresh_processes(tmp_path: Path) -> None:
    killed_and_resumed(tmp_path, kills=5, fresh=True, seed=2)
