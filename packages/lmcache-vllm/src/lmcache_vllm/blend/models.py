"""The model classes lmcache's vLLM plugin registers, so a blend pass can reach the model.

A blend pass runs vLLM's own modules (embedding, norms, projections, rotary
embedding, MLP) over the tokens it recomputes, so the connector needs the
model object. vLLM gives a KV connector its KV tensors but not the model, and
lmcache does not patch vLLM. Instead lmcache's ``vllm.general_plugins``
entry point (:func:`lmcache_vllm.plugin.register`) registers, through vLLM's
public ``ModelRegistry``, a subclass of each supported architecture whose only
addition is to note the instance in :data:`TRACKED` (weakly) once built. Its
behaviour, weights and kernels are vLLM's own.

Supported: the dense RoPE decoder families Llama, Mistral, Qwen2 and Qwen3.
The architecture names below are the ones a checkpoint's ``config.json``
names; ``VLLM_PLUGINS`` can exclude the plugin, and blending then refuses to
start with a message that says so.
"""

from __future__ import annotations

import weakref
from typing import Any

#: Architecture name -> (vLLM module, class) of the families a blend pass supports.
SUPPORTED: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("vllm.model_executor.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("vllm.model_executor.models.mistral", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("vllm.model_executor.models.qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("vllm.model_executor.models.qwen3", "Qwen3ForCausalLM"),
}

#: Models built in this process by the registered classes.
TRACKED: weakref.WeakSet[Any] = weakref.WeakSet()


def _tracked(base: type) -> type:
    # vLLM reads this signature to decide how to build the model: keep vllm_config in it.
    def __init__(self: Any, *, vllm_config: Any, prefix: str = "", **kwargs: Any) -> None:
        base.__init__(self, vllm_config=vllm_config, prefix=prefix, **kwargs)
        TRACKED.add(self)

    # Same name and qualname: anything in vLLM that looks at them sees its own class.
    return type(base.__name__, (base,), {"__init__": __init__, "__module__": __name__})


def __getattr__(name: str) -> Any:
    """``lmcache_vllm.blend.models:<Arch>``, the lazy form ``ModelRegistry`` imports."""
    if name in SUPPORTED:
        import importlib

        module, cls = SUPPORTED[name]
        tracked = _tracked(getattr(importlib.import_module(module), cls))
        globals()[name] = tracked
        return tracked
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def find_model(attention_layers: dict[str, Any]) -> Any | None:
    """The tracked model whose attention modules are ``attention_layers`` (name -> module)."""
    if not attention_layers:
        return None
    name, module = next(iter(attention_layers.items()))
    for model in list(TRACKED):
        try:
            if model.get_submodule(name) is module:
                return model
        except AttributeError:
            continue
    return None
