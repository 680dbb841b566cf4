"""One streamed completion against any OpenAI-compatible server, timed; failures said plainly.

Every benchmark and load tool sends its requests through here: the blocking
:class:`OpenAIClient` (standard library only, ``http.client``) and the async
:func:`stream_completion` (``httpx``, for many requests in flight). TTFT is the
time from sending the request to the first streamed token.

A request that fails carries the reason in the server's own words (its JSON
``error.message``, not a truncated body), and a 400 for a prompt too long for
the server says how long the prompt is in tokens against the server's
``--max-model-len`` (asked of the server: ``/tokenize``, ``/v1/models``). A
benchmark whose requests failed raises :class:`BenchmarkFailed`
(:func:`require_ok`), so it exits non-zero with that reason instead of
printing figures made of NaN.
"""

from __future__ import annotations

import http.client
import json
import re
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlparse


class BenchmarkFailed(RuntimeError):
    """Requests of a benchmark failed; the message says how many, which, and why."""


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


# --- failures, in the server's words -------------------------------------------------------

#: vLLM's (and OpenAI's) messages for a prompt longer than the model takes:
#: (pattern, group of the prompt's tokens, group of the limit).
_LENGTH_MESSAGES = (
    # "This model's maximum context length is 4096 tokens. However, your prompt
    # contains [at least] 5012 input tokens ..." (OpenAI: "you requested 5012 tokens")
    (re.compile(r"maximum context length is (\d+) tokens.*?(?:contains|requested) "
                r"(?:at least )?(\d+) (?:input )?tokens", re.S), 2, 1),
    # "... maximum context length is 4096 tokens. However, your prompt contains 20000
    # characters ...": the limit only
    (re.compile(r"maximum context length is (\d+) tokens", re.S), None, 1),
    # "The decoder prompt (length 5012) is longer than the maximum model length of 4096."
    (re.compile(r"prompt \(length (\d+)\).*?maximum model length of (\d+)", re.S), 1, 2),
)  # fmt: skip
_LENGTH_WORDS = re.compile(r"context length|model length|max_model_len|too long", re.I)


def server_message(body: bytes | str) -> str:
    """The server's own error text in a response body: ``{"error": {"message": ...}}``
    (vLLM, OpenAI), ``{"message": ...}`` or ``{"detail": ...}``; else the body itself."""
    text = body.decode(errors="replace") if isinstance(body, bytes) else body
    try:
        data = json.loads(text)
    except ValueError:
        return text.strip()[:1000] or "(empty body)"
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            for key in ("message", "detail"):
                if err.get(key):
                    return str(err[key])
        elif isinstance(err, str):
            return err
    return text.strip()[:1000]


def is_length_error(message: str) -> bool:
    """Whether a server's message says the prompt is longer than the model takes."""
    return bool(_LENGTH_WORDS.search(message))


def lengths_in_message(message: str) -> tuple[int | None, int | None]:
    """(prompt tokens, max-model-len) as a server's length error states them, or Nones."""
    for pattern, tokens, limit in _LENGTH_MESSAGES:
        m = pattern.search(message)
        if m:
            return (int(m.group(tokens)) if tokens else None), int(m.group(limit))
    return None, None


def http_failure(
    status: int,
    body: bytes | str,
    *,
    prompt_tokens: int | None = None,
    max_model_len: int | None = None,
) -> str:
    """What a failed response says, e.g. ``HTTP 400: <the server's message> (the prompt is
    5012 tokens, longer than the server's max-model-len of 4096)``.

    ``prompt_tokens`` and ``max_model_len`` (when the caller could ask the server)
    are added to a length error; otherwise the message's own figures are used.
    """
    message = server_message(body)
    out = f"HTTP {status}: {message}"
    if not is_length_error(message):
        return out
    said_tokens, said_limit = lengths_in_message(message)
    tokens = prompt_tokens if prompt_tokens is not None else said_tokens
    limit = max_model_len if max_model_len is not None else said_limit
    if tokens is not None and limit is not None:
        verdict = "longer than" if tokens >= limit else "within"
        out += (
            f" (the prompt is {tokens} tokens, {verdict} the server's max-model-len of {limit}: "
            "a shorter prompt, another tokenizer or a larger --max-model-len)"
        )
    elif limit is not None:
        out += f" (the server's max-model-len is {limit})"
    return out


class _Failed(Protocol):
    error: str | None


def _label(r: Any) -> str:
    if getattr(r, "label", ""):
        return str(r.label)
    if hasattr(r, "user"):
        return f"user {r.user} round {r.round + 1}"
    return "a request"


def failure_summary(results: Sequence[_Failed], what: str = "requests") -> str | None:
    """None if every result succeeded; else how many failed, which, and each distinct reason."""
    failed = [r for r in results if r.error]
    if not failed:
        return None
    reasons: dict[str, list[str]] = {}
    for r in failed:
        reasons.setdefault(str(r.error), []).append(_label(r))
    lines = [f"{len(failed)} of {len(results)} {what} failed:"]
    for reason, labels in list(reasons.items())[:3]:
        shown = ", ".join(labels[:4]) + (f" and {len(labels) - 4} more" if len(labels) > 4 else "")
        lines.append(f"  {shown}: {reason}")
    if len(reasons) > 3:
        lines.append(f"  and {len(reasons) - 3} other reasons")
    return "\n".join(lines)


def require_ok(results: Sequence[_Failed], what: str = "requests") -> None:
    """Raise :class:`BenchmarkFailed` (the reasons, in the server's words) if any failed."""
    summary = failure_summary(results, what)
    if summary is not None:
        raise BenchmarkFailed(summary)


def _tokenize_body(model: str, prompt: str | list[int]) -> dict[str, Any]:
    return {"model": model, "prompt": prompt, "add_special_tokens": True}


def _max_model_len(models: Any) -> int | None:
    try:
        value = models["data"][0].get("max_model_len")
    except (KeyError, IndexError, TypeError, AttributeError):
        return None
    return int(value) if value else None


# --- the blocking client -------------------------------------------------------------------


class OpenAIClient:
    """Streams ``/v1/completions`` and times the first token."""

    def __init__(self, base_url: str, model: str | None = None, timeout_s: float = 600) -> None:
        u = urlparse(base_url if "://" in base_url else f"http://{base_url}")
        if u.scheme not in ("http", "https"):
            raise ValueError(f"base URL {base_url!r} must be http:// or https://")
        self.base_url = base_url
        self.scheme, self.host, self.port = u.scheme, u.hostname or "localhost", u.port
        self.root = u.path.rstrip("/").removesuffix("/v1")
        self.prefix = f"{self.root}/v1"
        self.timeout_s = timeout_s
        self.model = model or self._first_model()

    def _conn(self, timeout_s: float | None = None) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=timeout_s or self.timeout_s)

    def _json(self, method: str, path: str, body: Any = None, timeout_s: float = 30) -> Any:
        """``path``'s JSON; raises (OSError, ValueError, HTTPException) if it has none."""
        conn = self._conn(timeout_s)
        try:
            payload = None if body is None else json.dumps(body)
            conn.request(method, path, payload, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
            if resp.status != 200:
                raise ValueError(http_failure(resp.status, data))
            return json.loads(data)
        finally:
            conn.close()

    def _first_model(self) -> str:
        try:
            data = self._json("GET", f"{self.prefix}/models", timeout_s=self.timeout_s)
        except (OSError, ValueError, http.client.HTTPException) as e:
            raise BenchmarkFailed(f"{self.base_url}: cannot list its models: {e}") from None
        models = [m["id"] for m in data.get("data", [])]
        if not models:
            raise BenchmarkFailed(f"{self.base_url} serves no models")
        return models[0]

    def max_model_len(self) -> int | None:
        """The server's ``--max-model-len`` (vLLM lists it with the model), or None."""
        try:
            return _max_model_len(self._json("GET", f"{self.prefix}/models"))
        except (OSError, ValueError, http.client.HTTPException):
            return None

    def prompt_tokens(self, prompt: str | list[int]) -> int | None:
        """How many tokens the server makes of ``prompt`` (vLLM's ``/tokenize``), or None."""
        if isinstance(prompt, list):
            return len(prompt)
        try:
            body = _tokenize_body(self.model, prompt)
            return int(self._json("POST", f"{self.root}/tokenize", body)["count"])
        except (OSError, ValueError, KeyError, TypeError, http.client.HTTPException):
            return None

    def failure(self, status: int, body: bytes, prompt: str | list[int]) -> str:
        """:func:`http_failure`, with the prompt's length and the server's limit asked of
        the server when it refused the prompt for its length."""
        if status == 400 and is_length_error(server_message(body)):
            return http_failure(
                status, body, prompt_tokens=self.prompt_tokens(prompt),
                max_model_len=self.max_model_len(),
            )  # fmt: skip
        return http_failure(status, body)

    def complete(
        self,
        prompt: str | list[int],
        max_tokens: int = 8,
        label: str = "",
        *,
        check: bool = False,
    ) -> RequestResult:
        """One greedy streamed completion. A failure is in ``error``; with ``check`` it
        raises :class:`BenchmarkFailed` instead."""
        result = self._complete(prompt, max_tokens, label)
        if check and result.error:
            which = f"request {label}" if label else "a request"
            raise BenchmarkFailed(f"{which} to {self.base_url} failed: {result.error}")
        return result

    def _complete(self, prompt: str | list[int], max_tokens: int, label: str) -> RequestResult:
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

        def failed(error: str) -> RequestResult:
            return RequestResult(label, float("nan"), float("nan"), None, error)

        try:
            conn.request(
                "POST", f"{self.prefix}/completions", body, {"Content-Type": "application/json"}
            )
            resp = conn.getresponse()
            if resp.status != 200:
                data = resp.read()
                conn.close()
                return failed(self.failure(resp.status, data, prompt))
            for line in _sse_lines(resp):
                if line == "[DONE]":
                    break
                event = json.loads(line)
                if event.get("error"):  # an error after the stream started
                    return failed(f"error in the stream: {server_message(line)}")
                texts = [c.get("text") or "" for c in event.get("choices", [])]
                if ttft is None and any(texts):
                    ttft = time.perf_counter() - t0
                pieces.extend(texts)
                if event.get("usage"):
                    usage = event["usage"]
        except (OSError, http.client.HTTPException, json.JSONDecodeError) as e:
            return failed(f"{type(e).__name__}: {e}")
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


# --- the async client ----------------------------------------------------------------------


class Timed(Protocol):
    """What :func:`stream_completion` fills in (a load generator's sample)."""

    ttft_s: float
    e2e_s: float
    itl_s: list[float]
    prompt_tokens: int | None
    output_tokens: int
    error: str | None


async def async_failure(client: Any, api: str, status: int, body: bytes, request: dict) -> str:
    """:meth:`OpenAIClient.failure` for an ``httpx.AsyncClient``."""
    if status != 400 or not is_length_error(server_message(body)):
        return http_failure(status, body)
    root = api.removesuffix("/v1")
    tokens = max_len = None
    prompt = request.get("prompt", "")
    try:
        if isinstance(prompt, list):
            tokens = len(prompt)
        else:
            resp = await client.post(
                f"{root}/tokenize", json=_tokenize_body(request.get("model", ""), prompt)
            )
            tokens = int(resp.json()["count"]) if resp.status_code == 200 else None
        resp = await client.get(f"{api}/models")
        max_len = _max_model_len(resp.json()) if resp.status_code == 200 else None
    except Exception:
        pass
    return http_failure(status, body, prompt_tokens=tokens, max_model_len=max_len)


async def stream_completion(client: Any, api: str, body: dict[str, Any], into: Timed) -> str:
    """POST one streamed completion with ``client`` (an ``httpx.AsyncClient``) to
    ``{api}/completions``; fills ``into``'s timings (or its ``error``); returns the text."""
    t0 = time.perf_counter()
    last = None
    parts: list[str] = []
    async with client.stream("POST", f"{api}/completions", json=body) as resp:
        if resp.status_code != 200:
            into.error = await async_failure(
                client, api, resp.status_code, await resp.aread(), body
            )
            return ""
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            if event.get("error"):
                into.error = f"error in the stream: {server_message(data)}"
                return ""
            text = "".join(c.get("text") or "" for c in event.get("choices", []))
            if text:
                now = time.perf_counter()
                if last is None:
                    into.ttft_s = now - t0
                else:
                    into.itl_s.append(now - last)
                last = now
                parts.append(text)
            usage = event.get("usage")
            if usage:
                into.prompt_tokens = usage.get("prompt_tokens")
                into.output_tokens = usage.get("completion_tokens") or 0
    into.e2e_s = time.perf_counter() - t0
    if last is None:
        into.ttft_s = into.e2e_s
    return "".join(parts)
