"""The quality harness's results: per-arm rows, the markdown table, the plot.

Every row carries what a reader needs to decide between arms at equal cost:
accuracy per family and overall with a 95% Wilson interval, accuracy relative
to unpruned stock vLLM with a paired-bootstrap interval, visual tokens per
decoder layer (averaged over the layers: in-LLM pruning keeps every token
below its first stage) and KV-cache tokens per request (the same average,
text included), and an exact McNemar test against the product, TRIO in vLLM
at the default depth, at the same keep ratio (``stats``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .grid_scenes import Sample, normalize_answer
from .stats import mcnemar_exact, paired_relative_interval, wilson_interval

__all__ = ["ArmResult", "comparisons", "markdown", "summarise", "svg_plot"]


@dataclass
class ArmResult:
    """One arm at one ratio over every sample (lists aligned with the samples)."""

    arm: str
    ratio: float
    depth: int | None = None
    correct: list[bool] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)
    kept_visual: list[int] = field(default_factory=list)
    visual_per_layer: list[float] = field(default_factory=list)
    kv_tokens: list[float] = field(default_factory=list)
    seconds: float = 0.0
    #: Why the arm could not run at this ratio (the row then has no answers).
    infeasible: str = ""

    def add(
        self,
        sample: Sample,
        text: str,
        prompt_tokens: int,
        kept: int,
        per_layer: float,
        kv_tokens: float,
    ) -> None:
        self.answers.append(normalize_answer(text))
        self.correct.append(self.answers[-1] == normalize_answer(sample.answer))
        self.prompt_tokens.append(prompt_tokens)
        self.kept_visual.append(kept)
        self.visual_per_layer.append(per_layer)
        self.kv_tokens.append(kv_tokens)

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / max(1, len(self.correct))


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / max(1, len(xs))


def summarise(
    results: list[ArmResult],
    samples: list[Sample],
    families: Sequence[str],
    num_layers: int,
    product: str,
) -> list[dict[str, Any]]:
    """Table rows, each compared with ``stock-vllm`` and with ``product`` at its ratio."""
    stock = next((r for r in results if r.arm == "stock-vllm"), None)
    by_key = {(r.arm, r.ratio): r for r in results}
    rows = []
    for r in results:
        row: dict[str, Any] = {"arm": r.arm, "ratio": r.ratio, "depth": r.depth}
        row["n"] = len(r.correct)
        if r.infeasible:
            rows.append({**row, "infeasible": r.infeasible})
            continue
        n = len(r.correct)
        by_family = {}
        for fam in families:
            hits = [c for c, s in zip(r.correct, samples, strict=True) if s.family == fam]
            by_family[fam] = _mean(hits) if hits else None
        against = stock if r.ratio == 1.0 or r.arm == product else by_key.get((product, r.ratio))
        if r.ratio == 1.0 and r.arm == "stock-vllm":
            against = None
        test = None
        if against is not None and against is not r and not against.infeasible:
            only_arm, only_other, p = mcnemar_exact(r.correct, against.correct)
            test = {"against": against.arm, "only_arm": only_arm, "only_other": only_other, "p": p}
        row.update(
            {
                "accuracy": r.accuracy,
                "ci95": wilson_interval(sum(r.correct), n),
                "relative": r.accuracy / stock.accuracy if stock and stock.accuracy else None,
                "relative_ci95": (
                    paired_relative_interval(r.correct, stock.correct) if stock else None
                ),
                "agreement": (
                    _mean([a == b for a, b in zip(r.answers, stock.answers, strict=True)])
                    if stock
                    else None
                ),
                "mcnemar": test,
                "by_family": by_family,
                "mean_prompt_tokens": _mean(r.prompt_tokens),
                "mean_kept_visual": _mean(r.kept_visual),
                "mean_visual_per_layer": _mean(r.visual_per_layer),
                "mean_kv_tokens": _mean(r.kv_tokens),
                "side_pass_cost": (
                    (r.depth + 0.5) / num_layers
                    if r.depth is not None
                    and r.arm.startswith(("trio-vllm", "trio-layer", "trio-hf", "trio+ve"))
                    else None
                ),
                "seconds": r.seconds,
                "correct": "".join("1" if c else "0" for c in r.correct),
                "answers": r.answers,
            }
        )
        rows.append(row)
    return rows


def _pct(x: float | None) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _interval(ci: Sequence[float] | None) -> str:
    return "–" if not ci else f"{_pct(ci[0])}–{_pct(ci[1])}"


def _p(p: float) -> str:
    return f"{p:.2g}" if p >= 0.001 else f"{p:.0e}"


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any], families: Sequence[str]) -> str:
    """The results table plus the comparisons the quality issue asks for."""
    lines = [
        "# Quality under visual-token pruning",
        "",
        f"Model: `{meta['model']}` ({meta['model_kind']}); {meta['n']} eval questions "
        f"(seed {meta['seed']}), {meta['num_layers']} decoder layers, "
        f"{meta['visual_tokens']['mean']:.0f} visual tokens per image on average "
        f"({meta['visual_tokens']['min']}-{meta['visual_tokens']['max']}), greedy, "
        f"max_tokens={meta['max_tokens']}; command `{meta['command']}`, runtime "
        f"{meta['runtime_s'] / 60:.1f} min on {meta['host']} (load average "
        f"{meta['load_avg_start'][0]:.1f} at the start, {meta['load_avg_end'][0]:.1f} at the end).",
        "",
        "Accuracy in %. `k` = visual tokens at the input; `vis/layer` = visual tokens per "
        "decoder layer averaged over all layers (in-LLM pruning keeps every token below its "
        "first stage); `KV/req` = KV-cache tokens per request, same average, text included; "
        "`95% CI` = Wilson interval; `rel` = accuracy / unpruned stock vLLM, with its paired "
        "bootstrap 95% interval; `vs TRIO` = exact McNemar test against "
        f"`{meta['product']}` at the same ratio (unpruned arms: against stock vLLM): questions "
        "only this arm / only the other got right, and the two-sided p-value.",
        "",
        "| arm | ratio | k | vis/layer | KV/req | "
        + " | ".join(families)
        + " | overall | 95% CI | rel | rel 95% CI | vs TRIO | p |",
        "|---|---|---|---|---|" + "---|" * len(families) + "---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("infeasible"):
            blank = " | ".join("–" for _ in families)
            lines.append(
                f"| {r['arm']} | {r['ratio']:g} | – | – | – | {blank} | – | – | – | – | – | "
                f"infeasible: {r['infeasible']} |"
            )
            continue
        fams = " | ".join(_pct(r["by_family"][f]) for f in families)
        test = r["mcnemar"]
        vs = f"{test['only_arm']}/{test['only_other']}" if test else "–"
        p = _p(test["p"]) if test else "–"
        lines.append(
            f"| {r['arm']} | {r['ratio']:g} | {r['mean_kept_visual']:.1f} | "
            f"{r['mean_visual_per_layer']:.1f} | {r['mean_kv_tokens']:.1f} | {fams} | "
            f"{_pct(r['accuracy'])} | {_interval(r['ci95'])} | {_pct(r['relative'])} | "
            f"{_interval(r['relative_ci95'])} | {vs} | {p} |"
        )
    lines += ["", *comparisons(rows)]
    return "\n".join(lines) + "\n"


def comparisons(rows: list[dict[str, Any]]) -> list[str]:
    """HF vs vLLM unpruned; input pruning vs in-LLM pruning at equal ratio and equal cost."""
    ok = [r for r in rows if not r.get("infeasible")]
    by_key = {(r["arm"], r["ratio"]): r for r in ok}
    out: list[str] = []
    stock, hf = by_key.get(("stock-vllm", 1.0)), by_key.get(("hf-unpruned", 1.0))
    if stock and hf:
        same = sum(a == b for a, b in zip(stock["answers"], hf["answers"], strict=True))
        out += [
            "## Unpruned: HF vs stock vLLM",
            "",
            f"stock-vllm {_pct(stock['accuracy'])}%, hf-unpruned {_pct(hf['accuracy'])}%; "
            f"the same answer on {same}/{stock['n']} questions.",
            "",
        ]
    pairs = []
    for r in ok:
        if not r["arm"].startswith("trio-vllm@"):
            continue
        for ref_arm in (f"trio-ref@{r['depth']}", f"trio-ref-matched@{r['depth']}"):
            ref = by_key.get((ref_arm, r["ratio"]))
            if ref is None:
                continue
            only_in, only_ref, p = mcnemar_exact(
                [c == "1" for c in r["correct"]], [c == "1" for c in ref["correct"]]
            )
            pairs.append(
                f"| {r['depth']} | {r['ratio']:g} | {ref_arm} | {_pct(r['accuracy'])} | "
                f"{r['mean_visual_per_layer']:.1f} | {_pct(ref['accuracy'])} | "
                f"{ref['mean_visual_per_layer']:.1f} | "
                f"{100 * (r['accuracy'] - ref['accuracy']):+.1f} | {only_in}/{only_ref} | "
                f"{_p(p)} |"
            )
    if pairs:
        out += [
            "## Pruning at the input (trio-vllm@L) vs inside the LLM",
            "",
            "`trio-ref@L` keeps the same k entering layer L (more tokens per layer: all N "
            "below L); `trio-ref-matched@L` keeps fewer, so that its visual tokens per layer "
            "equal the input arm's. `Δ` = input − in-LLM in points; `only/only` = questions "
            "only the input arm / only the in-LLM arm got right; `p` = exact McNemar.",
            "",
            "| L | ratio | in-LLM arm | trio-vllm | vis/layer | in-LLM | vis/layer | Δ | "
            "only/only | p |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *pairs,
            "",
        ]
    return out


def svg_plot(rows: list[dict[str, Any]], title: str) -> str:
    """Accuracy against visual tokens per layer, one polyline per arm (plain SVG)."""
    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r.get("infeasible") or r["ratio"] == 1.0:
            continue
        series.setdefault(r["arm"], []).append((r["mean_visual_per_layer"], r["accuracy"]))
    unpruned = [r for r in rows if r["arm"] == "stock-vllm" and not r.get("infeasible")]
    xs = [x for pts in series.values() for x, _ in pts] or [1.0]
    x_max = max(xs) * 1.05
    width, height, left, bottom, top, right = 860, 520, 60, 50, 40, 230
    plot_w, plot_h = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + plot_w * x / x_max

    def sy(y: float) -> float:
        return top + plot_h * (1 - y)

    palette = [
        "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
        "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#000000", "#aec7e8",
        "#ff9896", "#98df8a", "#c5b0d5",
    ]  # fmt: skip
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{left}" y="22" font-size="14">{title}</text>',
        f'<line x1="{left}" y1="{sy(0)}" x2="{left + plot_w}" y2="{sy(0)}" stroke="black"/>',
        f'<line x1="{left}" y1="{sy(0)}" x2="{left}" y2="{sy(1)}" stroke="black"/>',
        f'<text x="{left + plot_w / 2 - 90}" y="{height - 12}">'
        "visual tokens per decoder layer</text>",
        f'<text x="12" y="{top - 8}">accuracy</text>',
    ]
    for tick in range(0, 11, 2):
        y = sy(tick / 10)
        parts.append(f'<text x="{left - 34}" y="{y + 4}">{tick * 10}%</text>')
        parts.append(f'<line x1="{left}" y1="{y}" x2="{left + plot_w}" y2="{y}" stroke="#eee"/>')
    for i in range(6):
        x = x_max * i / 5
        parts.append(f'<text x="{sx(x) - 10}" y="{sy(0) + 18}">{x:.0f}</text>')
    if unpruned:
        y = sy(unpruned[0]["accuracy"])
        parts.append(
            f'<line x1="{left}" y1="{y}" x2="{left + plot_w}" y2="{y}" stroke="black" '
            'stroke-dasharray="4 3"/>'
        )
    for i, (arm, pts) in enumerate(sorted(series.items())):
        colour = palette[i % len(palette)]
        pts.sort()
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for x, y in pts:
            parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{colour}"/>')
        ly = top + 16 * i
        parts.append(
            f'<line x1="{width - right + 15}" y1="{ly}" x2="{width - right + 35}" y2="{ly}" '
            f'stroke="{colour}" stroke-width="2"/>'
        )
        parts.append(f'<text x="{width - right + 40}" y="{ly + 4}">{arm}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
