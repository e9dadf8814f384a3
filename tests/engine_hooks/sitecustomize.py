"""Test-only hook, loaded by the servers of ``tests/test_faults.py`` through PYTHONPATH.

With ``TRIO_TEST_SIDE_PASS_GATE=<dir>`` set, every process of the server
(API server, engine core, workers) wraps ``LlamaSidePass.select`` and
``LlamaSidePass.select_batch`` (the images of one step scored together) once
``vllm_trio.binding.side_pass`` is imported: while the file ``<dir>/hold`` exists,
a side pass that starts writes ``<dir>/started-<n>`` and waits (at most
``HOLD_MAX_S``) until ``hold`` is removed, then runs normally. So a test can
act (disconnect a client, send SIGTERM) at a moment when a side pass is
provably running inside the engine's step. Without ``hold`` nothing changes.
No product code knows about it.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import time
from pathlib import Path

GATE_ENV = "TRIO_TEST_SIDE_PASS_GATE"
HOLD_MAX_S = 120.0
TARGET = "vllm_trio.binding.side_pass"


def _gated(select, gate: Path):
    def select_behind_gate(self, *args, **kwargs):
        hold = gate / "hold"
        if hold.exists():
            (gate / f"started-{time.monotonic_ns()}").touch()
            deadline = time.monotonic() + HOLD_MAX_S
            while hold.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
        return select(self, *args, **kwargs)

    return select_behind_gate


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds ``vllm_trio.binding.side_pass`` as the path finder does; patches it once executed."""

    def __init__(self, gate: Path) -> None:
        self.gate = gate

    def find_spec(self, name, path, target=None):
        if name != TARGET or path is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module
        gate = self.gate

        def exec_module(module):
            load(module)
            for name in ("select", "select_batch"):
                setattr(
                    module.LlamaSidePass, name, _gated(getattr(module.LlamaSidePass, name), gate)
                )

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get(GATE_ENV):
    sys.meta_path.insert(0, _PatchOnImport(Path(os.environ[GATE_ENV])))
