"""The blend curves bench's own logic (lmcache_vllm.bench.blend_curves), without vLLM."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

pytest.importorskip("torch")

from lmcache_core.blend.selection import parse_selection
from lmcache_vllm.bench.blend_curves import POLICIES, Policy, write_curves_svg


def test_every_policy_names_rankings_the_config_accepts():
    for p in POLICIES.values():
        assert parse_selection(p.selection) == tuple(p.selection.split("+"))


def test_gradual_filtering_keeps_more_at_earlier_check_layers_and_adaptive_sets_its_target():
    g = Policy("g", checks=(1, 2, 3))
    assert g.settings(0.2)[1:] == ((1, 2, 3), pytest.approx((0.6, 0.4, 0.2)))
    assert g.settings(0.5)[2] == (1.0, 1.0, 0.5)  # never above 1, never growing
    pol, checks, ratios = Policy("a", "k_deviation+segment_starts", adaptive=True).settings(1e-4)
    assert ratios == (1.0,)  # the adaptive budget needs no ratio
    assert (pol.budget, pol.target, pol.floor, pol.cap) == ("adaptive", 1e-4, 0.0, 1.0)
    assert pol.rankings == ("k_deviation", "segment_starts") and checks == (1,)


def test_the_plot_has_one_panel_per_set_and_one_curve_per_policy(tmp_path):
    def pts(policy, xs):
        return [
            {"policy": policy, "x": x, "recomputed": min(1.0, x + 0.05), "agreement": 0.5 + x / 2}
            for x in xs
        ]

    quality = {
        s: {
            "items": 3,
            "full_accuracy": 0.5,
            "points": pts("ratio", [0.0, 1.0]) + pts("k<dev>", [0.1, 0.5]) + pts("b&c", [0.3]),
        }
        for s in ("shared", "records")
    }
    out = tmp_path / "c.svg"
    write_curves_svg(out, quality)
    root = ET.parse(out).getroot()  # well-formed, names escaped
    ns = "{http://www.w3.org/2000/svg}"
    lines = root.findall(f"{ns}polyline")
    assert len(lines) == 2 * 2
    # Each curve runs from ratio 0 to ratio 1 through its own points.
    assert all(len(pl.get("points").split()) in (4, 3) for pl in lines)
    text = "".join(t.text or "" for t in root.iter(f"{ns}text"))
    assert "k<dev>" in text and "b&c" in text and "shared" in text and "records" in text
