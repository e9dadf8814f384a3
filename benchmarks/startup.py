"""Start-up cost of the installed plugin for stock serving (issue: "free for stock").

Two measurements, each alternating "plugin loaded" and "no plugin" runs so that
load drift on a shared machine hits both arms alike:

* ``load_general_plugins()`` in a fresh interpreter that has already imported
  vLLM (what every vLLM process pays for plugins), and which vLLM model modules
  it leaves loaded;
* ``vllm serve`` of a stock model (the tiny LLaVA-NeXT checkpoint, no
  ``--plugin trio``) from process start to ``/health`` = 200.

"No plugin" is ``VLLM_PLUGINS=`` (vLLM's own switch: load none), the same
process as without the package installed. ``--other-checkout DIR`` adds a
third arm: the plugin imported from another checkout of this repository (for
example an older commit, ``git worktree add /tmp/old <commit>``), to measure a
change.

    python -m benchmarks.startup [--repeats 3] [--other-checkout DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import ARTIFACTS, save
from trio_dev.checkpoints import build_checkpoint
from trio_dev.local_server import vllm_server_process

_PROBE = """
import json, sys, time
import vllm, vllm.model_executor.models
from vllm.plugins import load_general_plugins
before = set(sys.modules)
t = time.perf_counter()
load_general_plugins()
seconds = time.perf_counter() - t
models = sorted(m for m in set(sys.modules) - before if m.startswith("vllm.model_executor.models."))
print(json.dumps({"seconds": seconds, "model_modules": models}))
"""


def _env(with_plugin: bool, checkout: Path | None) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("VLLM_PLUGINS", None)
    if not with_plugin:
        env["VLLM_PLUGINS"] = ""
    if checkout is not None:
        env["PYTHONPATH"] = str(checkout)
    return env


def plugin_load(with_plugin: bool, checkout: Path | None = None) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE],
        env=_env(with_plugin, checkout),
        capture_output=True,
        text=True,
        cwd=tempfile.gettempdir(),  # not this checkout, unless asked for
    )
    out.check_returncode()
    return json.loads(out.stdout.strip().splitlines()[-1])


def serve_to_healthy(ckpt: Path, with_plugin: bool, log: Path) -> float:
    env = {"VLLM_PLUGINS": ""} if not with_plugin else {}
    start = time.monotonic()
    saved = os.environ.pop("VLLM_PLUGINS", None)
    try:
        with vllm_server_process(ckpt, [], log, env=env):
            return time.monotonic() - start
    finally:
        if saved is not None:
            os.environ["VLLM_PLUGINS"] = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--other-checkout", type=Path, default=None)
    args = ap.parse_args()
    ckpt = build_checkpoint(ARTIFACTS / "ckpt-tiny", preset="tiny")
    runs: dict[str, dict[str, list]] = {
        arm: {"load_s": [], "serve_s": []} for arm in ("with_plugin", "no_plugin")
    }
    if args.other_checkout is not None:
        runs["other_checkout"] = {"load_s": []}
    modules: dict[str, list[str]] = {}
    logs = Path(tempfile.mkdtemp(prefix="startup-"))
    here = Path(__file__).resolve().parents[1]
    for i in range(args.repeats):
        for arm, with_plugin in (("with_plugin", True), ("no_plugin", False)):
            probe = plugin_load(with_plugin, here)
            runs[arm]["load_s"].append(probe["seconds"])
            modules[arm] = probe["model_modules"]
            runs[arm]["serve_s"].append(serve_to_healthy(ckpt, with_plugin, logs / f"{arm}{i}.log"))
        if args.other_checkout is not None:
            probe = plugin_load(True, args.other_checkout.resolve())
            runs["other_checkout"]["load_s"].append(probe["seconds"])
            modules["other_checkout"] = probe["model_modules"]
    summary = {
        arm: {key: statistics.median(values) for key, values in r.items()}
        for arm, r in runs.items()
    }
    payload = {
        "what": "stock `vllm serve` (tiny LLaVA-NeXT, no --plugin trio) and "
        "load_general_plugins(), with vllm-trio's plugin loaded vs VLLM_PLUGINS= (none)",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "repeats": args.repeats,
        "other_checkout": None if args.other_checkout is None else str(args.other_checkout),
        "runs": runs,
        "median": summary,
        "model_modules_loaded_by_plugins": modules,
    }
    print(json.dumps(payload["median"], indent=2))
    print("model modules imported by load_general_plugins():", modules)
    save("startup", payload)


if __name__ == "__main__":
    main()
