"""The workloads, as LMCache benchmarks them: synthetic prose, long-document QA.

* ``long-doc-qa``: N long documents, each followed by a question; every
  document is asked ``passes`` times (the first pass fills the cache, later
  passes hit it); ``lmcache bench serve`` sends it through
  :class:`~lmcache_core.bench.client.OpenAIClient`;
* ``multi-round-qa``: users who share a system prompt hold conversations of
  several rounds; each round resends the whole history (the load generator,
  :mod:`lmcache_core.bench.loadgen`, with concurrency and request rates).

The text is made-up words from a fixed vocabulary, deterministic for a seed,
so every engine, with or without lmcache, is measured on the same prompts.
"""

from __future__ import annotations

import random

_SYLLABLES = [
    "ka",
    "lo",
    "mi",
    "nu",
    "re",
    "sa",
    "ti",
    "vo",
    "ze",
    "pa",
    "qu",
    "dor",
    "fen",
    "gar",
    "hil",
    "jun",
    "mar",
    "pel",
    "ros",
    "tan",
    "vek",
    "wyl",
    "xen",
    "yor",
]


def vocabulary(seed: int = 1234, size: int = 3000) -> list[str]:
    """A fixed list of made-up words (the test tokenizer is trained on the same)."""
    rnd = random.Random(seed)
    return sorted(
        {"".join(rnd.choice(_SYLLABLES) for _ in range(rnd.randint(1, 4))) for _ in range(size)}
    )


def synthetic_text(seed: int, num_words: int) -> str:
    """Deterministic prose-like text: sentences of twelve made-up words."""
    rnd = random.Random(seed)
    vocab = vocabulary()
    out = []
    for i in range(num_words):
        w = rnd.choice(vocab)
        out.append(w.capitalize() if i % 12 == 0 else w)
        if i % 12 == 11:
            out[-1] += "."
    return " ".join(out)


def long_doc_qa(num_docs: int, doc_words: int, seed: int = 0) -> list[tuple[str, str]]:
    """(label, prompt) for each document: the document, then a question about it."""
    out = []
    for d in range(num_docs):
        doc = synthetic_text(seed * 1000 + d, doc_words)
        out.append((f"doc{d}", f"{doc}\n\nQuestion: what is the document about?\nAnswer:"))
    return out
