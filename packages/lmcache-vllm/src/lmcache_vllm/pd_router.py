"""A small router for disaggregated prefill: each request is prefilled on one instance and
decoded on another.

    python -m lmcache_vllm.pd_router --prefill http://p:8100 --decode http://d:8200 --port 8000

Topology (one cache config for all, ``enable_p2p: true`` and one
``p2p_index_url``):

* prefill instances run vLLM with ``"kv_role": "kv_producer"``: they compute
  and store KV (DRAM, advertised in the index), and never load;
* decode instances run ``"kv_role": "kv_consumer"``: they load, never store;
* the router sends a completion request to a prefill instance with
  ``max_tokens=1`` (the prompt's KV is then computed and published), then the
  original request to a decode instance, which pulls the prompt's KV from the
  prefill instance's DRAM over NIXL (the p2p tier) and streams the answer back.

The KV moves by pull, not push: the decode instance reads exactly what it
lacks when it schedules the request, and a prefill instance needs to know
nothing of decode instances. Instances are picked round-robin.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

logger = logging.getLogger(__name__)

ROUTED = ("/v1/completions", "/v1/chat/completions")


class Router:
    def __init__(self, prefill: list[str], decode: list[str], timeout: float = 600.0) -> None:
        if not prefill or not decode:
            raise ValueError("give at least one --prefill and one --decode URL")
        self._prefill = itertools.cycle([u.rstrip("/") for u in prefill])
        self._decode = itertools.cycle([u.rstrip("/") for u in decode])
        self.timeout = timeout

    def prefill(self, path: str, body: dict) -> None:
        """Compute (and publish) the prompt's KV: the same request, one token, no stream."""
        req = dict(body, max_tokens=1, stream=False)
        req.pop("stream_options", None)
        if "max_completion_tokens" in req:
            req["max_completion_tokens"] = 1
        url = next(self._prefill) + path
        data = json.dumps(req).encode()
        r = urllib.request.Request(url, data, {"Content-Type": "application/json"})
        with urllib.request.urlopen(r, timeout=self.timeout) as resp:
            resp.read()

    def decode_url(self, path: str) -> str:
        return next(self._decode) + path


def make_handler(router: Router) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt: str, *args: object) -> None:
            logger.debug(fmt, *args)

        def _relay(self, req: urllib.request.Request) -> None:
            try:
                resp = urllib.request.urlopen(req, timeout=router.timeout)
            except urllib.error.HTTPError as e:
                resp = e
            with resp:
                self.send_response(resp.status)
                for k, v in resp.headers.items():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                while True:
                    block = resp.read1(65536) if hasattr(resp, "read1") else resp.read(65536)
                    if not block:
                        break
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")

        def do_GET(self) -> None:
            self._relay(urllib.request.Request(router.decode_url(self.path)))

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            path = self.path.split("?")[0]
            if path in ROUTED:
                try:
                    router.prefill(path, json.loads(raw))
                except Exception as e:  # a failed prefill: the decode instance computes it
                    logger.warning("prefill failed (%s); the decode instance computes it", e)
            req = urllib.request.Request(
                router.decode_url(self.path), raw, {"Content-Type": "application/json"}
            )
            self._relay(req)

    return Handler


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefill", action="append", required=True, help="a prefill instance URL")
    ap.add_argument("--decode", action="append", required=True, help="a decode instance URL")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    server = ThreadingHTTPServer(
        (args.host, args.port), make_handler(Router(args.prefill, args.decode))
    )
    logger.info("pd router on %s:%d", args.host, args.port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
