"""Fixtures for the vLLM adapter's tests: locally made test models."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
MODELS = ROOT / ".cache" / "test-models"


def _ensure(name: str, **kw) -> Path:
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from make_test_model import ensure_model
    finally:
        sys.path.pop(0)
    return ensure_model(MODELS / name, **kw)


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """A random 4-layer Llama (init std 0.02): near-tied logits."""
    return _ensure("tiny", preset="tiny")


@pytest.fixture(scope="session")
def peaked_model() -> Path:
    """The same shape with init std 0.3: outputs follow the prompt, clear margins."""
    return _ensure("tiny-peaked", preset="tiny", init_std=0.3)


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None
