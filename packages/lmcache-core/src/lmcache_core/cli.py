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
    ):
        try:
            print(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            pass
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from lmcache_core.config import CacheConfig

    config = CacheConfig.from_file(args.file) if args.file else CacheConfig.load()
    print(config.describe(), end="")
    return 0


def _cmd_plugins(_args: argparse.Namespace) -> int:
    from lmcache_core.plugins import GROUPS, installed_names

    for group in GROUPS:
        print(f"{group}: {', '.join(installed_names(group)) or '(none)'}")
    return 0


def _cmd_bench_core(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from lmcache_core.bench import run_core_benchmark
    from lmcache_core.sizes import format_size

    console = Console(stderr=True)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("core benchmark", total=args.rounds + 3)

        def step(msg: str) -> None:
            progress.update(task, description=msg, advance=1)

        result = run_core_benchmark(chunks=args.chunks, rounds=args.rounds, on_step=step)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
        return 0 if result.correct else 1
    table = Table(
        title=f"lmcache-core: {args.chunks} chunks of {format_size(result.chunk_bytes)}"
        " (Llama-3-8B shape), CPU tier"
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

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    p = bench.add_parser("core", help="CPU tier store/retrieve vs memcpy, 128K lookup")
    p.add_argument("--chunks", type=int, default=16, help="chunks of 32 MiB per round")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.set_defaults(fn=_cmd_bench_core)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
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
