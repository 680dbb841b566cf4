"""Workload client for any OpenAI-compatible server: TTFT per request, with streaming.

Two workloads, as LMCache benchmarks them:

* ``long-doc-qa``: N long documents, each followed by a question; every
  document is asked ``passes`` times (the first pass fills the cache, later
  passes hit it);
* ``multi-round-qa``: users who share a system prompt hold conversations of
  several rounds; each round resends the whole history (the load generator,
  :mod:`lmcache_core.loadgen`, with concurrency and request rates).

Only the standard library is used (``http.client``), so the same numbers can
be taken for any engine, with or without lmcache. TTFT is the time from
sending the request to the first streamed token.
"""

from __future__ import annotations

import http.client
import json
import random
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from urllib.parse import urlparse

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


@dataclass
class RequestResult:
    label: str
    ttft_s: float
    total_s: float
    prompt_tokens: int | None
    error: str | None = None
    text: str = ""  # the completion


@dataclass
class PassResult:
    name: str
    requests: list[RequestResult] = field(default_factory=list)

    @property
    def ok(self) -> list[RequestResult]:
        return [r for r in self.requests if r.error is None]

    def median_ttft(self) -> float:
        return statistics.median(r.ttft_s for r in self.ok) if self.ok else float("nan")

    def mean_ttft(self) -> float:
        return statistics.fmean(r.ttft_s for r in self.ok) if self.ok else float("nan")

    def prompt_tokens(self) -> float:
        toks = [r.prompt_tokens for r in self.ok if r.prompt_tokens]
        return statistics.fmean(toks) if toks else float("nan")


class OpenAIClient:
    """Streams ``/v1/completions`` and times the first token."""

    def __init__(self, base_url: str, model: str | None = None, timeout_s: float = 600) -> None:
        u = urlparse(base_url if "://" in base_url else f"http://{base_url}")
        if u.scheme not in ("http", "https"):
            raise ValueError(f"base URL {base_url!r} must be http:// or https://")
        self.scheme, self.host, self.port = u.scheme, u.hostname or "localhost", u.port
        self.prefix = u.path.rstrip("/")
        if not self.prefix.endswith("/v1"):
            self.prefix += "/v1"
        self.timeout_s = timeout_s
        self.model = model or self._first_model()

    def _conn(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=self.timeout_s)

    def _first_model(self) -> str:
        conn = self._conn()
        try:
            conn.request("GET", f"{self.prefix}/models")
            resp = conn.getresponse()
            data = json.loads(resp.read())
        finally:
            conn.close()
        models = [m["id"] for m in data.get("data", [])]
        if not models:
            raise RuntimeError(f"{self.host}:{self.port} serves no models")
        return models[0]

    def complete(
        self, prompt: str | list[int], max_tokens: int = 8, label: str = ""
    ) -> RequestResult:
        body = json.dumps(
            {
                "model": self.model,
                "prompt": prompt,
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        )
        conn = self._conn()
        t0 = time.perf_counter()
        ttft = None
        usage = None
        pieces: list[str] = []
        try:
            conn.request(
                "POST", f"{self.prefix}/completions", body, {"Content-Type": "application/json"}
            )
            resp = conn.getresponse()
            if resp.status != 200:
                return RequestResult(
                    label,
                    float("nan"),
                    float("nan"),
                    None,
                    f"HTTP {resp.status}: {resp.read()[:300]!r}",
                )
            for line in _sse_lines(resp):
                if line == "[DONE]":
                    break
                event = json.loads(line)
                texts = [c.get("text") or "" for c in event.get("choices", [])]
                if ttft is None and any(texts):
                    ttft = time.perf_counter() - t0
                pieces.extend(texts)
                if event.get("usage"):
                    usage = event["usage"]
        except (OSError, http.client.HTTPException, json.JSONDecodeError) as e:
            return RequestResult(
                label, float("nan"), float("nan"), None, f"{type(e).__name__}: {e}"
            )
        finally:
            conn.close()
        total = time.perf_counter() - t0
        return RequestResult(
            label,
            ttft if ttft is not None else total,
            total,
            usage.get("prompt_tokens") if usage else None,
            text="".join(pieces),
        )


def _sse_lines(resp: http.client.HTTPResponse) -> Iterator[str]:
    for raw in resp:
        line = raw.decode().strip()
        if line.startswith("data:"):
            yield line[5:].strip()


def long_doc_qa(num_docs: int, doc_words: int, seed: int = 0) -> list[tuple[str, str]]:
    """(label, prompt) for each document: the document, then a question about it."""
    out = []
    for d in range(num_docs):
        doc = synthetic_text(seed * 1000 + d, doc_words)
        out.append((f"doc{d}", f"{doc}\n\nQuestion: what is the document about?\nAnswer:"))
    return out


def run_passes(
    client: OpenAIClient,
    passes: list[tuple[str, list[tuple[str, str]]]],
    max_tokens: int = 8,
    on_request: Callable[[RequestResult], None] | None = None,
) -> list[PassResult]:
    results = []
    for name, prompts in passes:
        pr = PassResult(name)
        for label, prompt in prompts:
            res = client.complete(prompt, max_tokens=max_tokens, label=label)
            pr.requests.append(res)
            if on_request:
                on_request(res)
        results.append(pr)
    return results


def scrape_samples(
    url: str, prefixes: tuple[str, ...] = ("lmcache:",)
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Each sample of the metrics named with ``prefixes`` on a ``/metrics`` page, by name and
    labels (sorted; a ``rank`` label left out, so ranks add up).

    Counters read under their family name (``lmcache:num_hit_tokens``, not
    ``..._total``); a histogram gives ``<name>_count`` and ``<name>_sum``.
    """
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith(prefixes):
            continue
        for sample in family.samples:
            if sample.name.endswith(("_created", "_bucket")):
                continue
            name = family.name if sample.name == f"{family.name}_total" else sample.name
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "rank"))
            out[(name, labels)] = out.get((name, labels), 0.0) + float(sample.value)
    return out


def scrape_metrics(url: str, prefix: str = "lmcache:") -> dict[str, float]:
    """Sum each ``lmcache:*`` metric over its labels (ranks, tiers) from a ``/metrics`` page.

    Works on lmcache's exporter and on vLLM's ``/metrics`` alike (see
    :func:`scrape_samples`).
    """
    out: dict[str, float] = {}
    for (name, _), v in scrape_samples(url, (prefix,)).items():
        out[name] = out.get(name, 0.0) + v
    return out
