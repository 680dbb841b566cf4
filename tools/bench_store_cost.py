"""The cost of storing: uncached requests with lmcache vs without a connector, A/B.

The driver of :mod:`lmcache_vllm.bench.store_cost` (the measurement).

An uncached request with lmcache computes its prefill as plain vLLM does and
then stores its KV; this measures what that store adds to the request. Both
configurations are alive at once, each in its own process (vLLM's offline
``LLM`` API in a child that runs one prompt per command, or vLLM's OpenAI
server with ``--server``), and the same new prompt goes to one, then the
other, alternating which goes first: only one computes at a time, and each
pair is measured within seconds, so the machine's drift (up to 2x from minute
to minute here) cancels in the paired ratio. Every prompt is new (random
token ids), vLLM's prefix cache is off, and each prompt's wall time is
measured around ``generate`` (TTFT for the server). The lmcache side also
reports the connector's own ``lmcache:time_to_store`` histogram: the time
spent inside the stores.

    python tools/bench_store_cost.py                       # the CPU's dtype, offline API
    python tools/bench_store_cost.py --dtypes bfloat16,float32
    python tools/bench_store_cost.py --server --dtypes bfloat16
    python tools/bench_store_cost.py --json store-cost.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lmcache_vllm.bench.store_cost import measure
from lmcache_vllm.testing import tool_args
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    tool_args.add_arguments(ap, model="random")
    ap.add_argument(
        "--dtypes", help="several dtypes, comma-separated, measured one after the other"
    )
    ap.add_argument("--prompt-tokens", type=int, default=4000)
    ap.add_argument("--prompts", type=int, default=3, help="prompt pairs per run")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--server", action="store_true", help="vLLM's OpenAI server, not LLM")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    run_ = tool_args.prepare(
        args, models_dir=ROOT / ".cache" / "models", prefix="lmcache-storecost-"
    )
    dtypes = (args.dtypes or run_.dtype).split(",")

    console = Console()
    api = "server (TTFT)" if args.server else "offline LLM.generate (wall time)"
    rows = []
    n = args.prompts * args.runs
    for dtype in dtypes:
        with Progress(transient=True) as progress:
            task = progress.add_task(f"{dtype}: pairs of prompts", total=n)
            rows.append(
                measure(
                    run_.model, dtype, prompt_tokens=args.prompt_tokens, pairs=n,
                    server=args.server, logs=run_.out,
                    on_pair=lambda: progress.advance(task),  # noqa: B023
                )
            )  # fmt: skip
    table = Table(title=f"cost of storing: {args.prompt_tokens}-token uncached prompts, {api}")
    for col in ("dtype", "pairs", "no connector (s)", "lmcache (s)", "paired ratio",
                "IQR", "in the store (s)", "store / no connector"):  # fmt: skip
        table.add_column(col, justify="right")
    for r in rows:
        s = r["paired_ratio"]
        table.add_row(
            r["dtype"], str(r["pairs"]), f"{r['no_connector_median_s']:.3f}",
            f"{r['lmcache_median_s']:.3f}", f"{s['median']:.3f}",
            f"{s['q1']:.3f}-{s['q3']:.3f}", f"{r['store_s_median']:.3f}",
            f"{r['store_s_median'] / r['no_connector_median_s']:.1%}",
        )  # fmt: skip
    console.print(table)
    console.print("medians; paired ratio: lmcache / no connector for the same prompt, back to back")
    if args.json:
        Path(args.json).write_text(json.dumps({"api": api, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(tool_args.run_tool(main))
