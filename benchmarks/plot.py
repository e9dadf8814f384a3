"""Figures for README from the saved benchmark results (no engine is started).

Reads ``benchmarks/results/{prefill,throughput,quality}.json`` (whichever
exist) and writes ``benchmarks/results/performance.png`` (prefill speed-up,
KV-cache reduction and throughput against stock vLLM, per keep ratio) and
``benchmarks/results/quality.png`` (accuracy relative to unpruned stock vLLM
per arm and keep ratio). Needs matplotlib: ``pip install -e '.[bench]'``.

    python benchmarks/plot.py
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
from common import RESULTS


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def performance(prefill: dict[str, Any] | None, throughput: dict[str, Any] | None) -> Path | None:
    """Ratios against stock vLLM at each keep ratio: prefill, end to end, KV, req/s."""
    panels = []
    if prefill:
        trio = [r for r in prefill["rows"] if r["engine"] == "trio"]
        images = sorted({r["image"] for r in trio})
        for key, title in (
            ("speedup", "prefill speed-up (x)"),
            ("e2e_speedup", "end-to-end speed-up (x)"),
            ("kv_x", "KV cache reduction (x)"),
        ):
            series = {
                img: [(r["ratio"], r[key]) for r in trio if r["image"] == img] for img in images
            }
            panels.append((title, series))
    if throughput:
        # vllm bench serve runs (benchmarks/throughput.py), eager mode, one
        # line per concurrency; throughput_x is against stock at that concurrency.
        rows = [r for r in throughput["rows"] if r["engine"] == "trio" and r["mode"] == "eager"]
        series = {
            f"{c} concurrent": [
                (r["ratio"], r["throughput_x"]) for r in rows if r["concurrency"] == c
            ]
            for c in sorted({r["concurrency"] for r in rows})
        }
        panels.append(("requests/s, vllm bench serve (x)", series))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels, strict=True):
        for label, points in series.items():
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks([0.111, 0.222, 0.333, 1.0], ["0.111", "0.222", "0.333", "1"])
        ax.set_xlabel("keep ratio")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle("vllm-trio vs stock vLLM, measured side by side", fontsize=11)
    fig.tight_layout()
    out = RESULTS / "performance.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def quality(results: dict[str, Any] | None) -> Path | None:
    """Relative accuracy (vs unpruned stock vLLM) per arm over keep ratios."""
    if not results:
        return None
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for row in results["rows"]:
        if row.get("relative") is not None and row["ratio"] < 1:
            series[row["arm"]].append((row["ratio"], 100 * row["relative"]))
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colours = plt.colormaps["tab20"]
    for i, (arm, points) in enumerate(sorted(series.items())):
        points.sort()
        style = "-" if arm.startswith("trio") else ":"
        ax.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            style,
            marker="o",
            color=colours(i),
            label=arm,
        )
    ax.axhline(100, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.minorticks_off()
    ratios = sorted({p[0] for points in series.values() for p in points})
    ax.set_xticks(ratios, [f"{r:g}" for r in ratios])
    ax.set_xlabel("keep ratio (visual tokens kept)")
    ax.set_ylabel("accuracy relative to unpruned (%)")
    ax.set_title(f"Generated-scene eval, {results['rows'][0]['n']} questions", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    out = RESULTS / "quality.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main() -> None:
    written = [
        performance(_load("prefill"), _load("throughput")),
        quality(_load("quality")),
    ]
    for path in written:
        if path is not None:
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
