"""The eval questions answered from symbolic rows instead of the image: where a
trained scene model loses an answer, the decoder or the tower.

    .venv/bin/python -m benchmarks.quality.symbolic_eval --state DIR [--n 1002]

``train_grid``'s stage 0 teaches the decoder on symbolic rows (learned
embeddings of what each cell holds) and stage 1 regresses the tower's tokens
onto them. Given a run's saved training state (``--state``, which holds the
symbolic embeddings next to the weights), this feeds the final decoder the
symbolic rows of each eval scene, every row shown as in a full image, and
scores the first answer token, per family, next to the same model answering
from the rendered image (``train_grid.evaluate``'s greedy answer). A family
the decoder answers from symbolic rows but not from the image is lost
between the tower's tokens and the rows the decoder learnt.

``tower_fit`` says how far apart those are: per token kind, the tower's
squared error against its symbolic row relative to the row's squared norm,
and per label channel, how often the object tokens' class is the nearest
symbolic class once the other channels' true parts are taken out (what the
decoder's lookup of that channel sees, unlike a freely fitted linear probe),
and how much of the true class's row the token carries (``ChannelFit``).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .grid_scenes import FAMILIES, Turn, make_split, normalize_answer
from .stats import mcnemar_exact, wilson_interval
from .symbolic import BACKGROUND, BASE_TILE, OBJECT, packed_layout, tile_kinds
from .train_grid import CHANNELS, SPEC, TrainConfig, Trainer, greedy_answer, token_labels

_KINDS = {"base tile": BASE_TILE, "background": BACKGROUND, "object": OBJECT}


def load_trainer(state_dir: Path) -> Trainer:
    """The trainer of the run saved in ``state_dir``, at its last saved step."""
    saved = torch.load(state_dir / "state.pt", map_location="cpu", weights_only=False)["config"]
    trainer = Trainer(TrainConfig(**saved), state_dir, torch.device("cpu"))
    trainer.model.eval()
    return trainer


@torch.no_grad()
def symbolic_answer_hit(trainer: Trainer, sample: Any) -> bool:
    """Whether the decoder's first answer token from ``sample``'s symbolic rows
    (all of them, background included) is the answer's."""
    kinds, labels = packed_layout(sample.scene, token_labels(sample.scene))
    turn = Turn(sample.question, sample.answer, sample.family)
    ids, _, first, starts = trainer.encoder.encode([turn], kinds.numel())
    embeds = trainer.symbolic_embeddings(ids, first, kinds, labels)
    lm = trainer.model.model.language_model
    hidden = lm(inputs_embeds=embeds[None], use_cache=False).last_hidden_state
    predicted = trainer.model.lm_head(hidden[0, starts[0] - 1]).argmax()
    return int(predicted) == ids[starts[0]]


def compare_inputs(trainer: Trainer, n: int, seed: int) -> dict[str, Any]:
    """Per family and overall: accuracy from symbolic rows and from the image,
    with the McNemar test between the two on the same questions."""
    samples = make_split("eval", n, seed)
    rows = []
    for sample in samples:
        image = normalize_answer(greedy_answer(trainer.model, trainer.processor, sample))
        rows.append((sample.family, symbolic_answer_hit(trainer, sample), image == sample.answer))
    out: dict[str, Any] = {}
    for family in (*FAMILIES, "overall"):
        picked = [r for r in rows if family in (r[0], "overall")]
        symbolic, image = [r[1] for r in picked], [r[2] for r in picked]
        only_symbolic, only_image, p = mcnemar_exact(symbolic, image)
        out[family] = {
            "n": len(picked),
            "symbolic": sum(symbolic) / len(picked),
            "symbolic_ci95": wilson_interval(sum(symbolic), len(picked)),
            "image": sum(image) / len(picked),
            "image_ci95": wilson_interval(sum(image), len(picked)),
            "only_symbolic": only_symbolic,
            "only_image": only_image,
            "p": p,
        }
    return out


class ChannelFit:
    """Per label channel, how the object tokens carry it: how often its class is
    the nearest symbolic class once the other channels' true parts are taken
    out (over every known class, and over the present ones, class > 0), and the
    token's gain along its true class row (1: carried as the rows carry it).

    The present-class figures are the ones to read for neighbour channels: most
    object tokens have no object beside them, so the all-class accuracy is
    mostly class 0, and v13e's tower scored 0.94-0.96 there while carrying
    -0.17 to 0.00 of its object neighbours' rows.
    """

    def __init__(self) -> None:
        self.known = [0] * len(CHANNELS)
        self.hits = [0] * len(CHANNELS)
        self.present = [0] * len(CHANNELS)
        self.present_hits = [0] * len(CHANNELS)
        self.gain = [0.0] * len(CHANNELS)

    def add(
        self, symbolic: Any, tokens: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor
    ) -> None:
        """Object ``tokens`` with their symbolic ``rows`` and ``labels`` (one row each)."""
        for c, table in enumerate(symbolic.tables):
            own = table(labels[:, c].clamp(min=0))
            rest = tokens - (rows - own)  # the token with the other channels' true parts out
            picked = torch.cdist(rest, table.weight).argmin(-1)
            known, present = labels[:, c] >= 0, labels[:, c] > 0
            self.known[c] += int(known.sum())
            self.hits[c] += int((picked[known] == labels[known, c]).sum())
            self.present[c] += int(present.sum())
            self.present_hits[c] += int((picked[present] == labels[present, c]).sum())
            along = (rest[present] * own[present]).sum(-1) / own[present].pow(2).sum(-1)
            self.gain[c] += along.sum().item()

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per channel name: tokens, accuracy, present_tokens, present_accuracy, gain."""
        out = {}
        for c, (name, _) in enumerate(CHANNELS):
            n, m = self.known[c], self.present[c]
            out[name] = {
                "tokens": n,
                "accuracy": self.hits[c] / n if n else None,
                "present_tokens": m,
                "present_accuracy": self.present_hits[c] / m if m else None,
                "gain": self.gain[c] / m if m else None,
            }
        return out


@torch.no_grad()
def tower_fit(trainer: Trainer, samples: Sequence[Any]) -> dict[str, Any]:
    """The tower's tokens against the symbolic rows of the same tiles: relative
    squared error per kind, and per channel how the object tokens carry it
    (``ChannelFit``; class 0, "nothing", is the zero row)."""
    model, symbolic = trainer.model.model, trainer.symbolic
    error = {name: [0.0, 0.0, 0] for name in _KINDS}
    channels = ChannelFit()
    for sample in samples:
        pixels = trainer.processor.image_processor(images=sample.image, return_tensors="pt")
        hidden = model.vision_tower(
            pixels["pixel_values"][0], output_hidden_states=True
        ).hidden_states[SPEC.vision_feature_layer][:, 1:]
        tokens = model.multi_modal_projector(hidden)
        labels = token_labels(sample.scene)
        kinds = tile_kinds(labels)
        target = symbolic(kinds, labels)
        for name, kind in _KINDS.items():
            at = kinds == kind
            error[name][0] += (tokens[at] - target[at]).pow(2).sum().item()
            error[name][1] += target[at].pow(2).sum().item()
            error[name][2] += int(at.sum())
        at = kinds == OBJECT
        channels.add(symbolic, tokens[at], target[at], labels[at])
    return {
        "kinds": {
            name: {"tokens": n, "relative_sq_error": e / t if t else None}
            for name, (e, t, n) in error.items()
        },
        "nearest_class": channels.summary(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--state", type=Path, required=True, help="a train_grid --state directory")
    ap.add_argument("--n", type=int, default=1002)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, help="write the result as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.monotonic()
    trainer = load_trainer(args.state)
    result = compare_inputs(trainer, args.n, args.seed)
    fit = tower_fit(trainer, make_split("eval", args.n, args.seed))
    print(f"step {trainer.step}; {args.n} eval questions; symbolic rows vs rendered image")
    for family, r in result.items():
        print(
            f"{family:9s} symbolic {100 * r['symbolic']:5.1f}  image {100 * r['image']:5.1f}  "
            f"only symbolic {r['only_symbolic']:3d}  only image {r['only_image']:3d}  "
            f"p {r['p']:.2g}"
        )
    for name, r in fit["kinds"].items():
        print(
            f"tower vs rows, {name}: {r['tokens']} tokens, relative squared error "
            f"{r['relative_sq_error']:.3f}"
        )
    print("object tokens per channel: nearest class (all / present), gain along the true row")
    for name, r in fit["nearest_class"].items():
        if r["present_tokens"]:
            print(
                f"  {name:12s} {r['accuracy']:.2f} / {r['present_accuracy']:.2f} "
                f"({r['present_tokens']} present)  gain {r['gain']:+.2f}"
            )
    if args.out:
        record = {"state": str(args.state), "step": trainer.step, "n": args.n, "seed": args.seed}
        record |= {"seconds": round(time.monotonic() - start, 1), "families": result}
        record |= {"tower_fit": fit}
        args.out.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
