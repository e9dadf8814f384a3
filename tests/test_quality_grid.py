"""Grid scenes (quality benchmark v2), their per-token labels, and the harness statistics.

The benchmark can only decide between pruning methods if its data is right:
answers balanced (priors score chance), every object on exactly one visual
token, labels on the tokens that show the thing, splits reproducible and
disjoint; and its statistics must be the textbook ones.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from benchmarks.quality import grid_scenes as g
from benchmarks.quality.harness import matched_schedule, multi_schedule, multi_stage_layers
from benchmarks.quality.shipped import generator_name
from benchmarks.quality.stats import mcnemar_exact, paired_relative_interval, wilson_interval


def _hash(sample: g.Sample) -> str:
    return hashlib.sha256(sample.image.tobytes() + repr(sample.image.size).encode()).hexdigest()


def test_splits_are_reproducible_prefixes_and_disjoint() -> None:
    first = g.make_split("eval", 24)
    assert [_hash(s) for s in first] == [_hash(s) for s in g.make_split("eval", 30)[:24]]
    assert _hash(g.make_sample("eval", 7)) == _hash(first[7])
    train = {_hash(s) for s in g.make_split("train", 200)}
    assert len(train) == 200
    assert not train & {_hash(s) for s in g.make_split("eval", 200)}
    easy, _ = g.make_conversation("train", 3, max_objects=2)
    assert _hash(easy) != _hash(g.make_sample("train", 3))


def test_a_record_without_a_scene_generator_is_refused() -> None:
    """The first scene model's TRAINING.json named no generator and its scenes are
    gone: the benchmarks say so instead of failing on a missing module."""
    from benchmarks.quality.shipped import scene_generator

    assert scene_generator({"generator": "benchmarks.quality.grid_scenes"}) is g
    with pytest.raises(ValueError, match="names no scene generator"):
        scene_generator({"command": "python -m benchmarks.quality.train"})


def test_chat_prompt_matches_the_chat_template() -> None:
    """Every arm's prompt is the checkpoint's chat template rendered for one image
    and the question, minus BOS (which the tokenizer adds)."""
    from trio_dev.checkpoints import CHAT_TEMPLATE, DEFAULT_SYSTEM_PROMPT

    jinja2 = pytest.importorskip("jinja2")
    question = "What shape is left of the red circle?"
    prompt = g.chat_prompt(question)
    assert prompt.count("<image>") == 1
    assert prompt.startswith(DEFAULT_SYSTEM_PROMPT)
    assert prompt.endswith(f"{question} ASSISTANT:")
    content = [{"type": "image"}, {"type": "text", "text": question}]
    rendered = (
        jinja2.Environment()
        .from_string(CHAT_TEMPLATE)
        .render(
            messages=[{"role": "user", "content": content}],
            bos_token="<s>",
            eos_token="</s>",
            add_generation_prompt=True,
        )
    )
    assert rendered == "<s>" + prompt


def test_answers_are_balanced_single_words() -> None:
    samples = g.make_split("eval", 720)
    assert Counter(s.family for s in samples) == dict.fromkeys(g.FAMILIES, 120)
    options = {
        "colour": set(g.COLOURS),
        "shape": set(g.SHAPES),
        "count": set(g.COUNT_WORDS[1:]),
        "relation": set(g.SHAPES),
        "presence": {"yes", "no"},
        "text": set(g.LETTERS),
    }
    for family, allowed in options.items():
        answers = Counter(s.answer for s in samples if s.family == family)
        assert set(answers) == allowed, family
        # Uniform draws: the most frequent answer is close to chance.
        assert max(answers.values()) / 120 < 1 / len(allowed) + 0.12, (family, answers)
    for s in samples[:60]:
        assert s.answer == g.normalize_answer(s.answer) and s.question.endswith("?")
    assert {s.image.size for s in samples} == set(g.IMAGE_SIZES)


def test_questions_are_answered_by_the_scene() -> None:
    """Each family's answer follows from ``Scene.cells`` alone."""
    for s in g.make_split("eval", 240):
        objs = [t for _, t in s.scene.objects()]
        words = s.question.rstrip("?").split()
        if s.family == "colour":
            (target,) = [t for t in objs if t.shape == words[-1]]
            assert target.colour == s.answer
        elif s.family == "shape":
            (target,) = [t for t in objs if t.colour == words[-2]]
            assert target.shape == s.answer
        elif s.family == "count":
            n = sum(t.shape == words[2][:-1] for t in objs)
            assert g.COUNT_WORDS[n] == s.answer
        elif s.family == "presence":
            there = any((t.colour, t.shape) == (words[-2], words[-1]) for t in objs)
            assert ("yes" if there else "no") == s.answer
        elif s.family == "relation":
            # "What shape is <relation> the <colour> <shape>?"
            (anchor,) = [
                c for c, t in s.scene.objects() if (t.colour, t.shape) == tuple(words[-2:])
            ]
            dx, dy = g.RELATIONS[" ".join(words[3:-3])]
            cell = (anchor[0] - dx, anchor[1] - dy)
            assert s.scene.cells[cell].kind == "object" and s.scene.cells[cell].shape == s.answer
            side = g.TILE // g.CELL  # inside one tile: the tower sees a tile alone
            assert (cell[0] // side, cell[1] // side) == (anchor[0] // side, anchor[1] // side)
        else:
            letters = [t.letter for t in s.scene.cells.values() if t.kind == "letter"]
            assert letters == [s.answer]


def test_token_labels_sit_on_the_patches_that_show_the_object() -> None:
    """Every labelled colour is drawn inside its tile patch; unlabelled patches are plain."""
    from benchmarks.quality.train_grid import build_scene_processor, token_labels

    processor = build_scene_processor().image_processor
    mean = torch.tensor(processor.image_mean).view(3, 1, 1)
    std = torch.tensor(processor.image_std).view(3, 1, 1)
    palette = torch.tensor(list(g.COLOURS.values()), dtype=torch.float32)
    labelled = 0
    for index in range(4):
        sample = g.make_sample("train", index)
        tiles = processor(images=sample.image, return_tensors="pt")["pixel_values"][0]
        tiles = tiles * std + mean
        labels = token_labels(sample.scene)
        assert labels.shape[:2] == (tiles.shape[0], 64)
        assert (labels[0] == -100).all()  # the base image is not supervised
        for t in range(1, tiles.shape[0]):
            for p in range(64):
                r, c = divmod(p, 8)
                rgb = tiles[t, :, r * 16 : (r + 1) * 16, c * 16 : (c + 1) * 16].reshape(3, -1).T
                spread = float(rgb.max(0).values.sub(rgb.min(0).values).max())
                if labels[t, p, 0] > 0:
                    nearest = torch.cdist(rgb * 255, palette).min(0).values
                    assert int(nearest.argmin()) == int(labels[t, p, 0]) - 1
                    labelled += 1
                elif labels[t, p, 2] == 0:
                    assert spread < 0.02, (index, t, p)  # background only
    assert labelled >= 4 * 3


def test_wilson_and_mcnemar_match_textbook_values() -> None:
    low, high = wilson_interval(90, 100)
    assert (round(low, 4), round(high, 4)) == (0.8256, 0.9448)
    assert wilson_interval(0, 10)[0] == 0.0
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0)
    # 10 vs 3 discordant pairs: p = 2 * P(X <= 3), X ~ Bin(13, 1/2) = 2 * 378 / 8192.
    assert mcnemar_exact([True] * 10 + [False] * 3, [False] * 10 + [True] * 3) == (
        10,
        3,
        2 * 378 / 8192,
    )
    assert mcnemar_exact([True, False], [True, False]) == (0, 0, 1.0)
    assert mcnemar_exact([True] * 6, [False] * 6)[2] == pytest.approx(2 / 64)
    same = [i % 3 != 0 for i in range(300)]
    low, high = paired_relative_interval(same, same)
    assert low == high == 1.0


def test_in_llm_schedules_match_the_input_arms_cost() -> None:
    """Matched single stage and reference-shaped multi-stage: average visual tokens per layer."""
    n, layers = 484, 8
    k = 161  # 0.333
    sched = matched_schedule(1, layers)(n, k)
    assert sched is not None
    assert abs(sched.average_kept(n, layers) - k) < 1
    assert matched_schedule(1, layers)(n, 54) is None  # layer 0 alone holds 484 > 8 * 54
    assert multi_stage_layers(8) == (1, 3, 4)
    assert multi_stage_layers(32) == (1, 11, 16)
    multi = multi_schedule(layers)(n, k)
    keeps = [st.keep for st in multi.stages]
    assert keeps == sorted(keeps, reverse=True)
    assert abs(multi.average_kept(n, layers) - k) < 2
    # Infeasible budgets fall back to the reference's own fractions of N.
    fallback = multi_schedule(layers)(n, 54)
    assert [st.keep for st in fallback.stages] == [round(c * n / 576) for c in (92, 54, 22)]


def test_symbolic_layout_is_the_one_llava_next_packs() -> None:
    """Stage 0's symbolic visual rows sit where HF's ``pack_image_features`` puts
    each tile patch (base tile first, then grid rows each ending in a newline),
    so the decoder learns the layout it later reads from the tower."""
    from benchmarks.quality.symbolic import NEWLINE, packed_layout
    from benchmarks.quality.train_grid import SPEC, build_model, token_labels

    model = build_model(0).model
    for index in range(4):  # the four grid shapes
        scene = g.make_sample("eval", index).scene
        labels = token_labels(scene)
        tiles = labels.shape[0]
        # Feature of (tile t, patch p) = its flat index; the newline row is -1.
        features = torch.arange(tiles * 64, dtype=torch.float32).view(tiles, 64, 1)
        features = features.expand(tiles, 64, SPEC.hidden_size).contiguous()
        packed, _ = model.pack_image_features(
            [features],
            torch.tensor([[scene.height, scene.width]]),
            "default",
            image_newline=torch.full((SPEC.hidden_size,), -1.0),
        )
        order = packed[0][:, 0].long()
        kinds, packed_labels = packed_layout(scene, labels)
        assert kinds.shape == order.shape
        assert ((order == -1) == (kinds == NEWLINE)).all()
        flat = labels.view(tiles * 64, -1)
        real = order >= 64  # grid rows (the base tile's labels are "nothing")
        assert torch.equal(packed_labels[real], flat[order[real]])
        assert (packed_labels[order < 64] == 0).all()


def test_evidence_is_the_named_objects_at_their_packed_tokens() -> None:
    """Every training turn (first and extra turns, all families) names cells that
    hold what it asks about, and ``packed_index`` finds those cells' tokens in
    the packed layout: what stage 0's attention supervision points at."""
    from benchmarks.quality.evidence import evidence_cells, packed_index
    from benchmarks.quality.symbolic import OBJECT, packed_layout, symbolic_scene
    from benchmarks.quality.train_grid import token_labels

    sizes: dict[str, Counter] = {f: Counter() for f in g.FAMILIES}
    for index in range(120):
        scene, turns = symbolic_scene(index, 0, 5, None)
        kinds, labels = packed_layout(scene, token_labels(scene))
        for turn in turns:
            cells = evidence_cells(scene, turn)
            sizes[turn.family][len(cells)] += 1
            for cell in cells:
                thing, row = scene.cells[cell], labels[packed_index(scene, cell)]
                assert kinds[packed_index(scene, cell)] == OBJECT
                if thing.kind == "letter":
                    assert row[2] == g.LETTERS.index(thing.letter) + 1
                else:
                    assert row[0] == list(g.COLOURS).index(thing.colour) + 1
                    assert row[1] == g.SHAPES.index(thing.shape) + 1
                    assert thing.shape in turn.question or thing.colour in turn.question
            if turn.family == "count":
                assert len(cells) == g.COUNT_WORDS.index(turn.answer)
            if turn.family == "presence" and turn.answer == "yes":
                assert cells and all(
                    (scene.cells[c].colour, scene.cells[c].shape)
                    in {
                        (w1, w2)
                        for w1 in g.COLOURS
                        for w2 in g.SHAPES
                        if f"{w1} {w2}" in turn.question
                    }
                    for c in cells
                )
    assert set(sizes["colour"]) == set(sizes["shape"]) == set(sizes["text"]) == {1}
    assert set(sizes["relation"]) == {1}
    assert set(sizes["count"]) == {1, 2, 3, 4}
    with pytest.raises(ValueError, match="not a colour question"):
        evidence_cells(scene, g.Turn("What colour is it?", "red", "colour"))


def test_query_attention_rows_equal_hf_eager_weights() -> None:
    """The recomputed attention rows equal HF's eager attention probabilities, with
    right padding and gapped position ids (stage 0 keeps dropped rows' positions)."""
    from benchmarks.quality.attention_rows import QueryAttention
    from benchmarks.quality.train_grid import build_model

    model = build_model(0).model.language_model.eval()
    model.config._attn_implementation = "eager"
    captured: dict[str, torch.Tensor] = {}
    layer = model.layers[3]
    hook = layer.self_attn.register_forward_hook(lambda _m, _i, out: captured.update(w=out[1]))
    rows = QueryAttention(layer)
    torch.manual_seed(0)
    embeds = torch.randn(2, 30, model.config.hidden_size)
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, 22:] = 0
    positions = torch.stack([torch.arange(30) * 3, torch.arange(30) + 5])
    with torch.no_grad():
        model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False)
        got = rows.weights([0, 1, 1], [29, 21, 4], [0, 2])
    hook.remove()
    rows.remove()
    for (b, q), w in zip([(0, 29), (1, 21), (1, 4)], got, strict=True):
        torch.testing.assert_close(w, captured["w"][b, [0, 2], q, : q + 1], rtol=0, atol=1e-6)


def test_training_resumes_bit_identically_through_all_stages(tmp_path) -> None:
    """A run stopped inside stage 0 and resumed ends with exactly the weights of
    an uninterrupted run (data indexed by step, every state saved), through the
    symbolic stage with its attention supervision, the vision stage and the
    chat stage (which supervises attention on rendered images)."""
    from safetensors.torch import load_file

    from benchmarks.quality.train_grid import main

    tiny = [
        *["--symbolic-steps", "3", "--symbolic-background-steps", "1", "--symbolic-batch", "2"],
        *["--symbolic-blocks-start", "1", "--symbolic-block-steps", "1,1,1,1"],
        *["--symbolic-block-families", "0,1,5,3"],
        *["--vision-steps", "1", "--vision-batch", "2"],
        *["--steps", "2", "--batch", "2", "--extra-turns", "1"],
        *["--eval-n", "6", "--test-n", "6", "--probe-every", "0", "--save-every", "1"],
        *["--relation-layer", "4", "--count-layer", "5", "--vision-neighbour-init", "true"],
        *["--count-heads", "0,1,2", "--count-sink-odds", "1.5,2.5,3.5", "--align-balance", "true"],
    ]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main([*tiny, "--state", str(whole / "state"), "--out", str(whole / "model")]) == 0
    args = [*tiny, "--state", str(split / "state"), "--out", str(split / "model")]
    assert main([*args, "--stop-at", "2"]) == 0
    assert main(args) == 0
    a, b = (load_file(d / "model" / "model.safetensors") for d in (whole, split))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    record = json.loads((whole / "model" / "TRAINING.json").read_text())
    assert any("attn_loss" in h for h in record["history"])


def test_a_frozen_decoder_keeps_its_stage_1_weights_through_the_chat_stage(tmp_path) -> None:
    """``--chat-decoder-lr-scale 0``: the chat stage trains the tower, projector and
    image newline only (the decoder's weights stay bit-identical to the end of
    the vision stage); another scale reaches the decoder's parameter groups.
    The run resumes from a state saved without a later flag in its config."""
    from safetensors.torch import load_file

    from benchmarks.quality.train_grid import TrainConfig, _in_decoder, main, make_optimizer

    tiny = [
        *["--symbolic-steps", "2", "--symbolic-background-steps", "1", "--symbolic-batch", "2"],
        *["--symbolic-blocks-start", "1", "--symbolic-block-steps", "1"],
        *["--symbolic-block-families", "0"],
        *["--vision-steps", "1", "--vision-batch", "2", "--steps", "2", "--batch", "2"],
        *["--eval-n", "6", "--test-n", "6", "--probe-every", "0"],
        *["--chat-decoder-lr-scale", "0", "--state", str(tmp_path / "state")],
    ]
    assert main([*tiny, "--out", str(tmp_path / "before"), "--stop-at", "3"]) == 0
    # A state saved before a flag existed resumes with that flag at its default.
    state = torch.load(tmp_path / "state" / "state.pt", weights_only=False)
    del state["config"]["count_sink_odds"]
    torch.save(state, tmp_path / "state" / "state.pt")
    assert main([*tiny, "--out", str(tmp_path / "after")]) == 0
    before, after = (load_file(tmp_path / d / "model.safetensors") for d in ("before", "after"))
    # The saved layout is vLLM's (``trio_dev.checkpoints``): ``language_model.*``.
    decoder = [k for k in before if k.startswith("language_model.")]
    image_path = [k for k in before if k.startswith("vision_tower.")]
    assert decoder and image_path
    assert all(torch.equal(before[k], after[k]) for k in decoder)
    assert not all(torch.equal(before[k], after[k]) for k in image_path)
    assert not torch.equal(before["image_newline"], after["image_newline"])

    params = [("model.language_model.w", torch.nn.Parameter(torch.ones(2, 2)))]
    params.append(("model.vision_tower.w", torch.nn.Parameter(torch.ones(2, 2))))
    groups = make_optimizer(params, TrainConfig(), lambda n: 0.1 if _in_decoder(n) else 1.0)
    assert [(g["lr_scale"], len(g["params"])) for g in groups.param_groups] == [
        (1.0, 1),
        (1.0, 0),
        (0.1, 1),
        (0.1, 0),
    ]


def test_a_branch_from_another_runs_stage_0_equals_a_whole_run(tmp_path) -> None:
    """A run started with ``--branch-from`` another run's ``stage0.pt`` (which
    differs in fields read after stage 0 only) or ``stage1.pt`` (fields of the
    chat stage only) writes exactly the weights of the same run trained whole;
    a field of a stage already run that differs is refused by name."""
    from safetensors.torch import load_file

    from benchmarks.quality.train_grid import (
        AFTER_STAGE_0,
        STAGE_0_STATE,
        STAGE_1_STATE,
        TrainConfig,
        main,
    )

    assert set(vars(TrainConfig())) >= AFTER_STAGE_0
    tiny = [
        *["--symbolic-steps", "2", "--symbolic-background-steps", "1", "--symbolic-batch", "2"],
        *["--symbolic-blocks-start", "1", "--symbolic-block-steps", "1"],
        *["--symbolic-block-families", "3", "--relation-layer", "4"],
        *["--vision-steps", "1", "--vision-batch", "2", "--steps", "2", "--batch", "2"],
        *["--eval-n", "6", "--test-n", "6", "--probe-every", "0"],
    ]
    later = ["--chat-decoder-lr-scale", "0.5", "--align-balance", "true", "--vision-lr", "0.001"]
    later += ["--chat-rows-weight", "1"]

    def run(name: str, *extra: str) -> Path:
        out = tmp_path / name
        assert main([*tiny, *extra, "--state", str(out / "state"), "--out", str(out / "m")]) == 0
        return out

    trunk = run("trunk")
    stage0 = trunk / "state" / STAGE_0_STATE
    whole, branch = run("whole", *later), run("branch", *later, "--branch-from", str(stage0))
    a, b, t = (load_file(d / "m" / "model.safetensors") for d in (whole, branch, trunk))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], t[k]) for k in a)  # the later fields did change it
    record = json.loads((branch / "m" / "TRAINING.json").read_text())
    rows = [h["rows_loss"] for h in record["history"] if "rows_loss" in h]
    assert rows and all(0 < r < float("inf") for r in rows)
    with pytest.raises(SystemExit, match="differs in symbolic_lr"):
        run("other", "--symbolic-lr", "0.002", "--branch-from", str(stage0))
    # From the end of stage 1: the chat stage's fields may differ, the vision stage's not.
    chat = ["--chat-decoder-lr-scale", "0.5", "--chat-rows-weight", "1"]
    stage1 = trunk / "state" / STAGE_1_STATE
    whole, branch = run("whole1", *chat), run("branch1", *chat, "--branch-from", str(stage1))
    a, b = (load_file(d / "m" / "model.safetensors") for d in (whole, branch))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SystemExit, match="another stage 1: it differs in vision_lr"):
        run("other1", *later, "--branch-from", str(stage1))


def test_stage_0_schedule_blocks_then_background() -> None:
    """Stage 0: mixed, then one single-family block per listed family, then mixed
    again, each phase warming its learning rate up from its own first step, with
    the background rows coming in over the last steps only."""
    from benchmarks.quality.train_grid import (
        TrainConfig,
        symbolic_background,
        symbolic_family,
        symbolic_phase_start,
    )

    cfg = TrainConfig()
    start = cfg.symbolic_blocks_start
    assert symbolic_family(start - 1, cfg) is None
    assert symbolic_phase_start(start - 1, cfg) == 0
    for n, family in zip(cfg.symbolic_block_steps, cfg.symbolic_block_families, strict=True):
        assert symbolic_family(start, cfg) == g.FAMILIES[family]
        assert symbolic_family(start + n - 1, cfg) == g.FAMILIES[family]
        assert symbolic_phase_start(start, cfg) == symbolic_phase_start(start + n - 1, cfg) == start
        start += n
    assert symbolic_family(start, cfg) is None
    assert symbolic_phase_start(cfg.symbolic_steps - 1, cfg) == start
    with pytest.raises(ValueError, match="one length per"):
        TrainConfig(symbolic_block_steps=(500,))
    last = cfg.symbolic_steps - cfg.symbolic_background_steps
    assert cfg.symbolic_blocks_start < last
    assert symbolic_background(last - 1, cfg) == 0.0
    assert symbolic_background(cfg.symbolic_steps - 1, cfg) == 1.0


def test_every_image_of_a_batch_keeps_its_base_tile_kind() -> None:
    """``batch_kinds`` of several images' concatenated labels equals each image's
    ``tile_kinds``, where ``tile_kinds`` of the concatenation marks the first
    image's base tile alone (the other base tiles read as background)."""
    from benchmarks.quality.symbolic import BASE_TILE, batch_kinds, tile_kinds
    from benchmarks.quality.train_grid import token_labels

    a, b = (token_labels(g.make_sample("eval", i).scene) for i in (0, 1))
    both = torch.cat([a, b])
    assert torch.equal(batch_kinds(both), torch.cat([tile_kinds(a), tile_kinds(b)]))
    assert (tile_kinds(both)[len(a)] != BASE_TILE).all()


def test_symbolic_rows_start_as_the_words_they_show() -> None:
    """With ``symbolic_word_init`` a visual red circle starts as the decoder's own
    vectors for " red" and " circle" (each rescaled), the tokens its questions
    and answers use; other channels and the "nothing" class keep their draw."""
    from benchmarks.quality.symbolic import SymbolicFeatures, ground_in_words
    from benchmarks.quality.train_grid import CHANNELS, build_scene_processor, channel_words

    tokenizer = build_scene_processor().tokenizer
    words = channel_words(tokenizer)
    question = tokenizer("What colour is the circle?", add_special_tokens=False)["input_ids"]
    assert words[1][g.SHAPES.index("circle")] in question
    torch.manual_seed(0)
    embedding = torch.randn(len(tokenizer), 128) * 0.02
    features = SymbolicFeatures(128, [n for _, n in CHANNELS])
    before = [t.weight.detach().clone() for t in features.tables]
    ground_in_words(features, embedding, words)
    for channel, ids in words.items():
        table = features.tables[channel].weight
        for k, token in enumerate(ids):
            cosine = F.cosine_similarity(table[k + 1], embedding[token], dim=0)
            assert cosine > 0.999, (channel, k)
        assert torch.equal(table[0], before[channel][0])
        assert abs(table[1:].std() / before[channel][1:].std() - 1) < 0.2
    for channel in set(range(len(CHANNELS))) - set(words):
        assert torch.equal(features.tables[channel].weight, before[channel])


def test_token_labels_equal_their_per_cell_definition() -> None:
    """``token_labels`` (built on the whole grid at once) equals the definition
    written cell by cell: own classes, and each in-tile neighbour's colour and
    shape, -100 across a tile border and on the base tile."""
    from benchmarks.quality.symbolic import symbolic_scene
    from benchmarks.quality.train_grid import _DIRECTIONS, CHANNELS, _classes, token_labels

    side = g.TILE // g.CELL
    for index in range(24):
        scene = (
            symbolic_scene(index, 0, 0, None)[0]
            if index % 2
            else g.make_sample("eval", index).scene
        )
        tiles_x = scene.width // g.TILE
        expected = torch.full(
            (1 + tiles_x * (scene.height // g.TILE), side * side, len(CHANNELS)), -100
        )
        for k in range(expected.shape[0] - 1):
            ty, tx = divmod(k, tiles_x)
            for p in range(side * side):
                c, r = tx * side + p % side, ty * side + p // side
                row = list(_classes(scene, (c, r)))
                for _, (dx, dy) in _DIRECTIONS:
                    nc, nr = c + dx, r + dy
                    inside = nc // side == tx and nr // side == ty
                    row += list(_classes(scene, (nc, nr))[:2]) if inside else [-100, -100]
                expected[1 + k, p] = torch.tensor(row)
        assert torch.equal(token_labels(scene), expected), index


def test_block_steps_rehearse_every_family() -> None:
    """A block step holds ``symbolic_batch`` single-turn chats of its family and
    ``symbolic_replay_rows`` single-turn chats that, over a few steps, cover
    every family; a mixed step holds multi-turn chats. No scene repeats."""
    from benchmarks.quality.train_grid import TrainConfig, symbolic_chats, symbolic_family

    cfg = TrainConfig(symbolic_replay_rows=8)
    step = cfg.symbolic_blocks_start
    family = symbolic_family(step, cfg)
    rows = symbolic_chats(step, family, cfg)
    assert len(rows) == cfg.symbolic_batch + cfg.symbolic_replay_rows
    focus, replay = rows[: cfg.symbolic_batch], rows[cfg.symbolic_batch :]
    assert all(len(turns) == 1 and turns[0].family == family for _, turns in focus)
    assert all(len(turns) == 1 for _, turns in replay)
    replayed = Counter(
        turns[0].family
        for s in range(step, step + 3)
        for _, turns in symbolic_chats(s, family, cfg)[cfg.symbolic_batch :]
    )
    assert set(replayed) == set(g.FAMILIES)
    mixed = symbolic_chats(step - 1, None, cfg)
    assert len(mixed) == cfg.symbolic_batch
    assert all(len(turns) == cfg.symbolic_turns for _, turns in mixed)
    # After the blocks, mixed steps ask one question per image, as evaluation does.
    tail = [
        t
        for s in range(cfg.symbolic_steps - 3, cfg.symbolic_steps)
        for _, t in symbolic_chats(s, None, cfg)
    ]
    assert all(len(turns) == cfg.symbolic_tail_turns == 1 for turns in tail)
    assert {turns[0].family for turns in tail} == set(g.FAMILIES)
    scenes = [repr(scene) for s in (step, step + 1) for scene, _ in symbolic_chats(s, family, cfg)]
    assert len(set(scenes)) == len(scenes)


@pytest.mark.skipif(
    generator_name() != "benchmarks.quality.grid_scenes",
    reason="the shipped scene model is not a grid-scenes model",
)
def test_shipped_model_reproduces_its_training_record() -> None:
    """The shipped weights (float16, loaded in float32) give exactly the HF greedy
    answers TRAINING.json recorded on the eval split, so its accuracy and
    per-family table are those of these files: any change to the weights,
    processor, prompt format, scene generator or answer normalisation shows up."""
    from benchmarks.quality.shipped import MODEL_DIR, training_record
    from benchmarks.quality.train_grid import evaluate, load_checkpoint

    record = training_record()
    expected = record["eval_hf_float32"]
    torch.set_num_threads(2)
    model, processor = load_checkpoint(MODEL_DIR)  # raises on missing or unexpected keys
    samples = g.make_split("eval", expected["n"], record["config"]["seed"])
    report = evaluate(model, processor, samples)
    assert report["answers"] == record["eval_answers"]
    assert (report["accuracy"], report["per_family"]) == (
        expected["accuracy"],
        expected["per_family"],
    )


def test_boolean_flags_parse_true_and_false() -> None:
    """``--symbolic-word-init false`` turns it off (argparse's ``bool("false")`` is True)."""
    from benchmarks.quality.train_grid import _flag

    assert _flag("false") is False and _flag("False") is False and _flag("0") is False
    assert _flag("true") is True and _flag("1") is True
    with pytest.raises(argparse.ArgumentTypeError, match="true or false"):
        _flag("yes please")


def test_question_keys_name_what_each_question_asks_about() -> None:
    """``question_keys`` reads the colour, shape (plurals too) and side a question
    names, and its family, for every family's wording, first and extra turns."""
    from benchmarks.quality.evidence import QUERY_CHANNELS, question_keys
    from benchmarks.quality.symbolic import symbolic_scene

    seen = Counter()
    for index in range(60):
        for turn in symbolic_scene(index, 0, 5, None)[1]:
            colour, shape, side, family = question_keys(turn)
            words = turn.question.rstrip("?").split()
            assert family == g.FAMILIES.index(turn.family)
            named = [c for c in g.COLOURS if c in words]
            assert colour == (list(g.COLOURS).index(named[0]) + 1 if named else 0)
            named = [s for s in g.SHAPES if s in words or f"{s}s" in words]
            assert shape == (g.SHAPES.index(named[0]) + 1 if named else 0)
            sides = [r for r in g.RELATIONS if f" {r} " in turn.question]
            assert side == (list(g.RELATIONS).index(sides[0]) + 1 if sides else 0)
            assert all(
                0 <= k < n
                for k, (_, n) in zip((colour, shape, side, family), QUERY_CHANNELS, strict=True)
            )
            seen[turn.family] += 1
    assert set(seen) == set(g.FAMILIES)


def test_count_answers_also_target_the_first_token() -> None:
    """With ``count_sink`` a count's supervised attention covers its objects and BOS
    (position 0), so the heads' output can tell 1 from 4 objects; every other
    family, and count without the flag, targets its evidence alone."""
    from benchmarks.quality.train_grid import attention_targets

    assert attention_targets([40, 52], "count", True) == [40, 52, 0]
    assert attention_targets([40, 52], "count", False) == [40, 52]
    for family in ("colour", "shape", "relation", "presence", "text"):
        assert attention_targets([40], family, True) == [40]


def test_count_heads_with_odds_hold_a_thermometer_code_of_the_count() -> None:
    """``count_shares``: BOS gets ``odds`` times an object's share, the shares sum
    to one, and BOS holds more than half exactly when fewer than ``odds``
    objects are counted; odds need one per count head."""
    from benchmarks.quality.train_grid import TrainConfig, count_shares

    for odds in (1.5, 2.5, 3.5):
        for n in range(1, 5):
            shares = count_shares(n, odds)
            assert len(shares) == n + 1 and sum(shares) == pytest.approx(1.0)
            assert shares[-1] == pytest.approx(odds * shares[0])
            assert (shares[-1] > 0.5) == (n < odds)
    with pytest.raises(ValueError, match="one odds per count head"):
        TrainConfig(count_heads=(0, 1), count_sink_odds=(1.5, 2.5, 3.5))


def test_relation_heads_target_the_named_object_on_the_asked_side() -> None:
    """One relation head per side: the asked side's head is pulled onto the named
    object, every other side's onto BOS; other families have no relation targets."""
    from benchmarks.quality.train_grid import relation_targets

    for index, side in enumerate(g.RELATIONS):
        turn = g.Turn(f"What shape is {side} the red circle?", "square", "relation")
        targets = relation_targets([77], turn)
        assert targets == [[77] if s == index else [0] for s in range(len(g.RELATIONS))]
    with pytest.raises(ValueError, match="not a relation question"):
        relation_targets([77], g.Turn("What colour is the circle?", "red", "colour"))


def test_neighbour_heads_attend_to_each_in_tile_neighbour() -> None:
    """``tower_init.neighbour_heads`` gives the scene model's CLIP tower, at
    initialisation, one layer-0 head per side that puts at least 0.9 of every
    patch's attention on that side's neighbour (scene tiles through the real
    processor; HF eager attention weights)."""
    from benchmarks.quality.grid_scenes import make_conversation
    from benchmarks.quality.tower_init import neighbour_heads
    from benchmarks.quality.train_grid import _DIRECTIONS, build_model, build_scene_processor

    model, processor = build_model(0), build_scene_processor()
    tower = model.model.vision_tower
    offsets = [d for _, d in _DIRECTIONS]
    neighbour_heads(tower, offsets)
    tower.config._attn_implementation = "eager"
    images = [make_conversation("train", i, 0, 0)[0].image for i in range(3)]
    encode = processor.image_processor
    pixels = torch.cat([encode(images=im, return_tensors="pt")["pixel_values"][0] for im in images])
    with torch.no_grad():
        weights = tower(pixels, output_attentions=True).attentions[0]
    side = g.TILE // g.CELL
    for head, (dx, dy) in enumerate(offsets):
        for p in range(side * side):
            x, y = p % side + dx, p // side + dy
            if 0 <= x < side and 0 <= y < side:
                on_neighbour = weights[:, head, 1 + p, 1 + y * side + x]
                assert on_neighbour.min() >= 0.9, (head, p, on_neighbour)


def test_readout_gradient_reaches_the_tokens_scaled() -> None:
    """``scaled_gradient`` leaves values alone and scales what flows back into the
    tokens: 0 detaches (heads as pure probes), 0.5 halves, 1 is the identity."""
    from benchmarks.quality.train_grid import scaled_gradient

    x = torch.randn(3, 4)
    for weight in (0.0, 0.5, 1.0):
        leaf = x.clone().requires_grad_(True)
        out = scaled_gradient(leaf, weight)
        assert torch.equal(out, x)
        if weight == 0.0:
            assert not out.requires_grad
            continue
        (out * 3).sum().backward()
        assert torch.allclose(leaf.grad, torch.full_like(x, 3 * weight))


@pytest.mark.skipif(
    generator_name() != "benchmarks.quality.grid_scenes",
    reason="the shipped scene model is not a grid-scenes model",
)
def test_diagnosis_labels_tokens_and_counts_kept_evidence(tmp_path) -> None:
    """The item-4 diagnosis: every visual token gets its kind from the layout and
    the scene, evidence recall is 1 wherever every token is kept, and its
    McNemar cells are the ones its stored per-question answers give."""
    from benchmarks.quality import diagnose as d
    from benchmarks.quality.harness import HFRunner
    from benchmarks.quality.shipped import MODEL_DIR

    hf = HFRunner(MODEL_DIR, max_new_tokens=2, fastv_k=1)
    sample = g.make_sample("eval", 4)
    prep = hf.prepare(0, sample)
    kinds = d.token_kinds(prep)
    p = hf.patches_per_side
    assert int((kinds == d.BASE).sum()) == p * p
    assert int((kinds == d.NEWLINE).sum()) == prep.layout.grid_shape[0]
    assert int((kinds == d.DRAWN).sum()) == len(sample.scene.cells)

    args = ["--n", "6", "--depths", "0", "--positions", "ref", "final1", "--taus", "0.8"]
    args += ["--baseline", "d0-ref-t0.8", "--threads", "2"]
    for stem, ratio in (("full", "1"), ("pruned", "0.111")):
        assert d.main([*args, "--ratio", ratio, "--out", str(tmp_path / stem)]) == 0
    full = json.loads((tmp_path / "full.json").read_text())["rows"]
    assert [r["variant"] for r in full] == [
        "d0-ref-t0.8", "d0-final1-t0.8", "cls-attn", "diversity"
    ]  # fmt: skip
    assert all(r["recall_all"] == 1.0 and r["evidence_share"] == 1.0 for r in full)
    assert len({r["correct"] for r in full}) == 1  # nothing pruned: the same answers
    pruned = json.loads((tmp_path / "pruned.json").read_text())["rows"]
    base = [c == "1" for c in pruned[0]["correct"]]
    for row in pruned[1:]:
        mine = [c == "1" for c in row["correct"]]
        assert (row["only_this"], row["only_base"], row["p"]) == mcnemar_exact(mine, base)
        assert 0.0 <= row["recall_all"] <= row["evidence_share"] <= 1.0
        kept = row["kept_base"] + row["kept_newline"] + row["kept_drawn"]
        assert 0.0 < kept <= 1.0 + 1e-9


def test_readout_threshold_ceiling_and_neighbour_labels() -> None:
    """The count ceiling is the best ordered-threshold accuracy (brute force
    agrees), and a relation question's own answer is the neighbour label of
    its named object on the asked side."""
    import itertools
    import random

    from benchmarks.quality import readout as r
    from benchmarks.quality.evidence import evidence_cells

    rng = random.Random(0)
    counts = [rng.randint(1, 4) for _ in range(40)]
    shares = [c / (c + 1) + rng.gauss(0, 0.06) for c in counts]
    cuts = [*sorted(shares), 2.0]
    brute = max(
        sum(1 + sum(s >= t for t in ts) == c for s, c in zip(shares, counts, strict=True))
        for ts in itertools.combinations_with_replacement(cuts, 3)
    ) / len(counts)
    assert r.threshold_ceiling(shares, counts) == brute
    assert r.threshold_ceiling([0.1, 0.2, 0.3, 0.4], [1, 2, 3, 4]) == 1.0

    for index in range(3, 3 + 6 * 12, 6):
        sample = g.make_sample("train", index)
        turn = g.Turn(sample.question, sample.answer, "relation")
        cell = evidence_cells(sample.scene, turn)[0]
        side = next(s for s in g.RELATIONS if f" {s} the " in sample.question)
        dx, dy = g.RELATIONS[side]
        assert r.neighbour_label(sample.scene, cell, dx, dy) == g.SHAPES.index(sample.answer)


def test_readout_on_the_shipped_model(tmp_path) -> None:
    """The supervised heads look up the named object for relation questions
    (measured 0.99 of their attention), a probe reads a token's own shape, and
    the report is written."""
    from benchmarks.quality import readout as r

    out = tmp_path / "readout"
    assert r.main(["--n", "36", "--probe-n", "40", "--threads", "2", "--out", str(out)]) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    assert {row["family"] for row in data["rows"]} == {"count", "relation"}
    for row in data["rows"]:
        assert abs(sum(row[p] for p in r.PARTS) - 1.0) < 1e-5
        if row["family"] == "relation":
            assert row["evidence"] > 0.9
    assert data["probes"]["token_tower: own shape"]["accuracy"] > 0.9
    assert "## Count: evidence share per true count" in out.with_suffix(".md").read_text()


@pytest.mark.skipif(
    generator_name() != "benchmarks.quality.grid_scenes",
    reason="needs the shipped grid-scene model",
)
def test_harness_parts_merge_into_the_table_of_one_run(tmp_path) -> None:
    """``--part`` runs of disjoint arms joined by ``--merge`` give the rows one
    run of all those arms gives (every number but the arms' seconds), and a part
    repeated, or a part of another question set, is refused."""
    from benchmarks.quality import harness

    common = ["--n", "12", "--ratios", "1", "0.111", "--threads", "1"]
    arms = {"a": ["hf-unpruned", "random"], "b": ["grid", "diversity"]}
    assert (
        harness.main([*common, "--arms", *arms["a"], *arms["b"], "--out", str(tmp_path / "one")])
        == 0
    )
    for name, subset in arms.items():
        out = str(tmp_path / name)
        assert harness.main([*common, "--arms", *subset, "--part", "--out", out]) == 0
    parts = [str(tmp_path / f"{name}.part.json") for name in arms]
    assert harness.main(["--merge", *parts, "--out", str(tmp_path / "merged")]) == 0

    def rows(stem: str) -> list[dict]:
        table = json.loads((tmp_path / f"{stem}.json").read_text())["rows"]
        return [{k: v for k, v in row.items() if k != "seconds"} for row in table]

    assert rows("merged") == rows("one")
    assert len(rows("one")) == 1 + 3  # unpruned, then three baselines at 0.111
    with pytest.raises(SystemExit, match="more than one part"):
        harness.main(["--merge", parts[0], parts[0], "--out", str(tmp_path / "twice")])
    other = tmp_path / "other"
    assert (
        harness.main(
            [*common[:1], "6", *common[2:], "--arms", "grid", "--part", "--out", str(other)]
        )
        == 0
    )
    with pytest.raises(SystemExit, match="other n"):
        harness.main(["--merge", parts[0], f"{other}.part.json", "--out", str(tmp_path / "x")])


@pytest.mark.skipif(
    generator_name() != "benchmarks.quality.grid_scenes",
    reason="needs the shipped grid-scene model",
)
def test_record_comparison_rescores_the_recorded_answers() -> None:
    """``compare_records`` scores a record's answers to the accuracy the record
    states, and a changed answer moves exactly one McNemar cell."""
    from benchmarks.quality.compare_records import compare
    from benchmarks.quality.shipped import MODEL_DIR, training_record

    record = training_record(MODEL_DIR)
    same = compare(record, record)
    assert round(same["new"]["accuracy"], 4) == record["eval_hf_float32"]["accuracy"]
    assert (same["only_new"], same["only_old"], same["p"]) == (0, 0, 1.0)
    samples = g.make_split("eval", len(record["eval_answers"]), record["config"]["seed"])
    wrong = next(
        i
        for i, (a, s) in enumerate(zip(record["eval_answers"], samples, strict=True))
        if a != s.answer
    )
    fixed = {**record, "eval_answers": list(record["eval_answers"])}
    fixed["eval_answers"][wrong] = samples[wrong].answer
    moved = compare(fixed, record)
    assert (moved["only_new"], moved["only_old"]) == (1, 0)


def test_symbolic_eval_scores_both_inputs_on_the_same_questions(tmp_path) -> None:
    """``symbolic_eval`` on a (tiny) saved training state: every question is
    scored from symbolic rows and from the image, per family and overall, and
    each family's McNemar cells are the difference of its two accuracies."""
    from benchmarks.quality import symbolic_eval
    from benchmarks.quality.train_grid import main

    tiny = [
        *["--symbolic-steps", "2", "--symbolic-background-steps", "1", "--symbolic-batch", "2"],
        *["--symbolic-blocks-start", "2", "--symbolic-block-steps", "1"],
        *["--symbolic-block-families", "3", "--vision-steps", "1", "--vision-batch", "2"],
        *["--steps", "1", "--batch", "2", "--eval-n", "6", "--test-n", "6", "--probe-every", "0"],
        *["--relation-layer", "4"],
    ]
    state = tmp_path / "state"
    assert main([*tiny, "--state", str(state), "--out", str(tmp_path / "model")]) == 0
    out = tmp_path / "symbolic.json"
    assert symbolic_eval.main(["--state", str(state), "--n", "12", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    families = record["families"]
    assert record["step"] == 4 and families["overall"]["n"] == 12
    assert sum(families[f]["n"] for f in g.FAMILIES) == 12
    for r in families.values():
        diff = round((r["symbolic"] - r["image"]) * r["n"])
        assert r["only_symbolic"] - r["only_image"] == diff
    # The tower's fit counts every tile token once, and every object's channels.
    from benchmarks.quality.symbolic import OBJECT, tile_kinds
    from benchmarks.quality.train_grid import token_labels

    labels = [token_labels(s.scene) for s in g.make_split("eval", 12)]
    fit = record["tower_fit"]
    assert sum(k["tokens"] for k in fit["kinds"].values()) == sum(x[..., 0].numel() for x in labels)
    objects = sum(int((tile_kinds(x) == OBJECT).sum()) for x in labels)
    assert fit["nearest_class"]["colour"]["tokens"] == objects
    assert all(0 <= r["accuracy"] <= 1 for r in fit["nearest_class"].values() if r["tokens"])


def test_rows_loss_on_objects_compares_object_tokens_and_answer_positions(tmp_path) -> None:
    """``chat_rows_positions`` "objects": the rows loss reads the decoder's hidden
    states at the object tokens and the answer-predicting positions only (a
    change at a background token leaves it, one at an object token or the
    answer's query moves it), while "all" reads every position; another value
    is refused by name."""
    from dataclasses import replace

    from benchmarks.quality.symbolic import OBJECT, packed_layout
    from benchmarks.quality.train_grid import (
        TrainConfig,
        Trainer,
        chat_losses,
        make_batch,
        token_labels,
    )

    with pytest.raises(ValueError, match="chat_rows_positions"):
        TrainConfig(chat_rows_positions="visual")
    cfg = TrainConfig(batch=2, chat_rows_positions="objects")
    trainer = Trainer(cfg, tmp_path / "state", torch.device("cpu"))
    batch = make_batch(trainer.processor, 0, cfg)
    with torch.no_grad():
        hidden = chat_losses(trainer.model, batch, trainer._align_loss)[3]
        ids = batch.input_ids[0].tolist()
        first = ids.index(trainer.model.config.image_token_index)
        kinds, _ = packed_layout(batch.scenes[0], token_labels(batch.scenes[0]))
        background = first + int((kinds != OBJECT).nonzero()[0])
        obj = first + int((kinds == OBJECT).nonzero()[0])
        query = next(q for r, q, _, _ in batch.looks if r == 0)

        def loss(mode: str, at: int | None) -> float:
            trainer.cfg = replace(cfg, chat_rows_positions=mode)
            moved = [h.clone() for h in hidden]
            if at is not None:
                for h in moved[1:]:
                    h[0, at] += 1.0
            return trainer._rows_loss(batch, moved).item()

        base = loss("objects", None)
        assert 0 < base < float("inf")
        assert loss("objects", background) == pytest.approx(base, rel=1e-6)
        assert loss("objects", obj) > base and loss("objects", query) > base
        assert loss("all", background) > loss("all", None)


def test_vision_learning_rate_decays_over_its_last_share() -> None:
    """``vision_decay_fraction``: constant after the warm-up until the last share
    of the vision steps, then linear down to ``min_lr_ratio``; 0 keeps it constant."""
    from benchmarks.quality.train_grid import TrainConfig, vision_lr_at

    cfg = TrainConfig(vision_steps=200, vision_decay_fraction=0.5, warmup=10)
    assert vision_lr_at(0, cfg) == pytest.approx(cfg.vision_lr / 10)
    assert vision_lr_at(100, cfg) == pytest.approx(cfg.vision_lr)
    assert vision_lr_at(150, cfg) < cfg.vision_lr
    last = cfg.vision_lr * (1 - (1 - cfg.min_lr_ratio) * 99 / 100)  # one step short of the floor
    assert vision_lr_at(199, cfg) == pytest.approx(last)
    flat = TrainConfig(vision_steps=200, warmup=10)
    assert {vision_lr_at(s, flat) for s in range(10, 200)} == {flat.vision_lr}


def test_adjacent_objects_are_a_kind_of_their_own_in_the_balanced_regression(tmp_path) -> None:
    """``align_adjacent``: an error on an object token with an object beside it
    costs its squared norm over the number of such tokens, shared with the other
    kinds as one more equal part; without it, over the number of all object
    tokens. It needs ``align_balance``."""
    from dataclasses import replace

    from benchmarks.quality.symbolic import OBJECT, batch_kinds
    from benchmarks.quality.train_grid import TrainConfig, Trainer, token_labels

    with pytest.raises(ValueError, match="align_adjacent"):
        TrainConfig(align_adjacent=True)
    cfg = TrainConfig(align_balance=True, align_adjacent=True)
    trainer = Trainer(cfg, tmp_path / "s", torch.device("cpu"))
    sample = next(s for s in g.make_split("eval", 12) if s.family == "relation")
    labels = token_labels(sample.scene)
    kinds = batch_kinds(labels)
    adjacent = (kinds == OBJECT) & (labels[..., 3:] > 0).any(-1)
    assert adjacent.any() and (adjacent != (kinds == OBJECT)).any()
    with torch.no_grad():
        target = trainer.symbolic(kinds, labels)
        moved = target.clone()
        at = adjacent.nonzero()[0]
        moved[at[0], at[1], 0] += 2.0  # squared error 4 on one adjacent object token

        def cost(config: TrainConfig) -> float:
            trainer.cfg = config
            total = trainer._align_loss(moved, labels) - trainer._align_loss(target, labels)
            heads = trainer.heads.loss(moved, labels)[0] - trainer.heads.loss(target, labels)[0]
            return (total - heads).item()  # the regression's part

        parts = len(kinds.unique()) + 1
        assert cost(cfg) == pytest.approx(4.0 / int(adjacent.sum()) / parts, rel=1e-4)
        plain = replace(cfg, align_adjacent=False)
        assert cost(plain) == pytest.approx(
            4.0 / int((kinds == OBJECT).sum()) / (parts - 1), rel=1e-4
        )


def test_channel_fit_reads_the_share_of_each_true_row_an_object_token_carries() -> None:
    """``symbolic_eval.ChannelFit``: tokens equal to their symbolic rows carry
    every channel with gain 1 and the nearest class right; with one neighbour
    channel's row taken out, that channel's gain is 0 and no object beside a
    token is found, while its all-class accuracy still counts the many tokens
    whose neighbour is nothing (class 0) as right."""
    from benchmarks.quality.symbolic import OBJECT, SymbolicFeatures, tile_kinds
    from benchmarks.quality.symbolic_eval import ChannelFit
    from benchmarks.quality.train_grid import CHANNELS, token_labels

    torch.manual_seed(0)
    symbolic = SymbolicFeatures(64, [n for _, n in CHANNELS])
    names = [n for n, _ in CHANNELS]
    whole, cut = ChannelFit(), {c: ChannelFit() for c in range(3, len(names))}
    with torch.no_grad():
        for sample in (s for s in g.make_split("eval", 24) if s.family == "relation"):
            labels = token_labels(sample.scene)
            at = tile_kinds(labels) == OBJECT
            rows, known = symbolic(tile_kinds(labels), labels)[at], labels[at]
            whole.add(symbolic, rows, rows, known)
            for c, fit in cut.items():
                fit.add(symbolic, rows - symbolic.tables[c](known[:, c].clamp(min=0)), rows, known)
    full = whole.summary()
    present = [n for n in names if full[n]["present_tokens"]]
    assert set(names[:2]) < set(present) and len(set(names[3:]) & set(present)) >= 2
    assert all(full[n]["gain"] == pytest.approx(1.0) for n in present)
    assert all(full[n]["present_accuracy"] == 1.0 for n in present)
    for c, fit in cut.items():
        blind = fit.summary()
        if names[c] in present:
            assert blind[names[c]]["gain"] == pytest.approx(0.0, abs=1e-6)
            assert blind[names[c]]["present_accuracy"] == 0.0
            assert blind[names[c]]["accuracy"] > 0.5
