"""Which finished requests keep their blocks for saves still in flight, and until when.

With async saves (:func:`lmcache_vllm.settings.async_saves`) a save's copy may
still be reading a request's blocks when the request finishes. vLLM then
keeps the blocks if ``request_finished`` answers "delay", until a worker
names the request in ``get_finished``. The scheduler side and every worker
must agree on which requests are delayed, or vLLM frees blocks twice or
never: both keep a :class:`SaveTracker` over the same metadata, with one
rule, a request is delayed iff a save of it was ever planned.
"""

from __future__ import annotations

from collections.abc import Iterable


class SaveTracker:
    """The delayed-free rule, for the scheduler side and for each worker."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.saving: set[str] = set()  # requests a save was planned for
        self.finishing: set[str] = set()  # worker: finished, blocks kept for their saves

    def planned(self, req_ids: Iterable[str]) -> None:
        """A save of these requests is in this step's metadata."""
        self.saving.update(req_ids)

    # ------------------------------------------------------------------ scheduler side

    def delay(self, req_id: str) -> bool:
        """``request_finished``: must vLLM keep this request's blocks?"""
        had_saves = req_id in self.saving
        self.saving.discard(req_id)
        return self.enabled and had_saves

    def fence_needed(self, preempted: Iterable[str]) -> bool:
        """Were requests with saves preempted (their blocks freed at once)?"""
        return self.enabled and not self.saving.isdisjoint(preempted)

    def saving_any(self) -> bool:
        """May a save still be in flight (after the step) for some request?"""
        return self.enabled and bool(self.saving)

    # ------------------------------------------------------------------ worker side

    def done(self, finished_req_ids: Iterable[str], busy: set[str]) -> set[str]:
        """``get_finished``: delayed requests none of whose saves is in flight (``busy``)."""
        if not self.enabled:
            return set()
        self.finishing.update(r for r in finished_req_ids if r in self.saving)
        done = {r for r in self.finishing if r not in busy}
        self.finishing -= done
        self.saving -= done
        return done
