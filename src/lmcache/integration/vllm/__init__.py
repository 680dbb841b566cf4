"""vLLM integration under upstream LMCache's import path (see :mod:`.vllm_v1_adapter`)."""
