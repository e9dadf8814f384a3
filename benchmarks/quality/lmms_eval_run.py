"""lmms-eval's OpenAI backend against ``vllm serve --plugin trio``, next to the harness.

    scripts/setup_lmms.sh              # lmms-eval 0.7.3 in .venv-lmms (pyproject's [lmms])
    .venv/bin/python -m benchmarks.quality.lmms_eval_run [--n 120] [--ratios 1 0.111]

Nothing is downloaded. The first ``--n`` questions of the scene eval split
become a local lmms-eval task (``artifacts/lmms_eval/``): a JSON-lines
dataset with PNG files, loaded by lmms-eval through ``datasets``'
``json`` builder, and a task YAML whose functions
(``lmms_eval_task.py``) give lmms-eval the image, the question and the
harness's own scoring (``normalize_answer`` of the answer equals the
expected word). For each keep ratio a ``vllm serve --plugin trio
--trio-keep-ratio r --trio-depth 2`` of the shipped scene model answers
lmms-eval's ``--model openai`` requests (lmms-eval sends no per-request
ratio, so the server default decides). The harness's vLLM arm
(``harness.run_vllm``, in-process engine, same model, depth, ratios and
``max_tokens``) answers the same questions; the script prints both
accuracies, the questions where the two disagree, and saves
``benchmarks/results/lmms_eval.json``. It exits 1 if the accuracies differ.

``--lmms-python`` is the interpreter that has lmms-eval (default:
``.venv-lmms/bin/python``, else this one).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..common import ARTIFACTS, RESULTS
from .grid_scenes import Sample, normalize_answer
from .harness import answer_token_budget, run_vllm
from .shipped import MODEL_DIR, scene_generator, training_record

ROOT = Path(__file__).resolve().parents[2]
TASK = "trio_scenes"
DEPTH = 2
MAX_MODEL_LEN = 2048

TASK_YAML = """\
# Written by benchmarks/quality/lmms_eval_run.py: the scene eval split, local files only.
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {max_tokens}
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
metadata:
  - version: 1.0
"""


def write_task(work: Path, samples: list[Sample], max_tokens: int) -> Path:
    """The dataset (JSON lines + PNGs) and the task directory for ``--include_path``."""
    data = work / "data"
    images = data / "images"
    images.mkdir(parents=True, exist_ok=True)
    with (data / "test.jsonl").open("w") as f:
        for i, s in enumerate(samples):
            path = images / f"{i:04d}.png"
            s.image.save(path)
            row = {"doc_id": i, "image": str(path), "question": s.question, "answer": s.answer}
            f.write(json.dumps(row | {"family": s.family}) + "\n")
    tasks = work / "tasks" / TASK
    tasks.mkdir(parents=True, exist_ok=True)
    (tasks / f"{TASK}.yaml").write_text(
        TASK_YAML.format(task=TASK, data=data / "test.jsonl", max_tokens=max_tokens)
    )
    shutil.copy(Path(__file__).with_name("lmms_eval_task.py"), tasks / "utils.py")
    return tasks.parent


def run_lmms_eval(lmms_python: str, url: str, model: str, tasks: Path, out: Path) -> Path:
    """``python -m lmms_eval --model openai ...``; returns its per-sample log."""
    model_args = ",".join([
        f"model_version={model}", f"base_url={url}/v1", "api_key=EMPTY",
        "num_concurrent=4", "max_retries=1", "timeout=300",
    ])  # fmt: skip
    cmd = [
        lmms_python, "-m", "lmms_eval", "--model", "openai", "--model_args", model_args,
        "--tasks", TASK, "--include_path", str(tasks), "--batch_size", "1",
        "--log_samples", "--output_path", str(out),
    ]  # fmt: skip
    env = os.environ | {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(out / "datasets-cache"),
        # The task's utils.py imports the harness's scoring from the checkout.
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    (out / "lmms_eval.log").write_text(" ".join(cmd) + "\n\n" + proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"lmms-eval failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    [samples] = sorted(out.rglob(f"*_samples_{TASK}.jsonl"))
    return samples


def lmms_answers(samples_log: Path) -> tuple[dict[int, str], float]:
    """doc id -> normalised answer, and lmms-eval's own accuracy (from its results file)."""
    answers = {}
    for line in samples_log.read_text().splitlines():
        rec = json.loads(line)
        resp = rec["filtered_resps"]  # a string, or a list of one, by lmms-eval version
        answers[int(rec["doc_id"])] = normalize_answer(resp if isinstance(resp, str) else resp[0])
    [results] = sorted(samples_log.parent.glob("*_results.json"))
    accuracy = json.loads(results.read_text())["results"][TASK]["accuracy,none"]
    return answers, accuracy


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=120, help="first n questions of the eval split")
    ap.add_argument("--ratios", type=float, nargs="+", default=[1.0, 0.111])
    ap.add_argument("--model", type=Path, default=MODEL_DIR)
    own_env = ROOT / ".venv-lmms" / "bin" / "python"
    ap.add_argument("--lmms-python", default=str(own_env if own_env.exists() else sys.executable))
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer

    from trio_dev.local_server import TEST_SERVER_ARGS, vllm_server

    start = time.monotonic()
    work = ARTIFACTS / "lmms_eval"
    shutil.rmtree(work, ignore_errors=True)
    # The eval split of the generator the model was trained on.
    samples = scene_generator(training_record(args.model)).make_split("eval", args.n)
    max_tokens = answer_token_budget(AutoTokenizer.from_pretrained(args.model), samples)
    tasks = write_task(work, samples, max_tokens)
    base_args = list(TEST_SERVER_ARGS)
    base_args[base_args.index("--max-model-len") + 1] = str(MAX_MODEL_LEN)

    rows: list[dict[str, Any]] = []
    for r in args.ratios:
        server = ["--plugin", "trio", "--trio-keep-ratio", str(r), "--trio-depth", str(DEPTH)]
        out = work / f"r{r:g}"
        out.mkdir(parents=True)
        log_path = out / "server.log"
        with vllm_server(args.model, server, log_path, 900, tuple(base_args)) as url:
            log = run_lmms_eval(args.lmms_python, url, str(args.model), tasks, out)
        answers, accuracy = lmms_answers(log)
        rows.append({"ratio": r, "lmms_accuracy": accuracy, "lmms_answers": answers})
        print(f"[{time.monotonic() - start:5.0f} s] lmms-eval r={r:g}: {100 * accuracy:.1f}%")

    t0 = time.perf_counter()
    harness = run_vllm(args.model, samples, args.ratios, DEPTH, max_tokens, MAX_MODEL_LEN, 0, t0)
    truth = [normalize_answer(s.answer) for s in samples]
    ok = True
    for row, res in zip(rows, harness, strict=True):
        lmms = [row["lmms_answers"][i] for i in range(len(samples))]
        row.update(
            harness_accuracy=res.accuracy,
            harness_correct=res.correct,
            lmms_correct=[a == expected for a, expected in zip(lmms, truth, strict=True)],
            same_answers=sum(a == b for a, b in zip(lmms, res.answers, strict=True)),
            different=[
                {"doc_id": i, "lmms": a, "harness": b, "expected": samples[i].answer}
                for i, (a, b) in enumerate(zip(lmms, res.answers, strict=True))
                if a != b
            ],
        )
        row["lmms_answers"] = lmms
        row["harness_answers"] = res.answers
        ok &= abs(row["lmms_accuracy"] - row["harness_accuracy"]) < 1e-9
    print(f"{'ratio':>6} {'lmms-eval':>10} {'harness':>8} {'same answers':>13}")
    for row in rows:
        print(
            f"{row['ratio']:>6g} {100 * row['lmms_accuracy']:>9.1f}% "
            f"{100 * row['harness_accuracy']:>7.1f}% {row['same_answers']:>7}/{len(samples)}"
        )
    version = "import importlib.metadata as m; print(m.version('lmms-eval'))"
    meta = {
        "n": len(samples), "depth": DEPTH, "max_tokens": max_tokens, "model": str(args.model),
        "lmms_eval": subprocess.run(
            [args.lmms_python, "-c", version], capture_output=True, text=True
        ).stdout.strip(),
        "wall_s": time.monotonic() - start,
    }  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "lmms_eval.json"
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"saved {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
