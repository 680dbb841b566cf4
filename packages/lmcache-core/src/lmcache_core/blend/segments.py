"""Segments: the parts of a prompt whose KV is cached and reused wherever they stand.

A prompt such as ``system # # doc A # # doc B # # question`` is cut at its
separators. Each segment is keyed on its own tokens only (a fresh hash chain,
see :func:`segment_prompt`), so doc B has the same keys after doc A, before
it, or after a new document: that is what makes non-prefix reuse possible.

Where a segment's first and last tokens fall depends on its neighbours. Byte
level BPE merges the space that ends ``" # # "`` into the next word (``" Mira"``
after a separator, but ``"M" "ira"`` at the start of a text), and a separator
may merge with the punctuation before it. So a segment keeps only the tokens
that lie *strictly inside* its text and begins at a word: its first word, and
any token that ends at or after its last character, are left out (and
recomputed). A few tokens a segment; in exchange a document is found after a
separator, at the start of a prompt, or after any other neighbour.

Explicit token spans (given per request by the caller, who knows exactly
where its documents are) are used as given, after validation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from lmcache_core.errors import TokenError


class Segment(NamedTuple):
    """Tokens ``[start, end)`` of a prompt that form one reusable segment."""

    start: int
    end: int

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


def segments_from_text(
    text: str, offsets: Sequence[tuple[int, int]], separator: str
) -> list[Segment]:
    """Segments of a prompt cut at ``separator``, from its text and token offsets.

    ``offsets[i]`` is the character range ``[a, b)`` of token ``i`` in
    ``text`` (a tokenizer's offset mapping; special tokens may have empty
    ranges). A prompt without the separator has no segments: it is not a
    blend request. Empty segments are dropped.
    """
    if not separator:
        raise ValueError("the blend separator must be a non-empty string")
    bounds: list[tuple[int, int]] = []
    pos = 0
    found = False
    while True:
        hit = text.find(separator, pos)
        if hit < 0:
            bounds.append((pos, len(text)))
            break
        found = True
        bounds.append((pos, hit))
        pos = hit + len(separator)
    if not found:
        return []
    out: list[Segment] = []
    i, n = 0, len(offsets)
    for a, b in bounds:
        # tokens strictly inside (a, b): start > a and end < b
        while i < n and offsets[i][0] <= a:
            i += 1
        j = i
        while j < n and offsets[j][1] < b:
            j += 1
        first = i
        # An empty-range token (a special token at the very start) never counts as inside.
        while first < j and offsets[first][1] <= offsets[first][0]:
            first += 1
        first = _next_word(text, offsets, first, j)
        if j > first:
            out.append(Segment(first, j))
        i = max(i, j)
    return out


#: How far into a segment to look for the start of its second word.
_WORD_SEARCH = 8


def _next_word(text: str, offsets: Sequence[tuple[int, int]], first: int, end: int) -> int:
    """The first token from ``first`` on that starts a word (a space before or in it).

    Tokenizers split text into words before merging, so from the second word
    on the tokens do not depend on what came before the segment. Text without
    spaces (e.g. Chinese) keeps ``first``.
    """
    for t in range(first, min(end, first + _WORD_SEARCH)):
        start = offsets[t][0]
        if start < len(text) and (text[start].isspace() or (start and text[start - 1].isspace())):
            return t
    return first


def segments_from_spans(spans: object, num_tokens: int) -> list[Segment]:
    """Explicit token spans ``[[start, end], ...]`` checked: in order, disjoint, in the prompt."""
    if not isinstance(spans, (list, tuple)):
        raise TokenError(
            f"blend segments must be a list of [start, end] token spans, got {type(spans).__name__}"
        )
    out: list[Segment] = []
    last = 0
    for span in spans:
        if (
            not isinstance(span, (list, tuple))
            or len(span) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in span)
        ):
            raise TokenError(f"blend segment {span!r} is not a [start, end] pair of integers")
        start, end = span
        if not last <= start < end <= num_tokens:
            raise TokenError(
                f"blend segment [{start}, {end}) must be non-empty, within the prompt's "
                f"{num_tokens} tokens, and after the segment before it (ends at {last})"
            )
        out.append(Segment(start, end))
        last = end
    return out
