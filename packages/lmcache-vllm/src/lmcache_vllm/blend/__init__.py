"""Non-prefix KV reuse (CacheBlend) in vLLM: model access, the blend pass, loads and stores."""
