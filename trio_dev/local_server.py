"""Start and stop a real ``vllm serve`` on 127.0.0.1 and build the image chat
requests sent to it (tests, benchmarks, the demo)."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import requests
from PIL import Image

#: Small, exact (float32) settings used by tests and the demo on a 2-core CPU.
TEST_SERVER_ARGS = (
    "--max-model-len", "2048", "--kv-cache-memory-bytes", str(64 << 20),
    "--enforce-eager", "--dtype", "float32", "--limit-mm-per-prompt", '{"image": 2}',
)  # fmt: skip


def cpu_worker_env(num_workers: int) -> dict[str, str]:
    """Environment for ``num_workers`` vLLM CPU workers here (TP ranks or DP engines).

    vLLM binds each CPU worker's OpenMP threads to one NUMA node and refuses
    to start with fewer nodes than workers (a laptop, this 2-core VM), so the
    cores this process may use are named per worker, split evenly. Workers are
    spawned, not forked from a process that may already run engine threads.
    """
    cores = sorted(os.sched_getaffinity(0))
    per_worker = max(1, len(cores) // num_workers)
    groups = [cores[(r * per_worker) % len(cores) :][:per_worker] for r in range(num_workers)]
    return {
        "VLLM_CPU_OMP_THREADS_BIND": "|".join(",".join(map(str, g)) for g in groups),
        "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    """A healthy ``vllm serve`` process started by :func:`vllm_server_process`.

    Reliability tests need more than the URL: the process tree (resident
    memory across a soak run), the process itself (SIGTERM with requests in
    flight) and the log (no traceback on shutdown).
    """

    url: str
    process: subprocess.Popen
    log_path: Path
    #: Descendants still alive after the server exited, killed by :meth:`stop`.
    leftover_pids: list[int] = field(default_factory=list)

    def rss_bytes(self) -> int:
        """Resident memory of the API server and all its descendants (engine, workers)."""
        import psutil

        try:
            root = psutil.Process(self.process.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0
        total = 0
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                total += proc.memory_info().rss
        return total

    def metrics(self) -> dict[str, float]:
        """vLLM's Prometheus gauges and counters, summed over label sets."""
        return parse_metrics(requests.get(f"{self.url}/metrics", timeout=10).text)

    def stop(self, timeout_s: float = 60, grace_s: float = 10) -> int:
        """SIGTERM (what ``docker stop`` and Kubernetes send); SIGKILL after ``timeout_s``.

        Descendants that outlive the server by ``grace_s`` (vLLM's engine core
        ignores SIGTERM while it is still starting, and is then orphaned) are
        killed too and recorded in :attr:`leftover_pids`, so a test run never
        leaks engines onto the machine.
        """
        import psutil

        if self.process.poll() is None:
            try:
                descendants = psutil.Process(self.process.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                descendants = []
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            _, alive = psutil.wait_procs(descendants, timeout=grace_s)
            for proc in alive:
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.kill()
            self.leftover_pids = [proc.pid for proc in alive]
        return self.process.returncode


_METRIC_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
_METRIC_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="([^"]*)"')


def metric_samples(text: str) -> Iterator[tuple[str, dict[str, str], float]]:
    """``(name, labels, value)`` of every sample in Prometheus text format."""
    for line in text.splitlines():
        match = _METRIC_LINE.match(line)
        if match is None:
            continue
        try:
            value = float(match.group(3))
        except ValueError:
            continue
        yield match.group(1), dict(_METRIC_LABEL.findall(match.group(2) or "")), value


def parse_metrics(text: str) -> dict[str, float]:
    """``name -> value`` from Prometheus text format, summing a metric's label sets."""
    out: dict[str, float] = {}
    for name, _, value in metric_samples(text):
        out[name] = out.get(name, 0.0) + value
    return out


@contextlib.contextmanager
def vllm_server_process(
    model: Path,
    extra_args: list[str],
    log_path: Path,
    timeout_s: float = 600,
    base_args: tuple[str, ...] = TEST_SERVER_ARGS,
    env: dict[str, str] | None = None,
) -> Iterator[RunningServer]:
    """Run ``vllm serve model *base_args *extra_args``; yield it once healthy.

    The server is the ``vllm`` console script next to this interpreter, so it
    runs exactly what a user types, plugin loading included. On exit it gets
    SIGTERM (then SIGKILL after 30 s) unless the caller already stopped it.
    """
    port = free_port()
    vllm_bin = Path(sys.executable).with_name("vllm")
    cmd = [
        str(vllm_bin), "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
        *base_args, *extra_args,
    ]  # fmt: skip
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    full_env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env)
    server = RunningServer(url=f"http://127.0.0.1:{port}", process=proc, log_path=log_path)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {proc.returncode}; see {log_path}")
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(f"{server.url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"vllm serve not healthy after {timeout_s}s; see {log_path}")
            time.sleep(1)
        yield server
    finally:
        server.stop(timeout_s=30)


@contextlib.contextmanager
def vllm_server(
    model: Path,
    extra_args: list[str],
    log_path: Path,
    timeout_s: float = 240,
    base_args: tuple[str, ...] = TEST_SERVER_ARGS,
) -> Iterator[str]:
    """Like :func:`vllm_server_process`, yielding only the base URL."""
    with vllm_server_process(model, extra_args, log_path, timeout_s, base_args) as server:
        yield server.url


def png_data_url(image: Image.Image) -> str:
    """``image`` as an RGB PNG ``data:`` URL, the way OpenAI clients (and lmms-eval) send it."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_chat_messages(question: str, images: Sequence[Image.Image]) -> list[dict]:
    """One user turn: every image first (data URLs), then the question."""
    parts: list[dict] = [
        {"type": "image_url", "image_url": {"url": png_data_url(im)}} for im in images
    ]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": question}]}]
