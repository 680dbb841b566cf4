"""A/B measurements that survive a drifting machine: two servers, the same prompts, paired.

These machines drift in speed by up to 2x from minute to minute, so a
baseline measured minutes apart from what it is compared with says little,
and a server's first requests pay one-time costs (page faults, thread pools,
first kernels) that its later ones do not. :func:`run_paired` therefore
warms every server up with the same requests, then sends each prompt to every
server back to back, alternating which goes first, so both see the same
machine within seconds (after a pause that lets the last one go idle); the
figure is the median of the per-prompt ratios, with its spread
(:func:`spread`). Any failed request stops the run with the server's reason
(:class:`~lmcache_core.bench.client.BenchmarkFailed`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from lmcache_core.bench.client import OpenAIClient, RequestResult

UNCACHED = "uncached"


def cached_pass(n: int) -> str:
    """The name of the ``n``-th pass (2, 3, ...): a repeat that the cache serves."""
    return f"pass {n} (cached)"


@dataclass(frozen=True)
class Spread:
    """The median of some values with their quartiles and range."""

    n: int
    median: float
    q1: float
    q3: float
    lo: float
    hi: float

    def __str__(self) -> str:
        return (
            f"{self.median:.3f} (IQR {self.q1:.3f}-{self.q3:.3f}, "
            f"range {self.lo:.3f}-{self.hi:.3f}, n={self.n})"
        )

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def spread(values: Sequence[float]) -> Spread:
    """:class:`Spread` of ``values`` (quartiles by linear interpolation); NaNs if empty."""
    v = sorted(values)
    if not v:
        nan = float("nan")
        return Spread(0, nan, nan, nan, nan, nan)
    if len(v) == 1:
        return Spread(1, v[0], v[0], v[0], v[0], v[0])
    q1, q2, q3 = statistics.quantiles(v, n=4, method="inclusive")
    return Spread(len(v), q2, q1, q3, v[0], v[-1])


@dataclass
class PairedRun:
    """Every measured request, by (server, pass), in prompt order."""

    labels: list[str]
    results: dict[tuple[str, str], list[RequestResult]] = field(default_factory=dict)

    def ttfts(self, server: str, pass_name: str = UNCACHED) -> list[float]:
        return [r.ttft_s for r in self.results[(server, pass_name)]]

    def ratios(self, num: tuple[str, str], den: tuple[str, str]) -> list[float]:
        """Per prompt, the TTFT of ``num`` (server, pass) over that of ``den``."""
        return [a / b for a, b in zip(self.ttfts(*num), self.ttfts(*den))]

    def texts(self, server: str, pass_name: str) -> list[str]:
        return [r.text for r in self.results[(server, pass_name)]]


def run_paired(
    clients: dict[str, OpenAIClient],
    prompts: Sequence[tuple[str, str]],
    *,
    warmup: Sequence[str] = (),
    passes: int = 1,
    repeat_on: Sequence[str] = (),
    max_tokens: int = 8,
    settle_s: float = 0.0,
    on_request: Callable[[str, str, str], None] | None = None,
) -> PairedRun:
    """Send every ``(label, prompt)`` to every server, back to back, alternating the order.

    First each ``warmup`` prompt goes ``passes`` times to every server (the same
    number of requests for each, not measured). Then, per prompt, its uncached
    request to each server (the order flips from one prompt to the next), and,
    on the servers in ``repeat_on``, ``passes - 1`` repeats (passes 2, 3, ...:
    what a cache serves). ``on_request(server, pass name, label)`` is called
    before each request. Raises :class:`~lmcache_core.bench.client.BenchmarkFailed`
    at the first failed request, with the server's reason.

    ``settle_s``: a pause before a request that goes to another server than the
    last one did. A server keeps polling for work for a while after a request
    (vLLM's workers spin for a second), which would slow whichever server goes
    second on a machine with few cores.
    """
    names = list(clients)
    last: list[str] = []

    def send(name: str, pass_name: str, label: str, prompt: str) -> RequestResult:
        if settle_s and last and last[-1] != name:
            time.sleep(settle_s)
        last[:] = [name]
        if on_request is not None:
            on_request(name, pass_name, label)
        return clients[name].complete(prompt, max_tokens, label, check=True)

    for i, prompt in enumerate(warmup):
        for name in names if i % 2 == 0 else names[::-1]:
            for p in range(passes):
                send(name, f"warm-up {p + 1}", f"warm{i}", prompt)
    run = PairedRun([label for label, _ in prompts])
    for i, (label, prompt) in enumerate(prompts):
        for name in names if i % 2 == 0 else names[::-1]:
            plan = [UNCACHED] + ([cached_pass(p + 1) for p in range(1, passes)])
            for pass_name in plan if name in repeat_on else plan[:1]:
                r = send(name, pass_name, label, prompt)
                run.results.setdefault((name, pass_name), []).append(r)
    return run
