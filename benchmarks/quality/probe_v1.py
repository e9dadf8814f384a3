"""Why the v1 scene model stopped at 40.7%: what its visual tokens carry, and what it answers.

    .venv/bin/python -m benchmarks.quality.probe_v1 [--model benchmarks/quality/model]

Two measurements on a checkpoint trained by ``train.py`` on ``scenes.py``:

1. Linear probes (multinomial logistic regression, features standardised) on
   the object tokens of 80 train-split images (``patch_labels``: the tokens
   at least 15% covered by an object): colour, shape and word class, fitted on
   the first 70% of the tokens and scored on the rest, for the CLIP tower's
   selected layer and for the projector's output (what the decoder reads).
2. Colour questions of the eval split: how often the answer is right, and
   how often it names a colour that some object in the image has.

Writes ``benchmarks/results/quality_v1_probe.json`` and prints the numbers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .scenes import _generate, make_conversation, make_split, normalize_answer
from .train import DEFAULT_OUT, greedy_answer, load_checkpoint, patch_labels

ROOT = Path(__file__).resolve().parents[2]


def _probe(features: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Held-out accuracy of a linear probe, and the majority-class rate."""
    torch.manual_seed(0)
    x = (features - features.mean(0)) / (features.std(0) + 1e-5)
    y = labels - 1
    cut = int(0.7 * len(x))
    classes = int(y.max()) + 1
    weight = torch.zeros(x.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        logits = x[:cut] @ weight + bias
        loss = torch.nn.functional.cross_entropy(logits, y[:cut]) + 1e-3 * weight.square().sum()
        loss.backward()
        opt.step()
    with torch.no_grad():
        held = ((x[cut:] @ weight + bias).argmax(-1) == y[cut:]).float().mean().item()
    majority = torch.bincount(y[cut:]).max().item() / max(1, len(y) - cut)
    return {"held_out": round(held, 4), "majority": round(majority, 4), "tokens": len(y)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/quality_v1_probe.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model, processor = load_checkpoint(args.model)
    tower, projected, labels = [], [], []
    for i in range(80):
        sample, _ = make_conversation("train", 500_000 + i, 0, 0)
        pixels = processor.image_processor(images=sample.image, return_tensors="pt")
        with torch.no_grad():
            hidden = model.model.vision_tower(
                pixels["pixel_values"][0], output_hidden_states=True
            ).hidden_states[-2][:, 1:]
            proj = model.model.multi_modal_projector(hidden)
        tower.append(hidden.reshape(-1, hidden.shape[-1]))
        projected.append(proj.reshape(-1, proj.shape[-1]))
        labels.append(patch_labels(processor, sample.labels).reshape(-1, 3))
    all_labels = torch.cat(labels)
    result: dict[str, object] = {}
    for where, feats in (("tower", torch.cat(tower)), ("projected", torch.cat(projected))):
        for channel, name in enumerate(("colour", "shape", "word")):
            obj = all_labels[:, channel] > 0
            result[f"{where}/{name}"] = _probe(feats[obj], all_labels[obj, channel])
    right = present = total = objects = 0
    for index in range(0, 240, 6):  # family 0: "What colour is the <shape>?"
        canvas, _, _ = _generate("eval", index, 0)
        sample = make_split("eval", index + 1)[index]
        answer = normalize_answer(greedy_answer(model, processor, sample))
        total += 1
        right += answer == sample.answer
        present += answer in {o.colour for o in canvas.objects}
        objects += len(canvas.objects)
    result["colour_questions"] = {
        "n": total,
        "right": right,
        "answer_is_a_colour_in_the_image": present,
        "objects_per_image": round(objects / total, 2),
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
