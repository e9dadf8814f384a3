"""Analytic FLOPs per request: vision encoder, TRIO side pass, language-model prefill.

Counts multiply-adds as 2 FLOPs, for one image request with a short question,
at LLaVA-NeXT-7B's shapes (``--model 7b``: Vicuna-7B + CLIP ViT-L/14-336) or
the local bench checkpoint's (``--model bench``). Prefill only (decode reads
a shorter KV cache too, not counted). The side pass is what
``vllm_trio.binding.side_pass`` runs: layers ``0..L-1`` over the unpruned prompt, layer
``L`` with queries only at the 4 loss positions (keys/values for all rows),
norm and LM head at those rows, the input-gradient backward of that, and NMS
over a prefix of about ``2k`` ranked tokens.

    python benchmarks/flops.py [--model 7b|bench] [--depth 2] [--text-tokens 60]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

from common import ARTIFACTS, RATIOS, save, table

from vllm_trio.core.budget import num_kept_tokens

LOSS_ROWS = 4


@dataclass(frozen=True)
class Shapes:
    d: int  # text hidden
    layers: int
    heads: int
    kv_heads: int
    inter: int
    vocab: int
    dv: int  # vision hidden
    v_layers_used: int
    v_inter: int
    tile_patches: int  # patches per tile (no CLS)

    @property
    def kv_dim(self) -> int:
        return self.d // self.heads * self.kv_heads


LLAVA_NEXT_7B = Shapes(
    d=4096, layers=32, heads=32, kv_heads=32, inter=11008, vocab=32064,
    dv=1024, v_layers_used=23, v_inter=4096, tile_patches=576,
)  # fmt: skip


def bench_shapes() -> Shapes:
    cfg = json.loads((ARTIFACTS / "ckpt-bench" / "config.json").read_text())
    t, v = cfg["text_config"], cfg["vision_config"]
    return Shapes(
        d=t["hidden_size"], layers=t["num_hidden_layers"], heads=t["num_attention_heads"],
        kv_heads=t["num_key_value_heads"], inter=t["intermediate_size"], vocab=t["vocab_size"],
        dv=v["hidden_size"], v_layers_used=v["num_hidden_layers"] + cfg["vision_feature_layer"] + 1,
        v_inter=v["intermediate_size"], tile_patches=(v["image_size"] // v["patch_size"]) ** 2,
    )  # fmt: skip


def layer_flops(s: Shapes, rows: int, context: int) -> float:
    """One decoder layer: ``rows`` query rows attending causally within ``context``."""
    proj = 2 * rows * s.d * (s.d + 2 * s.kv_dim + s.d) + 2 * rows * s.d * 3 * s.inter
    attn = 2 * rows * context * s.d if rows < context else 2 * context * context * s.d
    return proj + attn


def vision_flops(s: Shapes, tiles: int) -> float:
    t = s.tile_patches + 1
    per_layer = 2 * t * (4 * s.dv * s.dv + 2 * s.dv * s.v_inter) + 4 * t * t * s.dv
    projector = 2 * s.tile_patches * (s.dv * s.d + s.d * s.d)
    return tiles * (s.v_layers_used * per_layer + projector)


def side_pass_flops(s: Shapes, seq: int, k: int, depth: int, visual: int) -> float:
    below = depth * layer_flops(s, seq, seq)
    kv = 2 * seq * s.d * 2 * s.kv_dim
    rows = layer_flops(s, LOSS_ROWS, seq) - 2 * LOSS_ROWS * s.d * 2 * s.kv_dim
    head = 2 * LOSS_ROWS * s.d * s.vocab
    forward = kv + rows + head
    backward = 2 * (rows + head) + kv  # input gradients only (weights need none)
    nms = 2 * min(visual, 2 * k) ** 2 * s.d
    return below + forward + backward + nms


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="7b", choices=["7b", "bench"])
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--text-tokens", type=int, default=60)
    ap.add_argument("--tiles", type=int, default=5, help="base + anyres tiles (672x672: 5)")
    ap.add_argument("--visual-tokens", type=int, default=2928, help="N (672x672: 2,928)")
    args = ap.parse_args()
    s = LLAVA_NEXT_7B if args.model == "7b" else bench_shapes()
    n, text = args.visual_tokens, args.text_tokens
    vision = vision_flops(s, args.tiles)
    rows = []
    for r in RATIOS:
        k = num_kept_tokens(n, r)
        seq = text + k
        lm = s.layers * layer_flops(s, seq, seq) + 2 * s.d * s.vocab
        side = 0.0 if k == n else side_pass_flops(s, text + n, k, args.depth, n)
        rows.append(
            dict(ratio=r, prompt=seq, vision_g=vision / 1e9, side_g=side / 1e9, lm_g=lm / 1e9,
                 total_g=(vision + side + lm) / 1e9)
        )  # fmt: skip
    for row in rows:
        row["lm_x"] = rows[0]["lm_g"] / row["lm_g"]
        row["lm_side_x"] = rows[0]["lm_g"] / (row["lm_g"] + row["side_g"])
        row["total_x"] = rows[0]["total_g"] / row["total_g"]
        row["side_pct"] = 100 * row["side_g"] / rows[0]["lm_g"]
    cols = [
        ("ratio", "ratio", ".3f"), ("prompt", "prompt", "d"), ("vision_g", "vision GF", ".0f"),
        ("side_g", "side GF", ".0f"), ("lm_g", "LM GF", ".0f"), ("total_g", "total GF", ".0f"),
        ("lm_x", "LM x", ".2f"), ("lm_side_x", "LM+side x", ".2f"), ("total_x", "total x", ".2f"),
        ("side_pct", "side % of LM", ".1f"),
    ]  # fmt: skip
    print(f"model={args.model} depth={args.depth} N={n} text={text} tiles={args.tiles}")
    print(table(rows, cols))
    print(f"saved {save(f'flops_{args.model}', {'meta': vars(args), 'rows': rows})}")


if __name__ == "__main__":
    main()
