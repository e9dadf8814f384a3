"""Why TRIO at the input keeps or loses an answer: its knobs, one at a time.

    .venv/bin/python -m benchmarks.quality.diagnose [--n 1002] [--ratio 0.111] \
        [--depths 0 1 2 4] [--positions ref final4 final1] [--taus 0.8 1.01]

Issue 10's item 4: where TRIO at the input falls below the baselines, find
out why (per family, depth, loss positions including the final one, NMS tau).
For every variant this scores the eval questions of the shipped grid-scenes
model on the HF path (the same pruned prompt as the vLLM plugin feeds the
LLM, ``HFRunner.pruned_embeds``) and reports, per family:

* accuracy of the greedy answer, and its exact McNemar test against the
  variant the product runs today (``--baseline``);
* evidence recall: the share of questions whose evidence tokens
  (``evidence.evidence_tokens``: the objects the question names, the tokens
  the model's attention was trained to read) all survive, and the mean share
  of evidence tokens kept. Recall is what a selection controls; accuracy also
  depends on what the model makes of the kept tokens.

The [CLS]-attention and diversity baselines are scored the same way, for
their recall. Writes ``benchmarks/results/trio_diagnosis.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trio_dev.baselines import cls_attention_select, diversity_select
from trio_dev.hf_adapter import core_fns_from_hf
from vllm_trio.core import TrioParams, num_kept_tokens, select_visual_tokens

from .evidence import evidence_tokens, packed_index
from .grid_scenes import Turn, normalize_answer
from .harness import HFRunner, Prepared, answer_token_budget, log
from .shipped import MODEL_DIR, scene_generator, training_record
from .stats import mcnemar_exact

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "trio_diagnosis"

#: Loss positions: ``ref`` = the reference's (the 4 positions before the last,
#: which in the vicuna template are the tokens of "ASSISTANT"), ``final4`` =
#: the last 4 including the final one, ``final1`` = the final position only
#: (the one whose logits are the answer's).
POSITIONS: dict[str, tuple[int, bool]] = {
    "ref": (4, False),
    "final4": (4, True),
    "final1": (1, True),
}


@dataclass
class Variant:
    """One selection rule and what it did on every question."""

    name: str
    correct: list[bool] = field(default_factory=list)
    all_evidence: list[bool] = field(default_factory=list)
    evidence_share: list[float] = field(default_factory=list)
    families: list[str] = field(default_factory=list)
    kept_kind: list[tuple[float, float, float]] = field(default_factory=list)
    seconds: float = 0.0

    def add(
        self, family: str, right: bool, keep: torch.Tensor, evidence: list[int], kinds: torch.Tensor
    ) -> None:
        """One question; ``kinds`` labels every visual token (``token_kinds``)."""
        kept = set(keep.tolist())
        self.families.append(family)
        self.correct.append(right)
        hit = sum(e in kept for e in evidence)
        self.all_evidence.append(hit == len(evidence))
        self.evidence_share.append(hit / len(evidence) if evidence else 1.0)
        k = kinds[keep]
        self.kept_kind.append(tuple(float((k == c).float().mean()) for c in range(3)))


#: ``token_kinds`` labels: base-tile token, image newline, a high-resolution
#: token with something drawn on its cell (object or letter); everything else
#: (empty high-resolution cells) is 3.
BASE, NEWLINE, DRAWN, EMPTY = range(4)


def token_kinds(prep: Prepared) -> torch.Tensor:
    """``[N]`` kind of each visual token of ``prep`` (``BASE`` .. ``EMPTY``)."""
    tile = prep.layout.tile
    kinds = torch.full_like(tile, EMPTY)
    kinds[tile == 0] = BASE
    kinds[tile < 0] = NEWLINE
    scene = prep.sample.scene
    drawn = [packed_index(scene, cell) for cell in scene.cells]
    kinds[torch.tensor(drawn, dtype=torch.long)] = DRAWN
    return kinds


def trio_keep(
    hf: HFRunner, prep: Prepared, hidden: torch.Tensor, k: int, depth: int, params: TrioParams
) -> torch.Tensor:
    """TRIO's kept visual indices, scored on ``hidden`` (the states entering ``depth``)."""
    fns = core_fns_from_hf(hf.model, depth, prep.embeds.shape[0])
    return select_visual_tokens(hidden, prep.visual_rows, k, *fns, params=params).keep


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def summary(v: Variant, families: Sequence[str], base: Variant | None) -> dict[str, object]:
    """Per-family accuracy and recall, and the McNemar test against ``base``."""
    row: dict[str, object] = {"variant": v.name, "seconds": round(v.seconds, 1)}
    for fam in families:
        idx = [i for i, f in enumerate(v.families) if f == fam]
        row[f"acc_{fam}"] = mean([v.correct[i] for i in idx])
        row[f"recall_{fam}"] = mean([v.all_evidence[i] for i in idx])
    row["acc"] = mean(v.correct)
    row["correct"] = "".join("1" if c else "0" for c in v.correct)  # for other pairings
    row["recall_all"] = mean(v.all_evidence)
    row["evidence_share"] = mean(v.evidence_share)
    for c, name in enumerate(("base", "newline", "drawn")):
        row[f"kept_{name}"] = mean([kk[c] for kk in v.kept_kind])
    if base is not None and base is not v:
        row["only_this"], row["only_base"], row["p"] = mcnemar_exact(v.correct, base.correct)
    return row


def markdown(rows: list[dict[str, object]], families: Sequence[str], meta: dict) -> str:
    head = [
        "variant", *families, "overall", "all evidence kept", "evidence share",
        "kept: base / newline / drawn", "vs base", "p",
    ]  # fmt: skip
    lines = [
        "# Why TRIO at the input keeps or loses answers",
        "",
        f"Model `{meta['model']}`; {meta['n']} eval questions; keep ratio {meta['ratio']} "
        f"(k = {meta['mean_k']:.1f} of {meta['mean_n']:.1f} visual tokens on average); "
        f"command `{meta['command']}`, {meta['minutes']:.1f} min on {meta['cores']} CPU cores.",
        "",
        "Cells: accuracy % / % of questions whose evidence tokens all survive. "
        "`evidence share` = mean share of evidence tokens kept; `vs base` = questions only "
        f"this variant / only `{meta['baseline']}` got right, exact McNemar `p`; `kept` = % of "
        "the kept tokens that are base-tile tokens, image newlines, and high-resolution tokens "
        "with an object or letter drawn on them (the rest are empty cells).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        cells = [str(r["variant"])]
        for fam in families:
            cells.append(f"{100 * r[f'acc_{fam}']:.1f} / {100 * r[f'recall_{fam}']:.0f}")
        cells += [f"{100 * r['acc']:.1f}", f"{100 * r['recall_all']:.1f}"]
        cells.append(f"{100 * r['evidence_share']:.1f}")
        kinds = ("base", "newline", "drawn")
        cells.append(" / ".join(f"{100 * r[f'kept_{n}']:.0f}" for n in kinds))
        if "p" in r:
            cells += [f"{r['only_this']}/{r['only_base']}", f"{r['p']:.2g}"]
        else:
            cells += ["–", "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.quality.diagnose", description=__doc__)
    ap.add_argument("--n", type=int, default=1002)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ratio", type=float, default=0.111)
    ap.add_argument("--depths", type=int, nargs="+", default=[0, 1, 2, 4])
    ap.add_argument("--positions", nargs="+", default=list(POSITIONS), choices=list(POSITIONS))
    ap.add_argument("--taus", type=float, nargs="+", default=[0.8, 1.01], help=">1: no NMS")
    ap.add_argument("--baseline", default="d2-ref-t0.8", help="variant of the McNemar tests")
    ap.add_argument("--model", default=str(MODEL_DIR))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model_dir = Path(args.model)
    generator = scene_generator(training_record(model_dir))
    if generator.__name__ != "benchmarks.quality.grid_scenes":
        raise SystemExit("diagnose needs a grid-scenes model (its evidence tokens are known)")
    samples = generator.make_split("eval", args.n, args.seed)
    hf = HFRunner(model_dir, max_new_tokens=1, fastv_k=1)
    hf.max_new_tokens = answer_token_budget(hf.tokenizer, samples)
    if any(not 0 <= d < hf.num_layers for d in args.depths):
        raise SystemExit(f"depths must be in [0, {hf.num_layers - 1}]")

    selectors: dict[str, Callable[[Prepared, list[torch.Tensor], int], torch.Tensor]] = {}
    for depth in args.depths:
        for pos in args.positions:
            n_pos, final = POSITIONS[pos]
            for tau in args.taus:
                params = TrioParams(tau=tau, num_loss_positions=n_pos, include_final_position=final)

                def sel(p: Prepared, hs: list[torch.Tensor], k: int, d=depth, pr=params):
                    return trio_keep(hf, p, hs[d], k, d, pr)

                selectors[f"d{depth}-{pos}-t{tau:g}"] = sel
    selectors["cls-attn"] = lambda p, hs, k: cls_attention_select(p.cls_deep, k, p.layout)
    selectors["diversity"] = lambda p, hs, k: diversity_select(p.embeds[p.visual_rows], k)
    if args.baseline not in selectors:
        raise SystemExit(f"--baseline {args.baseline!r} is not among {sorted(selectors)}")
    variants = {name: Variant(name) for name in selectors}

    ks, ns = [], []
    for i, sample in enumerate(samples):
        prep = hf.prepare(i, sample)
        k = num_kept_tokens(prep.num_visual, args.ratio)
        ks.append(k)
        ns.append(prep.num_visual)
        turn = Turn(sample.question, sample.answer, sample.family)
        evidence = evidence_tokens(sample.scene, turn)
        kinds = token_kinds(prep)
        with torch.no_grad():
            out = hf.lm(inputs_embeds=prep.embeds[None], output_hidden_states=True)
        hidden = [h[0] for h in out.hidden_states]
        for name, select in selectors.items():
            t0 = time.perf_counter()
            keep = select(prep, hidden, k)
            text = hf.decode(hf.generate(hf.pruned_embeds(prep, keep)))
            right = normalize_answer(text) == normalize_answer(sample.answer)
            v = variants[name]
            v.add(sample.family, right, keep, evidence, kinds)
            v.seconds += time.perf_counter() - t0
        if (i + 1) % 100 == 0:
            log(start, f"{i + 1}/{len(samples)} questions")

    families = list(generator.FAMILIES)
    base = variants[args.baseline]
    rows = [summary(v, families, base) for v in variants.values()]
    meta = {
        "model": str(model_dir.relative_to(ROOT) if model_dir.is_relative_to(ROOT) else model_dir),
        "n": len(samples),
        "ratio": args.ratio,
        "mean_k": mean(ks),
        "mean_n": mean(ns),
        "baseline": args.baseline,
        "command": "python -m benchmarks.quality.diagnose "
        + " ".join(a for a in (argv if argv is not None else sys.argv[1:])),
        "minutes": (time.perf_counter() - start) / 60,
        "cores": os.cpu_count(),
        "threads": args.threads,
        "torch": torch.__version__,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(rows, families, meta))
    log(start, f"wrote {out}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
