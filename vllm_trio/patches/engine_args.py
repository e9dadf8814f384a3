"""``vllm serve ... --plugin trio``: the argument group and its hf_overrides."""

from __future__ import annotations

import argparse
import functools
import logging
from collections.abc import Callable
from typing import Any

from . import Patch

logger = logging.getLogger("vllm_trio")


def _install() -> None:
    from vllm.engine.arg_utils import EngineArgs

    from .. import metrics
    from ..requests.cli import add_cli_args, trio_config_from_args
    from ..versions import unsupported_reason

    original_add: Callable[..., Any] = EngineArgs.add_cli_args
    original_from: Callable[..., Any] = EngineArgs.from_cli_args.__func__  # type: ignore[attr-defined]

    @functools.wraps(original_add)
    def add_cli_args_with_trio(parser, *args, **kwargs):
        parser = original_add(parser, *args, **kwargs)
        add_cli_args(parser)
        return parser

    @functools.wraps(original_from)
    def from_cli_args_with_trio(cls, args: argparse.Namespace):
        engine_args = original_from(cls, args)
        trio = trio_config_from_args(args)
        if trio is None:
            return engine_args
        reason = unsupported_reason()
        if reason is not None:
            raise RuntimeError(reason)
        engine_args.hf_overrides = trio.hf_overrides(engine_args.hf_overrides or None)
        # Written back too: with several API server processes (vLLM's
        # `--api-server-count`, implied by `--data-parallel-size`) each child
        # rebuilds its engine args from these `args` before it has loaded
        # plugins, i.e. through the unwrapped `from_cli_args`.
        args.hf_overrides = engine_args.hf_overrides
        metrics.enable_cross_process()  # before any engine process is started
        logger.info(
            "vllm-trio: TRIO pruning on (default keep_ratio=%s, depth=%s, mode=%s)",
            trio.keep_ratio,
            trio.depth,
            trio.mode,
        )
        return engine_args

    EngineArgs.add_cli_args = staticmethod(add_cli_args_with_trio)  # type: ignore[method-assign]
    EngineArgs.from_cli_args = classmethod(from_cli_args_with_trio)  # type: ignore[method-assign]


PATCH = Patch(
    name="engine_args",
    module="vllm.engine.arg_utils",
    targets=("vllm.engine.arg_utils.EngineArgs.add_cli_args", "EngineArgs.from_cli_args"),
    why="vLLM has no hook for a plugin's own `vllm serve` arguments; `--plugin trio` "
    "and `--trio-*` become TRIO's hf_overrides here",
    remove_when="vLLM lets general plugins add CLI arguments and engine-arg overrides",
    install=_install,
)
