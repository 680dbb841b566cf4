"""What the scheduler tells the workers about blend requests, each step."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RunRef:
    """Prompt tokens ``[start, start + num_tokens)``, cached as the leading chunks
    (``digests``) of the segment ``[segment_start, segment_end)``."""

    segment_start: int
    segment_end: int
    start: int
    num_tokens: int
    digests: list[bytes]


@dataclass
class SegmentRef:
    """Segment tokens ``[start, end)`` and its chunks' digests (segment-local chain)."""

    start: int
    end: int
    digests: list[bytes]


@dataclass
class BlendLoadSpec:
    """Blend tokens ``[start, until)`` of a request into its blocks, reusing ``runs``."""

    req_id: str
    block_ids: list[int]
    start: int
    until: int
    token_ids: list[int]  # of tokens [start, until)
    chunk_size: int
    runs: list[RunRef]
    # the prompt's tokens after ``until`` (its question), sent only where the selection
    # ranks by the question's attention
    tail_ids: list[int] = field(default_factory=list)


@dataclass
class BlendSaveSpec:
    """Store the chunks of ``segments`` that the cache lacks, from the request's blocks."""

    req_id: str
    block_ids: list[int]
    chunk_size: int
    segments: list[SegmentRef]
