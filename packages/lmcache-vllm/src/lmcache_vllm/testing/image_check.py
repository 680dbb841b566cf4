"""Run the lmcache CPU image (deploy/images/cpu.Containerfile) as a single host would.

``tools/check_image.sh`` builds the image, then runs this::

    python -m lmcache_vllm.testing.image_check --image IMG --model DIR --work DIR

Two containers from the one image, as deploy/recipes/podman runs them: the
host's ``lmcache server`` (``--entrypoint lmcache``) with its Unix socket in a
host folder, and vLLM's OpenAI server on that socket (the arena comes over it
as a memfd: no ``--ipc=host``). A prompt is sent twice with vLLM's prefix
cache off: the second must be served by the server's cache (vLLM's
``lmcache:num_hit_tokens`` grows) and answer as the first did. Then vLLM's
container is removed and started again: the new engine hits what the old one
stored (the server outlived it). Exit status 0, or 1 with what failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from lmcache_core.bench.scrape import scrape_metrics
from lmcache_core.testing.servers import free_port

from lmcache_vllm.testing.server import complete

logger = logging.getLogger(__name__)

CONNECTOR = {
    "kv_connector": "LMCacheKVConnector",
    "kv_connector_module_path": "lmcache_vllm",
    "kv_role": "kv_both",
}


class CheckFailed(RuntimeError):
    pass


def podman(*args: str, check: bool = True) -> str:
    proc = subprocess.run(["podman", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise CheckFailed(f"podman {' '.join(args[:3])}... failed: {proc.stderr[-2000:]}")
    return proc.stdout.strip()


def wait_url(url: str, container: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            state = podman("inspect", "-f", "{{.State.Status}}", container, check=False)
            if state not in ("running", "created", "configured"):
                logs = podman("logs", container, check=False)
                raise CheckFailed(f"{container} is {state or 'gone'}:\n{logs[-4000:]}") from None
            if time.monotonic() > deadline:
                logs = podman("logs", container, check=False)
                raise CheckFailed(f"{url} not up in {timeout:.0f} s:\n{logs[-4000:]}") from None
            time.sleep(1)


def hit_tokens(port: int) -> float:
    """vLLM's ``lmcache:num_hit_tokens`` (lmcache's counters on vLLM's /metrics); 0 before
    its first series (a counter vLLM has not carried yet)."""
    return scrape_metrics(f"http://127.0.0.1:{port}/metrics").get("lmcache:num_hit_tokens", 0.0)


def start_vllm(image: str, name: str, model: Path, run: Path, config: Path, port: int) -> None:
    podman(
        # vLLM's workers talk through /dev/shm (160 MiB here): podman's default is 64 MiB.
        "run", "-d", "--name", name, "--network", "host", "--shm-size", "1g",
        "-v", f"{run}:/run/lmcache:ro", "-v", f"{config}:/etc/lmcache/cache.yaml:ro",
        "-v", f"{model}:/model:ro",
        "-e", "LMCACHE_CONFIG_FILE=/etc/lmcache/cache.yaml",
        "-e", "VLLM_CPU_KVCACHE_SPACE=1",
        image,
        "/model", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
        "--enforce-eager", "--max-model-len", "2048", "--no-enable-prefix-caching",
        "--kv-transfer-config", json.dumps(CONNECTOR),
    )  # fmt: skip
    wait_url(f"http://127.0.0.1:{port}/health", name, timeout=600)


def check(image: str, model: Path, work: Path) -> dict:
    run = work / "run"
    run.mkdir(parents=True, exist_ok=True)
    run.chmod(0o755)  # an engine refuses a socket folder others could write to
    config = work / "cache.yaml"
    config.write_text(
        "chunk_size: 256\nmax_local_cpu_size: 1GiB\nserver_url: unix:///run/lmcache/lmcache.sock\n"
    )
    admin, port = free_port(), free_port()
    server, engine = "lmcache-check-server", "lmcache-check-vllm"
    for c in (engine, server):
        podman("rm", "-f", c, check=False)
    try:
        podman(
            "run", "-d", "--name", server, "--network", "host",
            "-v", f"{run}:/run/lmcache", "-v", f"{config}:/etc/lmcache/cache.yaml:ro",
            "--entrypoint", "lmcache", image,
            "server", "--config", "/etc/lmcache/cache.yaml",
            "--socket", "/run/lmcache/lmcache.sock", "--http-port", str(admin),
        )  # fmt: skip
        wait_url(f"http://127.0.0.1:{admin}/health", server, timeout=120)
        start_vllm(image, engine, model, run, config, port)
        rnd = random.Random(3)
        prompt = [rnd.randrange(2, 4000) for _ in range(700)]
        h0 = hit_tokens(port)
        cold = complete(port, prompt, max_tokens=8)
        h1 = hit_tokens(port)
        time.sleep(1)  # the store is written behind the request
        hit = complete(port, prompt, max_tokens=8)
        h2 = hit_tokens(port)
        podman("rm", "-f", engine)  # the engine goes; the server and its cache stay
        start_vllm(image, engine, model, run, config, port)
        h3 = hit_tokens(port)
        again = complete(port, prompt, max_tokens=8)
        h4 = hit_tokens(port)
        result = {
            "cold_loaded": h1 - h0,
            "hit_loaded": h2 - h1,
            "after_restart_loaded": h4 - h3,
            "same_answer": hit == cold,
            "same_after_restart": again == cold,
        }
        problems = []
        if result["cold_loaded"] != 0:
            problems.append("the first request loaded KV from an empty cache")
        if result["hit_loaded"] <= 0:
            problems.append("the repeated prompt was not served from the cache server")
        if result["after_restart_loaded"] <= 0:
            problems.append("the restarted engine did not hit what the server kept")
        if not (result["same_answer"] and result["same_after_restart"]):
            problems.append(f"answers differ: {cold!r} / {hit!r} / {again!r}")
        if problems:
            raise CheckFailed("; ".join(problems) + f" ({result})")
        return result
    finally:
        for c in (engine, server):
            podman("rm", "-f", c, check=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image", required=True)
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--work", required=True, type=Path)
    args = ap.parse_args()
    t0 = time.monotonic()
    try:
        result = check(args.image, args.model.resolve(), args.work)
    except CheckFailed as e:
        print(f"image check: FAILED: {e}", file=sys.stderr)
        return 1
    print(f"image check: ok in {time.monotonic() - t0:.0f} s: {json.dumps(result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
