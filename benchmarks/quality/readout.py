"""How the shipped scene model reads count and relation answers, unpruned.

    .venv/bin/python -m benchmarks.quality.readout [--n 1002] [--probe-n 800]

Issue 10 asks why the model stops short of 90%; colour, shape and text are
near 100% and count and relation are where it falls. Both families are
answered through the heads of ``attn_layer`` that training pulls onto the
evidence tokens (``evidence``), so this looks at that lookup and at what the
looked-up tokens carry:

* **Lookup.** At the last prompt position (whose logits give the answer),
  the supervised heads' attention share on the evidence tokens, on BOS (the
  count answers' sink, ``count_sink``) and on every other visual token, per
  family, split by right and wrong answers.
* **Count.** The evidence share per true count. With the sink, ``n``
  evidence tokens should take ``n / (n + 1)`` of the attention; how much the
  per-question shares overlap bounds what any readout of them can do, so the
  best thresholds on the share (fitted on the same questions: an in-sample
  ceiling) are reported next to the model's accuracy, with where the
  spread comes from: the score gap log(attention on a counted object / on
  BOS), which a share that counts exactly needs equal for every object, its
  spread within a question and its mean per object colour.
* **Relation.** Linear probes (fitted on 70% of ``--probe-n`` training-split
  relation questions, scored on the rest) of the named object's token, at the
  tower's output and at the input of ``attn_layer``, for the shape on each of
  its four sides (questions with an object on that side inside the tile),
  against the majority class; the token's own
  shape as a control; and the answer at the last position after
  ``attn_layer`` and after the last layer.

Writes ``benchmarks/results/readout.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from .evidence import evidence_cells, packed_index
from .grid_scenes import RELATIONS, SHAPES, Turn, make_sample, normalize_answer, tile_neighbours
from .harness import HFRunner, Prepared, log
from .shipped import MODEL_DIR, scene_generator, training_record

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "readout"
PARTS = ("evidence", "bos", "other_visual", "text")


def attention_shares(
    row: torch.Tensor, prep: Prepared, evidence: Sequence[int]
) -> dict[str, float]:
    """Shares of one query row's attention ``[S]`` on the evidence tokens, BOS,
    the other visual tokens and the rest of the text."""
    mask_ev = torch.zeros_like(row, dtype=torch.bool)
    mask_ev[prep.visual_rows[list(evidence)]] = True
    mask_vis = torch.zeros_like(mask_ev)
    mask_vis[prep.visual_rows] = True
    ev, bos = float(row[mask_ev].sum()), float(row[0])
    other = float(row[mask_vis & ~mask_ev].sum())
    return {"evidence": ev, "bos": bos, "other_visual": other, "text": 1.0 - ev - bos - other}


def threshold_ceiling(shares: Sequence[float], counts: Sequence[int]) -> float:
    """Best accuracy of ordered thresholds on ``shares`` predicting ``counts``
    (1..4), searched over midpoints between sorted shares (in-sample)."""
    pairs = sorted(zip(shares, counts, strict=True))
    labels = sorted(set(counts))
    n = len(pairs)
    # best[j][i]: most right answers among the first i pairs using labels[:j + 1].
    best = [[0] * (n + 1) for _ in labels]
    for i in range(n + 1):
        best[0][i] = sum(c == labels[0] for _, c in pairs[:i])
    for j in range(1, len(labels)):
        for i in range(n + 1):
            run, top = 0, best[j - 1][i]
            for cut in range(i, 0, -1):  # pairs[cut - 1 : i] get labels[j]
                run += pairs[cut - 1][1] == labels[j]
                top = max(top, best[j - 1][cut - 1] + run)
            best[j][i] = top
    return best[-1][n] / n


def linear_probe(features: list[torch.Tensor], labels: list[int], classes: int) -> dict:
    """Held-out accuracy of a multinomial logistic probe (70/30 split) and of
    always answering the training part's majority class."""
    x = torch.stack(features).float()
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = torch.tensor(labels)
    cut = int(0.7 * len(labels))
    weight = torch.zeros(x.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=0.05)
    for _ in range(400):
        opt.zero_grad()
        loss = F.cross_entropy(x[:cut] @ weight + bias, y[:cut]) + 1e-3 * weight.square().sum()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = (x[cut:] @ weight + bias).argmax(1)
    majority = torch.bincount(y[:cut], minlength=classes).argmax()
    return {
        "accuracy": float((pred == y[cut:]).float().mean()),
        "majority": float((y[cut:] == majority).float().mean()),
        "n_test": len(labels) - cut,
    }


def lookup_rows(hf: HFRunner, samples: list, layer: int, heads: list[int]) -> list[dict]:
    """Per count and relation eval question: true count, answer, right, shares."""
    rows = []
    for i, sample in enumerate(samples):
        if sample.family not in ("count", "relation"):
            continue
        prep = hf.prepare(i, sample)
        turn = Turn(sample.question, sample.answer, sample.family)
        cells = evidence_cells(sample.scene, turn)
        evidence = [packed_index(sample.scene, c) for c in cells]
        with torch.no_grad():
            out = hf.lm(inputs_embeds=prep.embeds[None], output_attentions=True)
        weights = out.attentions[layer][0, heads, -1].float().mean(0)  # over the heads
        shares = attention_shares(weights, prep, evidence)
        answer = hf.decode(hf.generate(prep.embeds))
        # log(attention on each evidence token / on BOS): equal for all counted
        # objects if the share is to say exactly how many there are.
        gaps = [math.log(float(weights[prep.visual_rows[e]] / weights[0])) for e in evidence]
        rows.append(
            {
                "index": i,
                "family": sample.family,
                "n_evidence": len(evidence),
                "gold": sample.answer,
                "answer": normalize_answer(answer),
                "right": normalize_answer(answer) == normalize_answer(sample.answer),
                "colours": [sample.scene.cells[c].colour for c in cells],
                "gaps": gaps if sample.family == "count" else [],
                **shares,
            }
        )
    return rows


def neighbour_label(scene, cell: tuple[int, int], dx: int, dy: int) -> int:
    """Shape index of the object on side ``(dx, dy)`` of ``cell`` inside its
    tile (``grid_scenes``'s relation geometry), or ``len(SHAPES)`` for none
    (relations are asked only inside a tile)."""
    side = (cell[0] - dx, cell[1] - dy)
    thing = scene.cells.get(side)
    if thing is None or thing.kind != "object" or side not in tile_neighbours(scene, cell):
        return len(SHAPES)
    return SHAPES.index(thing.shape)


def relation_probes(hf: HFRunner, n: int, layer: int, seed: int) -> dict[str, dict]:
    """Linear probes of the named object's token and of the answer position."""
    feats: dict[str, list[torch.Tensor]] = {"token_tower": [], "token_layer": []}
    answer_feats: dict[str, list[torch.Tensor]] = {"after_layer": [], "after_last": []}
    sides: dict[str, list[int]] = {side: [] for side in RELATIONS}
    own, answers = [], []
    index = 3  # make_sample: family FAMILIES[index % 6], relation is 3
    while len(answers) < n:
        sample = make_sample("train", index, seed)
        index += 6
        prep = hf.prepare(index, sample)
        cell = evidence_cells(sample.scene, Turn(sample.question, sample.answer, "relation"))[0]
        row = int(prep.visual_rows[packed_index(sample.scene, cell)])
        with torch.no_grad():
            hidden = hf.lm(inputs_embeds=prep.embeds[None], output_hidden_states=True).hidden_states
        feats["token_tower"].append(hidden[0][0, row])
        feats["token_layer"].append(hidden[layer][0, row])
        answer_feats["after_layer"].append(hidden[layer + 1][0, -1])
        answer_feats["after_last"].append(hidden[-1][0, -1])
        for side, (dx, dy) in RELATIONS.items():
            sides[side].append(neighbour_label(sample.scene, cell, dx, dy))
        own.append(SHAPES.index(sample.scene.cells[cell].shape))
        answers.append(SHAPES.index(sample.answer))
    probes = {}
    for where, xs in feats.items():
        probes[f"{where}: own shape"] = linear_probe(xs, own, len(SHAPES))
        for side, ys in sides.items():
            there = [i for i, y in enumerate(ys) if y < len(SHAPES)]
            probes[f"{where}: shape {side} it"] = linear_probe(
                [xs[i] for i in there], [ys[i] for i in there], len(SHAPES)
            )
    for where, xs in answer_feats.items():
        probes[f"answer position {where}: answer"] = linear_probe(xs, answers, len(SHAPES))
    return probes


def summarize(rows: list[dict]) -> dict:
    """Per family, right vs wrong: mean shares; per true count: share mean, sd."""
    out: dict = {}
    for family in ("count", "relation"):
        fam = [r for r in rows if r["family"] == family]
        entry = {"n": len(fam), "accuracy": statistics.mean(r["right"] for r in fam)}
        for right in (True, False):
            part = [r for r in fam if r["right"] == right]
            key = "right" if right else "wrong"
            entry[key] = {p: statistics.mean(r[p] for r in part) for p in PARTS} if part else {}
            entry[key]["n"] = len(part)
        top, times = Counter(r["answer"] for r in fam).most_common(1)[0]
        entry["most_common_answer"] = {"answer": top, "share": times / len(fam)}
        out[family] = entry
    count = [r for r in rows if r["family"] == "count"]
    per_n = {}
    for n in sorted({r["n_evidence"] for r in count}):
        part = [r for r in count if r["n_evidence"] == n]
        shares = [r["evidence"] for r in part]
        per_n[n] = {
            "questions": len(part),
            "accuracy": statistics.mean(r["right"] for r in part),
            "share_mean": statistics.mean(shares),
            "share_sd": statistics.pstdev(shares),
            "sink_ideal": n / (n + 1),
        }
    out["count"]["per_count"] = per_n
    gaps = [g for r in count for g in r["gaps"]]
    by_colour: dict[str, list[float]] = {}
    for r in count:
        for colour, g in zip(r["colours"], r["gaps"], strict=True):
            by_colour.setdefault(colour, []).append(g)
    out["count"]["score_gap"] = {
        "objects": len(gaps),
        "mean": statistics.mean(gaps),
        "sd": statistics.pstdev(gaps),
        "within_question_sd": statistics.mean(
            statistics.pstdev(r["gaps"]) for r in count if len(r["gaps"]) > 1
        ),
        "by_colour": {c: statistics.mean(v) for c, v in sorted(by_colour.items())},
    }
    out["count"]["threshold_ceiling"] = threshold_ceiling(
        [r["evidence"] for r in count], [r["n_evidence"] for r in count]
    )
    return out


def markdown(summary: dict, probes: dict, meta: dict) -> str:
    lines = [
        "# How the scene model reads count and relation answers",
        "",
        f"Model `{meta['model']}`, unpruned, HF float32; supervised heads {meta['heads']} of "
        f"layer {meta['layer']} at the last prompt position; {meta['n']} eval questions; "
        f"probes on {meta['probe_n']} training-split relation questions; command "
        f"`{meta['command']}`, {meta['minutes']:.1f} min.",
        "",
        "## Lookup: attention shares (mean over the supervised heads)",
        "",
        "| family | answers | questions | evidence | BOS | other visual | text |",
        "|---|---|---|---|---|---|---|",
    ]
    for family in ("count", "relation"):
        for key in ("right", "wrong"):
            e = summary[family][key]
            if e.get("n"):
                cells = " | ".join(f"{e[p]:.3f}" for p in PARTS)
                lines.append(f"| {family} | {key} | {e['n']} | {cells} |")
    lines += ["", "## Count: evidence share per true count", ""]
    lines += ["| count | questions | accuracy | share mean | share sd | n/(n+1) |"]
    lines += ["|---|---|---|---|---|---|"]
    for n, e in summary["count"]["per_count"].items():
        lines.append(
            f"| {n} | {e['questions']} | {e['accuracy']:.2f} | {e['share_mean']:.3f} | "
            f"{e['share_sd']:.3f} | {e['sink_ideal']:.3f} |"
        )
    c = summary["count"]
    gap = c["score_gap"]
    lines += [
        "",
        f"Model accuracy {c['accuracy']:.3f}; best thresholds on the evidence share "
        f"(in-sample ceiling of any readout of it) {c['threshold_ceiling']:.3f}.",
        "",
        f"Score gap log(attention on a counted object / on BOS) over {gap['objects']} objects: "
        f"mean {gap['mean']:.3f}, sd {gap['sd']:.3f}, within a question sd "
        f"{gap['within_question_sd']:.3f}; mean by colour: "
        + ", ".join(f"{k} {v:.2f}" for k, v in gap["by_colour"].items())
        + ".",
        "",
        "## Relation: linear probes (held-out accuracy / majority class)",
        "",
        f"Model accuracy {summary['relation']['accuracy']:.3f}; its most common answer "
        f"`{summary['relation']['most_common_answer']['answer']}` on "
        f"{100 * summary['relation']['most_common_answer']['share']:.0f}% of the questions.",
        "",
        "| probe | accuracy | majority | test questions |",
        "|---|---|---|---|",
    ]
    for name, p in probes.items():
        lines.append(f"| {name} | {p['accuracy']:.2f} | {p['majority']:.2f} | {p['n_test']} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.quality.readout", description=__doc__)
    ap.add_argument("--n", type=int, default=1002, help="eval questions (count, relation used)")
    ap.add_argument("--probe-n", type=int, default=800, help="training-split relation questions")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=str(MODEL_DIR))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model_dir = Path(args.model).resolve()
    record = training_record(model_dir)
    generator = scene_generator(record)
    if generator.__name__ != "benchmarks.quality.grid_scenes":
        raise SystemExit("readout needs a grid-scenes model (its evidence tokens are known)")
    layer, heads = record["config"]["attn_layer"], list(record["config"]["attn_heads"])
    hf = HFRunner(model_dir, max_new_tokens=2, fastv_k=1)
    rows = lookup_rows(hf, generator.make_split("eval", args.n, args.seed), layer, heads)
    log(start, f"lookup: {len(rows)} questions")
    probes = relation_probes(hf, args.probe_n, layer, args.seed)
    summary = summarize(rows)
    meta = {
        "model": str(model_dir.relative_to(ROOT) if model_dir.is_relative_to(ROOT) else model_dir),
        "layer": layer,
        "heads": heads,
        "n": args.n,
        "probe_n": args.probe_n,
        "command": " ".join(
            ["python -m benchmarks.quality.readout", *(argv if argv is not None else sys.argv[1:])]
        ),
        "minutes": (time.perf_counter() - start) / 60,
        "torch": torch.__version__,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "summary": summary, "probes": probes, "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(summary, probes, meta))
    log(start, f"wrote {out}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
