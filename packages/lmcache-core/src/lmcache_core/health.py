"""Health of one tier (its read or its write path): a circuit breaker with backoff.

A tier that fails (server down, disk full, permission denied, timeout) must
not slow every request down by its timeout, nor fail them. So the first
failure marks it unhealthy: every operation on it is skipped (a miss, counted)
until a backoff has passed; then exactly one caller probes it. A success
makes it healthy again (it "rejoins"); another failure doubles the backoff, up
to a bound. Reads and writes are tracked apart: a full disk stops writes, not
reads. Thread-safe.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from lmcache_core.metrics import Metrics

logger = logging.getLogger(__name__)


class TierHealth:
    def __init__(
        self,
        tier: str,
        metrics: Metrics | None = None,
        *,
        path: str = "all",
        base_backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if base_backoff_s <= 0 or max_backoff_s < base_backoff_s:
            raise ValueError(
                f"backoff must satisfy 0 < base ({base_backoff_s}) <= max ({max_backoff_s})"
            )
        self.tier = tier
        self.path = path
        self.metrics = metrics if metrics is not None else Metrics()
        self.base_backoff_s = base_backoff_s
        self.max_backoff_s = max_backoff_s
        self._clock = clock
        self._lock = threading.Lock()
        self._healthy = True
        self._backoff = base_backoff_s
        self._retry_at = 0.0
        self.failures = 0
        self.metrics.set("lmcache:tier_healthy", 1, tier=tier, path=path)

    @property
    def healthy(self) -> bool:
        return self._healthy

    def available(self, op: str = "") -> bool:
        """May an operation go to the tier now? (True for the one probe after a backoff.)"""
        if self._healthy:
            return True
        with self._lock:
            if self._healthy:
                return True
            now = self._clock()
            if now >= self._retry_at:
                # This caller probes; the others keep skipping until it answers.
                self._retry_at = now + self._backoff
                return True
        self.metrics.inc("lmcache:num_skipped_unhealthy", tier=self.tier, op=op or "any")
        return False

    def succeeded(self) -> None:
        if self._healthy:
            return
        with self._lock:
            if self._healthy:
                return
            self._healthy = True
            self._backoff = self.base_backoff_s
        self.metrics.set("lmcache:tier_healthy", 1, tier=self.tier, path=self.path)
        logger.warning("tier %s answers again (%s); it rejoins the cascade", self.tier, self.path)

    def failed(self, op: str, error: BaseException | None = None) -> None:
        self.failures += 1
        self.metrics.inc("lmcache:num_failures", tier=self.tier, op=op)
        with self._lock:
            was_healthy = self._healthy
            if not was_healthy:
                self._backoff = min(self.max_backoff_s, self._backoff * 2)
            self._healthy = False
            self._retry_at = self._clock() + self._backoff
            backoff = self._backoff
        self.metrics.set("lmcache:tier_healthy", 0, tier=self.tier, path=self.path)
        if was_healthy:
            logger.warning(
                "tier %s failed in %s (%s); skipping its %s path (requests go on as misses), "
                "retrying in %.1f s",
                self.tier,
                op,
                error if error is not None else "error",
                self.path,
                backoff,
            )
        else:
            logger.info("tier %s still failing (%s); next try in %.1f s", self.tier, op, backoff)
