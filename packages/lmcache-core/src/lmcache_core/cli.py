"""The ``lmcache`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from lmcache_core.errors import LMCacheError


def _cmd_version(_args: argparse.Namespace) -> int:
    from importlib.metadata import PackageNotFoundError, version

    for dist in (
        "lmcache",
        "lmcache-core",
        "lmcache-cuda",
        "lmcache-vllm",
        "lmcache-sglang",
        "lmcache-nixl",
        "lmcache-server",
    ):
        try:
            print(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            pass
    from lmcache_core.mp.wire import PROTOCOL_VERSION
    from lmcache_core.plugin_api import PLUGIN_API_VERSION

    print(f"plugin API {PLUGIN_API_VERSION}, MP protocol {PROTOCOL_VERSION}")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from lmcache_core.config import CacheConfig

    config = CacheConfig.from_file(args.file) if args.file else CacheConfig.load()
    print(config.describe(), end="")
    # What an engine or server would refuse at start here, beyond the config itself:
    # the secret (from this environment) and the shared tiers that need one.
    from lmcache_core.auth import load_secret, shared_tier_problems

    try:
        problems = shared_tier_problems(config, load_secret(config))
    except LMCacheError as e:
        problems = list(getattr(e, "problems", None) or [str(e)])
    for problem in problems:
        print(f"lmcache config: refused at start: {problem}", file=sys.stderr)
    return 1 if problems else 0


def _cmd_plugins(_args: argparse.Namespace) -> int:
    from lmcache_core.plugins import GROUPS, installed_names

    for group in GROUPS:
        print(f"{group}: {', '.join(installed_names(group)) or '(none)'}")
    return 0


def _cmd_disk(args: argparse.Namespace) -> int:
    """What a disk tier's folder holds, per namespace; ``--prune`` frees the unused ones."""
    import datetime
    from pathlib import Path

    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from lmcache_core.backends.chunk_files import path_from_url
    from lmcache_core.backends.disk_namespaces import survey
    from lmcache_core.sizes import format_size

    root = path_from_url(args.dir)
    if not Path(root).is_dir():
        print(f"lmcache: error: {root} is not a folder (give the local_disk setting)")
        return 2
    with Progress(console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("namespaces", total=None)
        rows = survey(root, prune=args.prune, on_namespace=lambda _: progress.advance(task))
    if args.json:
        print(json.dumps([r.__dict__ for r in rows], indent=2))
        return 0
    table = Table(title=f"lmcache disk tier folder {root}")
    table.add_column("namespace", no_wrap=True)
    table.add_column("state")
    table.add_column("chunks", justify="right")
    table.add_column("size", justify="right")
    table.add_column("newest chunk")
    for r in rows:
        state = {True: "in use", False: "unused", None: "unknown"}[r.in_use]
        newest = "-"
        if r.newest is not None:
            newest = datetime.datetime.fromtimestamp(r.newest).isoformat(" ", "seconds")
        table.add_row(
            r.namespace,
            state + (" (pruned)" if r.pruned else ""),
            str(r.files),
            format_size(r.nbytes),
            newest,
        )
    Console().print(table)
    unused_bytes = sum(r.nbytes for r in rows if r.in_use is False and not r.pruned)
    if unused_bytes and not args.prune:
        print(
            f"{format_size(unused_bytes)} in unused namespaces: running tiers delete them "
            "first when they need room; --prune deletes them now"
        )
    return 0


def _cmd_bench_core(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from lmcache_core.bench.core import run_core_benchmark
    from lmcache_core.sizes import format_size

    console = Console(stderr=True)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("core benchmark", total=args.rounds + 3)

        def step(msg: str) -> None:
            progress.update(task, description=msg, advance=1)

        result = run_core_benchmark(
            chunks=args.chunks, rounds=args.rounds, on_step=step, server_url=args.server_url
        )
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
        return 0 if result.correct else 1
    table = Table(
        title=f"lmcache-core: {args.chunks} chunks of {format_size(result.chunk_bytes)}"
        " (Llama-3-8B shape), "
        + (f"lmcache server at {args.server_url}" if args.server_url else "CPU tier")
    )
    table.add_column("operation")
    table.add_column("GB/s", justify="right")
    table.add_column("vs memcpy", justify="right")
    table.add_row("memcpy (baseline)", f"{result.gbps(result.memcpy_s):.2f}", "1.00")
    table.add_row("store", f"{result.gbps(result.store_s):.2f}", f"{result.store_ratio:.2f}")
    table.add_row(
        "retrieve", f"{result.gbps(result.retrieve_s):.2f}", f"{result.retrieve_ratio:.2f}"
    )
    Console().print(table)
    for what, ms in result.lookup_ms.items():
        print(f"lookup of a cached 128K-token prompt, {what}: {ms:.2f} ms")
    print(f"retrieved bytes equal stored bytes: {result.correct}")
    return 0 if result.correct else 1


def _cmd_bench_tiers(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from lmcache_core.bench.tiers import run_tier_benchmark
    from lmcache_core.sizes import format_size

    tiers = tuple(args.tiers.split(","))
    bad = set(tiers) - {"disk", "redis"}
    if bad:
        print(f"lmcache: error: --tiers takes disk and/or redis, not {', '.join(bad)}")
        return 2
    console = Console(stderr=True)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("tier benchmark", total=len(tiers))

        def step(msg: str) -> None:
            progress.update(task, description=f"{msg} done", advance=1)

        result = run_tier_benchmark(
            chunk_mib=args.chunk_mib,
            chunks=args.chunks,
            rounds=args.rounds,
            disk_dir=args.dir,
            redis_url=args.redis_url,
            tiers=tiers,
            on_step=step,
        )
    if args.json:
        out = {
            f"{t}_{op}": {
                "raw_gbps": result.gbps(raw),
                "tier_gbps": result.gbps(ours),
                "ratio": raw / ours,
            }
            for (t, op), (raw, ours) in result.times.items()
        }
        for variant in ("redis+auth", "redis+encrypt"):
            for op in ("write", "read"):
                if (variant, op) in result.times and ("redis", op) in result.times:
                    out[f"{variant}_{op}_cost"] = (  # type: ignore[assignment]
                        result.times[(variant, op)][1] / result.times[("redis", op)][1]
                    )
        out["correct"] = result.correct  # type: ignore[assignment]
        print(json.dumps(out, indent=2))
        return 0 if result.correct else 1
    table = Table(
        title=f"lmcache tiers: {args.chunks} chunks of {format_size(result.chunk_bytes)}, "
        f"median of {args.rounds} rounds"
    )
    for col in ("tier", "operation", "raw GB/s", "tier GB/s", "tier / raw"):
        table.add_column(col, justify="right" if "/" in col or "GB" in col else "left")
    baselines = {"disk": "sequential file I/O", "redis": "pipelined redis-py SET/GET"}
    for (t, op), (raw, ours) in result.times.items():
        table.add_row(
            f"{t} (vs {baselines[t.split('+')[0]]})",
            op,
            f"{result.gbps(raw):.2f}",
            f"{result.gbps(ours):.2f}",
            f"{raw / ours:.2f}",
        )
    Console().print(table)
    for variant in ("redis+auth", "redis+encrypt"):
        for op in ("write", "read"):
            if (variant, op) in result.times and ("redis", op) in result.times:
                cost = result.times[(variant, op)][1] / result.times[("redis", op)][1]
                print(f"{variant} {op}: {cost:.3f}x the time of the redis tier without it")
    print(f"read bytes equal written bytes: {result.correct}")
    return 0 if result.correct else 1


def _cmd_bench_serve(args: argparse.Namespace) -> int:
    from lmcache_core.bench.serve import cmd_serve

    return cmd_serve(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmcache", description="lmcache: KV cache for LLM engines"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("version", help="installed lmcache packages").set_defaults(fn=_cmd_version)

    p = sub.add_parser("config", help="validate and print the resolved cache config")
    p.add_argument("--file", help="a YAML config file (default: LMCACHE_CONFIG_FILE + LMCACHE_*)")
    p.set_defaults(fn=_cmd_config)

    sub.add_parser("plugins", help="installed backends, policies, serdes").set_defaults(
        fn=_cmd_plugins
    )

    p = sub.add_parser(
        "disk", help="a disk tier folder: namespaces, in use or not, sizes (--prune: free unused)"
    )
    p.add_argument("dir", help="the local_disk folder (a path or file:// URL)")
    p.add_argument("--prune", action="store_true", help="delete unused namespaces' chunks now")
    p.add_argument("--json", action="store_true", help="print the survey as JSON")
    p.set_defaults(fn=_cmd_disk)

    sub.add_parser(
        "server",
        help="run the cache server of this host (MP mode; lmcache server --help for its flags)",
        add_help=False,
    ).set_defaults(fn=_cmd_server)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    p = bench.add_parser("core", help="CPU tier store/retrieve vs memcpy, 128K lookup")
    p.add_argument("--chunks", type=int, default=16, help="chunks of 32 MiB per round")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument(
        "--server-url",
        default=None,
        help="measure through this lmcache server's shared arena (MP mode), e.g. "
        "unix:///run/lmcache/lmcache.sock (its max_local_cpu_size must hold 2x the chunks)",
    )
    p.set_defaults(fn=_cmd_bench_core)

    p = bench.add_parser("tiers", help="disk and Redis tiers vs raw file I/O and raw redis-py")
    p.add_argument("--tiers", default="disk,redis", help="comma-separated: disk, redis")
    p.add_argument("--chunks", type=int, default=32, help="values per round")
    p.add_argument("--chunk-mib", type=float, default=8.0, help="size of a value, MiB")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--dir", help="directory on the disk to measure (default: the temp dir)")
    p.add_argument("--redis-url", help="a Redis to measure (default: start a private one)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.set_defaults(fn=_cmd_bench_tiers)

    p = bench.add_parser(
        "serve",
        help="TTFT of a workload against any OpenAI-compatible server (multi-round-qa: "
        "a load generator with concurrency or a request rate)",
    )
    p.add_argument("--base-url", required=True, help="e.g. http://localhost:8000")
    p.add_argument("--model", help="model name (default: the first the server lists)")
    p.add_argument("--workload", choices=["long-doc-qa", "multi-round-qa"], default="long-doc-qa")
    p.add_argument("--docs", type=int, default=4, help="long-doc-qa: documents")
    p.add_argument("--doc-words", type=int, default=3540, help="long-doc-qa: words a document")
    p.add_argument("--passes", type=int, default=2, help="long-doc-qa: times each is asked")
    p.add_argument("--users", type=int, default=4, help="multi-round-qa: users")
    p.add_argument("--rounds", type=int, default=3, help="multi-round-qa: rounds a user")
    p.add_argument("--system-words", type=int, default=1000, help="multi-round-qa: shared prompt")
    p.add_argument(
        "--context-words", type=int, default=0, help="multi-round-qa: each user's own document"
    )
    p.add_argument("--question-words", type=int, default=50, help="multi-round-qa: a question")
    p.add_argument("--concurrency", type=int, default=1, help="multi-round-qa: requests in flight")
    p.add_argument(
        "--rate", type=float, help="multi-round-qa: requests started per second (Poisson)"
    )
    p.add_argument(
        "--duration",
        type=float,
        help="multi-round-qa: run this many seconds, users starting over after their rounds",
    )
    p.add_argument("--label", help="multi-round-qa: this configuration's name in plots")
    p.add_argument("--out", help="multi-round-qa: write summary and every request as JSON")
    p.add_argument("--plot", help="multi-round-qa: write TTFT over time as SVG")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--metrics-url",
        help="a /metrics URL for hit rates (multi-round-qa default: the server's own)",
    )
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.set_defaults(fn=_cmd_bench_serve)
    p = bench.add_parser("plot", help="TTFT over time of several bench serve --out runs, as SVG")
    p.add_argument("runs", nargs="+", help="JSON files written by bench serve --out")
    p.add_argument("-o", "--output", required=True, help="the SVG to write")
    p.set_defaults(fn=_cmd_bench_plot)
    return parser


def _cmd_bench_plot(args: argparse.Namespace) -> int:
    from lmcache_core.bench.serve import cmd_plot

    return cmd_plot(args)


def _cmd_server(args: argparse.Namespace) -> int:  # pragma: no cover - dispatched in main()
    return _run_server([])


def _run_server(argv: list[str]) -> int:
    """``lmcache server ...``: the server is another package's (lmcache-server), found
    through the ``lmcache.commands`` entry points, so core imports none of it."""
    from lmcache_core.plugins import COMMANDS, KNOWN_PLUGINS, command

    server_main = command("server")
    if server_main is None:
        fix = KNOWN_PLUGINS[COMMANDS]["server"]
        print(f"lmcache: error: `lmcache server` needs lmcache-server: {fix}", file=sys.stderr)
        return 2
    return int(server_main(argv))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "server":  # its flags are the server package's (upstream's too)
        return _run_server(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.fn(args))
    except LMCacheError as e:
        print(f"lmcache: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
