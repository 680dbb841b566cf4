"""Hostile request controls in a real in-process vLLM engine, one scenario per subprocess.

``python hostile_scenarios.py SCENARIO MODEL_DIR`` prints one line
``RESULT {json}`` (the runner of ``engine_scenarios.py``, whose helpers it uses).
"""

from __future__ import annotations

import json
import os
import sys

from engine_scenarios import Harness, make_llm, tokens

#: Controls no key can hash: lone surrogates (what JSON's "\ud800" escape gives a server).
BAD = {
    "salt": ("tenant-\ud83d", None),
    "tag_value": (None, {"lmcache.tag.user": "\ud800"}),
    "tag_name": (None, {"lmcache.tag.\udfff": "alice"}),
    "salt_and_tag": ("tenant-\udfff", {"lmcache.tag.user": "alice"}),
}


def _gen(h: Harness, prompt: list[int], salt: str | None, params: dict | None) -> list[int]:
    from vllm import SamplingParams

    extra = {"kv_transfer_params": params} if params else None
    sp = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, extra_args=extra)
    p: dict = {"prompt_token_ids": prompt}
    if salt is not None:
        p["cache_salt"] = salt
    out = h.llm.generate(p, sp, use_tqdm=False)
    return list(out[0].outputs[0].token_ids)


def scenario_surrogate_controls(model: str) -> dict:
    """Each bad request is served (without the cache); ordinary ones after it still run and
    hit. Before the fix, the first bad one raised out of vLLM's scheduler, and every later
    request failed in vLLM's KV cache manager."""
    url = os.environ.get("LMC_TEST_SERVER_URL")  # lmcache in server mode: the host's server
    kw = {"kv_connector_extra_config": {"server_url": url}} if url else {}
    h = Harness(make_llm(model, **kw))
    p = tokens(41, 700)
    r: dict = {"cold": h.gen(p), "bad": {}}
    for name, (salt, params) in BAD.items():
        h.llm.reset_prefix_cache()  # vLLM's own cache: lmcache is asked for every token
        before = h.retrieved()
        try:
            out = _gen(h, p, salt, params)
        except Exception as e:  # what vLLM's caller saw
            r["bad"][name] = {"error": f"{type(e).__name__}: {e}"[:500]}
            continue
        r["bad"][name] = {"same_output": out == r["cold"], "loaded": h.retrieved() - before}
    ok: dict = {}
    try:
        h.llm.reset_prefix_cache()
        before = h.retrieved()
        ok["again"] = h.gen(p)  # the prompt stored before: a hit from lmcache
        ok["loaded_again"] = h.retrieved() - before
        q = tokens(42, 700)
        ok["q_cold"] = h.gen(q)  # a new prompt: stored...
        h.llm.reset_prefix_cache()
        before = h.retrieved()
        ok["q_hit"] = h.gen(q)  # ...and hit
        ok["loaded_q"] = h.retrieved() - before
        tagged = {"lmcache.tag.user": "alice"}
        ok["tagged_cold"] = _gen(h, q, None, tagged)  # ordinary tags still key
        h.llm.reset_prefix_cache()
        before = h.retrieved()
        ok["tagged_hit"] = _gen(h, q, None, tagged)
        ok["loaded_tagged"] = h.retrieved() - before
    except Exception as e:
        ok["error"] = f"{type(e).__name__}: {e}"[:500]
    r["ordinary"] = ok
    return r


if __name__ == "__main__":
    name, model = sys.argv[1], sys.argv[2]
    result = globals()[f"scenario_{name}"](model)
    print("RESULT " + json.dumps(result), flush=True)
    os._exit(0)  # skip vLLM's slow teardown
