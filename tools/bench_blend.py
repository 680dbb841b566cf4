"""Non-prefix reuse (blending) in real vLLM: answer quality, TTFT, and the cost for others.

The driver of :mod:`lmcache_vllm.bench.blend` (the measurements). Three
measurements, each against its baseline in the same process (vLLM's offline
API, the real SmolLM2-135M model by default, in the dtype the CPU runs
fastest):

* quality: a synthetic multi-document QA set (lmcache_vllm.testing.qa_sets). The
  documents are first stored in another order (or each on its own, with
  ``--warm alone``), then asked about in a new order. Greedy answers from a
  full prefill, from a blend at the configured ratio and from a blend at
  ratio 0 (re-rotation only) are scored against the ground truth, and the
  blends' answers against the full prefill's; the KL divergence of the first
  answer token's distribution from the full prefill's measures what greedy
  answers hide;
* speed: 4 cached documents of about 1000 tokens in a new order and a short
  question: TTFT of the blend against a full prefill of the same prompt
  (a fresh cache salt makes it a miss), alternating;
* cost for everyone else: uncached requests with blending on against
  blending off, alternating in one engine (the scheduler's blending is
  switched per request, so both paths store what they would).

    python tools/bench_blend.py                      # all three, about 15 min here
    python tools/bench_blend.py --only speed --trials 5
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("LMCACHE_MAX_LOCAL_CPU_SIZE", "3GiB")

from lmcache_vllm.bench.blend import Bench, overhead, quality, speed
from lmcache_vllm.testing import tool_args
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
console = Console()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    tool_args.add_arguments(ap, model="smollm2", out=False)
    ap.add_argument("--only", choices=["quality", "speed", "overhead"], action="append")
    ap.add_argument("--items", type=int, default=50, help="quality items")
    ap.add_argument("--warm", choices=["reordered", "alone"], default="reordered")
    ap.add_argument(
        "--set",
        choices=["facts", "linked"],
        default="facts",
        help="facts: one fact per document; linked: a fact and its person in two passages",
    )
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument(
        "--ratio", default="0.15", help="comma-separated, one per check layer (non-increasing)"
    )
    ap.add_argument(
        "--check-layer", default="1", help="comma-separated: several narrow the set layer by layer"
    )
    ap.add_argument("--json", help="write the figures here")
    a = ap.parse_args()
    run_ = tool_args.prepare(a, models_dir=ROOT / ".cache" / "models", prefix="lmcache-blend-")
    model = run_.model
    ratios = tuple(float(x) for x in a.ratio.split(","))
    checks = tuple(int(x) for x in a.check_layer.split(","))
    if len(ratios) != len(checks):
        ap.error("--ratio and --check-layer need as many values each")
    b = Bench(model, ratios, checks, dtype=run_.dtype)
    todo = a.only or ["quality", "speed", "overhead"]
    out: dict = {
        "model": model,
        "dtype": run_.dtype,
        "ratio": list(ratios),
        "check_layer": list(checks),
    }
    for name in todo:
        console.print(f"[bold]{name}[/bold]")
        if name == "quality":
            with Progress(console=console, transient=True) as bar:

                def progress(total: int) -> Callable[[], None]:
                    task = bar.add_task("quality", total=total)
                    return lambda: bar.advance(task)

                out[name] = quality(b, a.items, a.warm, a.set, progress)
        elif name == "speed":
            out[name] = speed(b, a.trials, console.print)
        else:
            out[name] = overhead(b, 4 * a.trials)
    table = Table(title=f"blending, ratio {a.ratio}, check layer {a.check_layer}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    if "quality" in out:
        q = out["quality"]
        for k, v in q["accuracy"].items():
            table.add_row(f"accuracy, {k}", f"{v:.0%}")
        for k, v in q["agreement_with_full"].items():
            table.add_row(f"answers = full prefill's, {k}", f"{v:.0%}")
        for k, v in q["first_token_kl"].items():
            table.add_row(f"first-token KL to full prefill, {k}", f"{v:.3f}")
    if "speed" in out:
        s = out["speed"]
        table.add_row(
            f"TTFT full prefill ({s['prompt_tokens']:.0f} tok)", f"{s['full_ttft_s']:.2f} s"
        )
        table.add_row("TTFT blended", f"{s['blend_ttft_s']:.2f} s")
        table.add_row("blended / full (of the medians)", f"{s['ratio']:.3f}")
        p = s["paired_ratio"]
        table.add_row(
            f"blended / full, paired (IQR, n={p['n']})",
            f"{p['median']:.3f} ({p['q1']:.3f}-{p['q3']:.3f})",
        )
    if "overhead" in out:
        o = out["overhead"]
        table.add_row("uncached TTFT, blending off", f"{o['off_ttft_s']:.2f} s")
        table.add_row("uncached TTFT, blending on", f"{o['on_ttft_s']:.2f} s")
        p = o["paired_ratio"]
        table.add_row(
            f"on / off (median of {o['pairs']} pairs, IQR)",
            f"{o['ratio']:.3f} ({p['q1']:.3f}-{p['q3']:.3f})",
        )
    console.print(table)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    os._exit(0)  # skip vLLM's slow teardown


if __name__ == "__main__":
    main()
