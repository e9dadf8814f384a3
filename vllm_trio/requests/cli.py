"""The ``vllm-trio`` argument group of ``vllm serve`` and what it turns into."""

from __future__ import annotations

import argparse

from ..config import DEFAULT_DEPTH, DEFAULT_KEEP_RATIO, DEFAULT_MODE, TRIO_MODES, TrioConfig

PLUGIN_NAME = "trio"
GROUP_TITLE = "vllm-trio"


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """Add the ``vllm-trio`` group (shown by ``vllm serve --help=vllm-trio``).

    ``--plugin`` may already exist, defined by another plugin: then ``trio``
    joins its choices instead of the whole group being skipped (which used to
    hide ``--trio-keep-ratio`` as well).
    """
    if any(g.title == GROUP_TITLE for g in parser._action_groups):
        return
    group = parser.add_argument_group(
        GROUP_TITLE, "TRIO visual-token pruning for LLaVA-NeXT (package vllm-trio)."
    )
    existing = next((a for a in parser._actions if a.dest == "plugin"), None)
    if existing is None:
        group.add_argument(
            "--plugin",
            action="append",
            choices=[PLUGIN_NAME],
            default=None,
            help="Switch on an installed vLLM plugin. `--plugin trio` serves LLaVA-NeXT "
            "with TRIO pruning: each image keeps a fraction of its visual tokens, chosen "
            'per request with extra_body={"vllm_xargs": {"keep_ratio": r}}.',
        )
    elif existing.choices is not None and PLUGIN_NAME not in existing.choices:
        existing.choices = [*existing.choices, PLUGIN_NAME]
    group.add_argument(
        "--trio-keep-ratio",
        type=float,
        default=None,
        help=f"Default fraction of visual tokens kept per image, in (0, 1] "
        f"(default {DEFAULT_KEEP_RATIO}). 1 serves exactly as stock vLLM.",
    )
    group.add_argument(
        "--trio-depth",
        type=int,
        default=None,
        help=f"Decoder layer L whose input is scored by TRIO's side pass (default "
        f"{DEFAULT_DEPTH}); the side pass costs about (L + 0.5)/num_layers of a prefill.",
    )
    group.add_argument(
        "--trio-mode",
        choices=TRIO_MODES,
        default=None,
        help=f"Where pruning takes effect (default {DEFAULT_MODE}): `input` shortens the "
        "prompt, so kept tokens never see the dropped ones; `layer` shortens it as much "
        "but hands the side pass's full-context states of the kept tokens (and of the "
        "text after a single image) to decoder layer L, as the paper prunes inside the LLM.",
    )


def plugin_selected(args: argparse.Namespace) -> bool:
    """Whether ``--plugin trio`` was given (``--plugin`` may hold several names)."""
    value = getattr(args, "plugin", None) or []
    names = [value] if isinstance(value, str) else list(value)
    return PLUGIN_NAME in names


def trio_config_from_args(args: argparse.Namespace) -> TrioConfig | None:
    """The TRIO settings selected on the command line, or None without ``--plugin trio``."""
    ratio = getattr(args, "trio_keep_ratio", None)
    depth = getattr(args, "trio_depth", None)
    mode = getattr(args, "trio_mode", None)
    if not plugin_selected(args):
        if ratio is not None or depth is not None or mode is not None:
            raise ValueError("--trio-keep-ratio/--trio-depth/--trio-mode need --plugin trio")
        return None
    return TrioConfig(
        keep_ratio=DEFAULT_KEEP_RATIO if ratio is None else ratio,
        depth=DEFAULT_DEPTH if depth is None else depth,
        mode=DEFAULT_MODE if mode is None else mode,
    )
