"""Shared test fixtures."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _private_default_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Default caches (``$NEUROMOE_CACHE``, else ``~/.cache/neuromoe``) go to a folder of the test session: the
    suite filled the user's home cache (7,000 entries here), and a stale entry there could hide a bug."""
    patch = pytest.MonkeyPatch()
    patch.setenv("NEUROMOE_CACHE", str(tmp_path_factory.mktemp("default_cache")))
    yield
    patch.undo()


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Run a module's torch work on one thread: on a loaded 2-core machine, two OpenMP threads spin
    instead of working (a tiny MoME forward took 10 s with two threads, 0.08 s with one)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def cpu_bf16(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], None]]:
    """Set ``NEUROMOE_CPU_BF16`` ("1" force, "0" forbid, "" detect) for one test, so bf16 paths are tested
    the same on CPUs with and without native bf16."""

    def set_(value: str) -> None:
        monkeypatch.setenv("NEUROMOE_CPU_BF16", value)

    yield set_
