"""A fault-injecting OpenAI-compatible chat server (127.0.0.1 unless --host), for tests and benchmarks.

Real HTTP (stdlib ThreadingHTTPServer). Each prompt gets a scripted fault sequence chosen from its
content hash, so a run is reproducible whatever the request order:
  ok         a 3-step rationale that recommends the first candidates of the prompt
  429        Too Many Requests with Retry-After
  500        Internal Server Error
  slow       answers only after `slow_s` seconds (past the client's timeout)
  malformed  HTTP 200 whose body is not JSON
  truncated  a completion cut off mid-step (finish_reason="length")
  down       always 500: the row must end as a recorded failure
`stats()` reports per-prompt request and success counts, to prove nothing is lost or paid twice.

  python -m slim_ray.fault_server --port 8099     # stand-alone
  python -m slim_ray.fault_server --host 0.0.0.0 --port 8099 --no-faults   # every request answered
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import threading
import time
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# Fault sequences (one entry per attempt; the attempt after the last entry succeeds).
DEFAULT_SCRIPTS = [[], [], ["429"], ["500", "500"], ["slow"], ["malformed"], ["truncated"],
                   ["429", "malformed"], ["down"]]


def scripted_answer(prompt: str) -> str:
    candidates = re.findall(r"^- (.+?)(?: \[.*\])?$", prompt, re.M)
    picks = ", ".join(c for c in candidates[:5]) or "nothing"
    return ("Step 1: The user enjoys the genres and themes that recur in the history.\n"
            "Step 2: Drama, Comedy\n"
            f"Step 3: {picks}")


class FaultServer:
    def __init__(self, scripts: list[list[str]] | None = None, slow_s: float = 3.0,
                 retry_after_s: float = 0.2, port: int = 0, host: str = "127.0.0.1"):
        self.scripts = scripts if scripts is not None else DEFAULT_SCRIPTS
        self.slow_s, self.retry_after_s = slow_s, retry_after_s
        self.requests: Counter = Counter()
        self.successes: Counter = Counter()
        self.faults: dict[str, Counter] = defaultdict(Counter)
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer((host, port), self._handler())
        self.httpd.daemon_threads = True
        self.thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def script_for(self, prompt: str) -> list[str]:
        digest = int(hashlib.sha256(prompt.encode()).hexdigest(), 16)
        return self.scripts[digest % len(self.scripts)] if self.scripts else []

    def decide(self, prompt: str) -> tuple[str, str]:
        key = hashlib.sha256(prompt.encode()).hexdigest()[:16]
        with self.lock:
            attempt = self.requests[key]
            self.requests[key] += 1
        script = self.script_for(prompt)
        if script and script[0] == "down":
            action = "500"
        else:
            action = script[attempt] if attempt < len(script) else "ok"
        with self.lock:
            self.faults[key][action] += 1
            if action in ("ok", "truncated"):
                self.successes[key] += 1
        return key, action

    def stats(self) -> dict:
        with self.lock:
            return {"requests": dict(self.requests), "successes": dict(self.successes),
                    "faults": {k: dict(v) for k, v in self.faults.items()}}

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def _send(self, status: int, body: bytes, headers: dict | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout): that is the point of "slow"

            def do_GET(self) -> None:
                if self.path.rstrip("/").endswith("/models"):
                    self._send(200, json.dumps({"object": "list", "data": [
                        {"id": "fault-model", "object": "model", "owned_by": "tests"}]}).encode())
                elif self.path.rstrip("/").endswith("/stats"):
                    self._send(200, json.dumps(server.stats()).encode())
                else:
                    self._send(404, b'{"error": {"message": "not found"}}')

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                try:
                    request = json.loads(self.rfile.read(length))
                    prompt = request["messages"][-1]["content"]
                except (ValueError, KeyError, IndexError, TypeError):
                    self._send(400, b'{"error": {"message": "bad request"}}')
                    return
                _, action = server.decide(prompt)
                error = lambda code, msg: json.dumps({"error": {"message": msg, "type": code}}).encode()  # noqa: E731
                if action == "429":
                    self._send(429, error("rate_limit", "slow down"), {"Retry-After": str(server.retry_after_s)})
                elif action == "500":
                    self._send(500, error("server_error", "scripted failure"))
                elif action == "malformed":
                    self._send(200, b'{"id": "x", "choices": [{"message": ')
                else:
                    if action == "slow":
                        time.sleep(server.slow_s)
                    text = scripted_answer(prompt)
                    finish = "stop"
                    if action == "truncated":
                        text, finish = text[: len(text) // 3], "length"
                    body = {"id": "cmpl-fault", "object": "chat.completion", "created": int(time.time()),
                            "model": request.get("model", "fault-model"),
                            "choices": [{"index": 0, "finish_reason": finish,
                                         "message": {"role": "assistant", "content": text}}],
                            "usage": {"prompt_tokens": len(prompt) // 4, "completion_tokens": len(text) // 4,
                                      "total_tokens": (len(prompt) + len(text)) // 4}}
                    self._send(200, json.dumps(body).encode())

        return Handler

    def start(self) -> "FaultServer":
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> "FaultServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description="Fault-injecting OpenAI-compatible server (loopback by default).")
    parser.add_argument("--port", type=int, default=8099)
    parser.add_argument("--host", default="127.0.0.1", help="where to listen: loopback unless a test cluster's "
                        "node address needs it (the teacher-service test)")
    parser.add_argument("--slow-s", type=float, default=3.0)
    parser.add_argument("--no-faults", action="store_true", help="answer every request at once")
    args = parser.parse_args()
    server = FaultServer(scripts=[[]] if args.no_faults else None, slow_s=args.slow_s, port=args.port, host=args.host)
    print(f"fault server on {server.base_url}", flush=True)
    server.httpd.serve_forever()


if __name__ == "__main__":
    main()
