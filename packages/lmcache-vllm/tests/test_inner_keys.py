"""The scheduler's inner keys: the right keys, hashed once per chunk lately, none when moot."""

from __future__ import annotations

from lmcache_core.keys import MultimodalItem, TokenChunker
from lmcache_vllm.inner_keys import InnerKeys
from lmcache_vllm.request_keys import RequestIdentity

PLAIN = RequestIdentity("tenant", None, ())


def test_inner_keys_are_the_continuation_keys_and_are_sent_once_lately():
    chunker = TokenChunker(64)
    tokens = list(range(1000, 1200))  # 3 full chunks and an 8-token tail
    digests = chunker.chunk(tokens, cache_salt="tenant").digests
    keys = InnerKeys(chunker, 16, remembered=4)
    got = keys.for_chunks(tokens, PLAIN, digests, 200, 0, 4)
    assert sorted(got) == [0, 1, 2]  # the 8-token tail has no whole block inside it
    for i in range(3):
        assert got[i] == chunker.continuations(tokens, i, [16, 32, 48], cache_salt="tenant")
    assert keys.for_chunks(tokens, PLAIN, digests, 200, 0, 4) == {}, "sent lately"
    # Remembering is bounded: another prompt's chunk pushes out the oldest, chunk 0.
    other = list(range(5000, 5064))
    keys.for_chunks(other, PLAIN, chunker.chunk(other, cache_salt="tenant").digests, 64, 0, 1)
    assert sorted(keys.for_chunks(tokens, PLAIN, digests, 200, 0, 2)) == [0]
    # Chunks of one block, and prompts with images, have none.
    assert InnerKeys(chunker, 64).for_chunks(tokens, PLAIN, digests, 200, 0, 3) == {}
    images = RequestIdentity(None, None, (MultimodalItem("img", 3, 4),))
    assert InnerKeys(chunker, 16).for_chunks(tokens, images, digests, 200, 0, 3) == {}
    assert InnerKeys(chunker, 16, remembered=0).for_chunks(tokens, PLAIN, digests, 200, 0, 3) == {}
