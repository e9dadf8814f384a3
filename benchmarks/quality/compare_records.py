"""Paired comparison of two scene models from their training records.

    .venv/bin/python -m benchmarks.quality.compare_records NEW/TRAINING.json OLD/TRAINING.json

Every ``train_grid`` run ends by answering the same first ``eval_n`` eval
questions (HF float32, saved weights) and records each answer
(``eval_answers``). Two recipes are compared on exactly those questions:
accuracy with its Wilson interval, per family, and the exact McNemar test over
the questions only one of the two got right. The full harness table is the
evidence for a shipped model; this is how a recipe change is decided before
spending it.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .grid_scenes import FAMILIES, make_split
from .stats import mcnemar_exact, wilson_interval


def correctness(record: dict[str, Any], samples: Sequence[Any]) -> list[bool]:
    """Per eval question, whether the recorded answer is ``samples``' expected one."""
    return [a == s.answer for a, s in zip(record["eval_answers"], samples, strict=True)]


def compare(new: dict[str, Any], old: dict[str, Any]) -> dict[str, Any]:
    """Accuracies, intervals, per-family accuracies and McNemar of ``new`` vs ``old``."""
    sizes = (len(new["eval_answers"]), len(old["eval_answers"]))
    seeds = (new["config"]["seed"], old["config"]["seed"])
    if sizes[0] != sizes[1] or seeds[0] != seeds[1]:
        raise ValueError(
            f"the records answered different questions ({sizes[0]} and {sizes[1]}, "
            f"seeds {seeds[0]} and {seeds[1]})"
        )
    samples = make_split("eval", sizes[0], seeds[0])
    a, b = correctness(new, samples), correctness(old, samples)
    only_new, only_old, p = mcnemar_exact(a, b)

    def family(hits: Sequence[bool]) -> dict[str, float]:
        out = {}
        for f in FAMILIES:
            got = [h for h, s in zip(hits, samples, strict=True) if s.family == f]
            if got:
                out[f] = sum(got) / len(got)
        return out

    return {
        "n": len(a),
        "new": {"accuracy": sum(a) / len(a), "ci95": wilson_interval(sum(a), len(a))},
        "old": {"accuracy": sum(b) / len(b), "ci95": wilson_interval(sum(b), len(b))},
        "per_family": {"new": family(a), "old": family(b)},
        "only_new": only_new,
        "only_old": only_old,
        "p": p,
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("new", type=Path, help="TRAINING.json of the candidate")
    ap.add_argument("old", type=Path, help="TRAINING.json to compare against")
    args = ap.parse_args(argv)
    result = compare(*(json.loads(p.read_text()) for p in (args.new, args.old)))
    for side in ("new", "old"):
        lo, hi = result[side]["ci95"]
        per = " ".join(f"{f} {100 * v:.1f}" for f, v in result["per_family"][side].items())
        print(
            f"{side}: {100 * result[side]['accuracy']:.1f}% ({100 * lo:.1f}-{100 * hi:.1f}); {per}"
        )
    print(
        f"{result['n']} questions: only new right {result['only_new']}, "
        f"only old right {result['only_old']}, exact McNemar p = {result['p']:.3g}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
