"""Shared fixtures of the reliability suite: the generated corpus, the harness, one tiny trained model.

``corpus.py``, ``harness.py`` and ``crash_child.py`` are plain modules next to the tests; they are
registered as ``reliability_<name>`` so the tests (run with ``--import-mode=importlib``) can import them.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def _register(name: str, file: str) -> None:
    if name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(name, HERE / file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


_register("reliability_corpus", "corpus.py")
_register("reliability_harness", "harness.py")
_register("reliability_crash_child", "crash_child.py")

from reliability_corpus import build  # noqa: E402
from reliability_harness import Env  # noqa: E402


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every corpus case, by kind."""
    return {c.kind: c for c in build(tmp_path_factory.mktemp("corpus"))}


@pytest.fixture(scope="session")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    """Good cohort, shared preprocessing cache; tiny models are trained on first use, once per session."""
    return Env.create(tmp_path_factory.mktemp("harness"))
