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
from .symbolic import packed_layout
from .train_grid import TrainConfig, Trainer, greedy_answer, token_labels


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
    print(f"step {trainer.step}; {args.n} eval questions; symbolic rows vs rendered image")
    for family, r in result.items():
        print(
            f"{family:9s} symbolic {100 * r['symbolic']:5.1f}  image {100 * r['image']:5.1f}  "
            f"only symbolic {r['only_symbolic']:3d}  only image {r['only_image']:3d}  "
            f"p {r['p']:.2g}"
        )
    if args.out:
        record = {"state": str(args.state), "step": trainer.step, "n": args.n, "seed": args.seed}
        record |= {"seconds": round(time.monotonic() - start, 1), "families": result}
        args.out.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
