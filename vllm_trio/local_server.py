"""Start and stop a real ``vllm serve`` on 127.0.0.1 (tests, benchmarks, the demo)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import requests

#: Small, exact (float32) settings used by tests and the demo on a 2-core CPU.
TEST_SERVER_ARGS = (
    "--max-model-len", "2048", "--kv-cache-memory-bytes", str(64 << 20),
    "--enforce-eager", "--dtype", "float32", "--limit-mm-per-prompt", '{"image": 2}',
)  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def vllm_server(
    model: Path,
    extra_args: list[str],
    log_path: Path,
    timeout_s: float = 240,
    base_args: tuple[str, ...] = TEST_SERVER_ARGS,
) -> Iterator[str]:
    """Run ``vllm serve model *base_args *extra_args``; yield its base URL once healthy.

    The server is the ``vllm`` console script next to this interpreter, so it
    runs exactly what a user types, plugin loading included.
    """
    port = free_port()
    vllm_bin = Path(sys.executable).with_name("vllm")
    cmd = [
        str(vllm_bin), "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
        *base_args, *extra_args,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {proc.returncode}; see {log_path}")
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"vllm serve not healthy after {timeout_s}s; see {log_path}")
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
