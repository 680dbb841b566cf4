"""What the benchmarks' hand-written SVG plots share (no plotting library to install)."""

from __future__ import annotations

#: Series colours, in order (matplotlib's first ten, then black).
COLORS = (
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#ff7f0e",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
    "#000000",
)


def color(i: int) -> str:
    return COLORS[i % len(COLORS)]


def escape(text: str) -> str:
    """Text for an SVG element: labels are user input (run labels, policy names)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
