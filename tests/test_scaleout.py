"""Scale-out: tensor parallelism works with TRIO; pipeline parallelism is refused.

Under ``--tensor-parallel-size 2`` each worker runs the side pass on its weight
shards (``vllm_trio.core.TensorParallel``, checked against unsharded maths in
``test_core_tensor_parallel.py``). Here the real vLLM CPU build runs two
worker processes joined by its own process group, and every selection and
greedy answer must equal the single-worker engine's: offline through
``LLM(tensor_parallel_size=2)`` (selections read from both ranks) and through
``vllm serve --plugin trio -tp 2`` on 127.0.0.1.

vLLM's CPU workers bind their OpenMP threads per rank; on a host with fewer
NUMA nodes than ranks (this 2-core machine has one) its automatic binding
refuses to start, so the tests name the cores with ``VLLM_CPU_OMP_THREADS_BIND``
as a user on such a host must.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from conftest import ENGINE_KWARGS, TEST_DEPTH, chat_prompt, make_image
from openai import OpenAI
from vllm import SamplingParams

from trio_dev.local_server import (
    cpu_worker_env,
    image_chat_messages,
    metric_samples,
    vllm_server_process,
)
from vllm_trio.binding.model import selection_log
from vllm_trio.core.budget import num_kept_tokens

pytestmark = pytest.mark.engine
TP = 2
GREEDY = SamplingParams(temperature=0, max_tokens=8)
N_112 = 88  # visual tokens of a 112x112 image on the tiny checkpoint
#: (question, image sizes, keep ratio): several anyres grids, two images in one prompt.
CASES = [
    ("tp: what is left of the square?", [(112, 112)], 0.25),
    ("tp: how many circles?", [(224, 112)], 0.111),
    ("tp: which colour is on top?", [(112, 224)], 0.5),
    ("tp: compare the two pictures.", [(112, 112), (300, 200)], 0.2),
]


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """``values`` in the environment of an engine started in this process.

    vLLM caches its environment variables once an engine has started here;
    its own ``disable_envs_cache`` (meant for isolating tests) lets the new
    values be read, and again drops them for the engines started after.
    """
    from vllm import envs

    saved = {name: os.environ.get(name) for name in values}
    envs.disable_envs_cache()
    os.environ.update(values)
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old
        envs.disable_envs_cache()


@pytest.fixture(scope="module")
def tp2_llm(tiny_ckpt: Path):
    """TRIO engine with two tensor-parallel workers; otherwise as ``trio_llm_nocache``.

    Its engine core runs in its own process: vLLM's parallel state is global
    per process, and tearing down a TP engine inside the test process would
    take the in-process TP=1 engines' state with it. ``apply_model`` then has
    to pickle the function it sends (loopback, test only).
    """
    from vllm import LLM

    import vllm_trio

    env = {
        **cpu_worker_env(TP),
        "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
        "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
    }
    with environment(env):
        llm = LLM(
            model=str(tiny_ckpt),
            tensor_parallel_size=TP,
            distributed_executor_backend="mp",
            enable_prefix_caching=False,
            mm_processor_cache_gb=0,
            max_num_batched_tokens=2048,
            **ENGINE_KWARGS,
            **vllm_trio.engine_kwargs(keep_ratio=0.25, depth=TEST_DEPTH),
        )
        yield llm
        llm.llm_engine.engine_core.shutdown()


def _request(question: str, sizes: list[tuple[int, int]], ratio: float) -> dict:
    images = [make_image(70 + i, size) for i, size in enumerate(sizes)]
    return {
        "prompt": chat_prompt(question, len(images)),
        "multi_modal_data": {"image": images if len(images) > 1 else images[0]},
        "mm_processor_kwargs": {"trio_keep_ratio": ratio},
    }


def _selections(log: list, prompt_ids: list[int]) -> list[tuple[int, int, list[int]]]:
    return [(r.ordinal, r.num_tokens, r.keep) for r in log if list(r.prompt_ids) == prompt_ids]


def test_tp2_selects_and_answers_as_tp1(tp2_llm, trio_llm_nocache) -> None:
    requests = [_request(*case) for case in CASES]
    tp2_out = tp2_llm.generate(requests, GREEDY)
    tp1_out = trio_llm_nocache.generate(requests, GREEDY)
    logs = tp2_llm.apply_model(selection_log)
    assert len(logs) == TP  # one log per worker: the side pass ran on every rank
    # The images were encoded in one step: one batched side pass over shards
    # (its kept indices broadcast from rank 0 in one message).
    assert all(max(r.batch_size for r in log) > 1 for log in logs)
    [tp1_log] = trio_llm_nocache.apply_model(selection_log)
    tokenizer = tp2_llm.get_tokenizer()
    for (question, sizes, _), one, two in zip(CASES, tp1_out, tp2_out, strict=True):
        assert two.outputs[0].token_ids == one.outputs[0].token_ids, question
        assert two.prompt_token_ids == one.prompt_token_ids, question
        ids = tokenizer.encode(chat_prompt(question, len(sizes)))  # what the side pass saw
        expected = _selections(tp1_log, ids)
        assert len(expected) == len(sizes), question  # every image was pruned
        for rank_log in logs:
            assert _selections(rank_log, ids) == expected, question


def test_vllm_serve_tp2_with_trio(tiny_ckpt: Path, tmp_path: Path, trio_llm_nocache) -> None:
    """``vllm serve --plugin trio -tp 2``: ratios on the API, answers as one worker gives."""
    args = ["--plugin", "trio", "--trio-keep-ratio", "0.25", "--trio-depth", str(TEST_DEPTH),
            "--tensor-parallel-size", str(TP)]  # fmt: skip
    log = tmp_path / "serve_tp2.log"
    messages = image_chat_messages("tp: where is the circle?", [make_image(80)])
    with vllm_server_process(tiny_ckpt, args, log, env=cpu_worker_env(TP)) as server:
        client, model = _openai(server.url)
        results = {r: _chat(client, model, messages, r) for r in (1.0, 0.111, None)}
    text_tokens = results[1.0].usage.prompt_tokens - N_112
    for ratio, resp in results.items():
        kept = num_kept_tokens(N_112, 0.25 if ratio is None else ratio)
        assert resp.usage.prompt_tokens == text_tokens + kept, ratio
        offline = _alone(trio_llm_nocache, messages, 0.25 if ratio is None else ratio)
        assert resp.choices[0].message.content == offline.outputs[0].text, ratio
    assert "tensor_parallel_size=2" in log.read_text()


def test_vllm_serve_data_parallel_replicas(
    tiny_ckpt: Path, tmp_path: Path, trio_llm_nocache
) -> None:
    """vLLM's own replicas in one server (``--data-parallel-size 2``, its internal
    load balancer): concurrent requests land on both engines, each pruned and
    answered as one engine answers it alone."""
    args = ["--plugin", "trio", "--trio-keep-ratio", "0.25", "--trio-depth", str(TEST_DEPTH),
            "--data-parallel-size", "2"]  # fmt: skip
    cases = [
        (image_chat_messages(f"dp: what is in corner {i}?", [make_image(100 + i, size)]), ratio)
        for i, (size, ratio) in enumerate(
            [((112, 112), 0.111), ((224, 112), 0.25), ((112, 224), 0.5), ((112, 112), 1.0)] * 2
        )
    ]
    log = tmp_path / "serve_dp2.log"
    with vllm_server_process(tiny_ckpt, args, log, env=cpu_worker_env(2)) as server:
        client, model = _openai(server.url)
        with ThreadPoolExecutor(len(cases)) as pool:
            answers = list(pool.map(lambda case: _chat(client, model, *case), cases))
        served = requests.get(f"{server.url}/metrics", timeout=10).text
    # Two API server processes (vLLM defaults --api-server-count to the DP
    # size), each of which must have switched TRIO on for itself.
    assert "ApiServer_1" in log.read_text()
    per_engine = _per_engine(served, "vllm:request_success_total")
    assert sorted(per_engine) == ["0", "1"] and all(n > 0 for n in per_engine.values()), per_engine
    assert sum(per_engine.values()) == len(cases)
    for i, ((messages, ratio), resp) in enumerate(zip(cases, answers, strict=True)):
        alone = _alone(trio_llm_nocache, messages, ratio)
        assert resp.usage.prompt_tokens == len(alone.prompt_token_ids), i  # pruned as alone
        assert resp.choices[0].message.content == alone.outputs[0].text, i


def _openai(url: str) -> tuple[OpenAI, str]:
    """A client of the server at ``url`` and the name of the model it serves."""
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    return client, client.models.list().data[0].id


def _chat(client: OpenAI, model: str, messages: list[dict], ratio: float | None):
    """Greedy 8-token completion; ``ratio`` None leaves the server's default."""
    extra = {} if ratio is None else {"vllm_xargs": {"keep_ratio": ratio}}
    return client.chat.completions.create(
        model=model, messages=messages, max_tokens=8, temperature=0, extra_body=extra
    )


def _alone(llm, messages: list[dict], ratio: float):
    """The same chat on the single-worker engine, alone, with the same greedy settings."""
    [out] = llm.chat(
        messages, GREEDY, mm_processor_kwargs={"trio_keep_ratio": ratio}, use_tqdm=False
    )
    return out


def _per_engine(metrics_text: str, name: str) -> dict[str, float]:
    """``engine label -> value`` of one Prometheus counter, summed over its other labels."""
    out: dict[str, float] = {}
    for sample, labels, value in metric_samples(metrics_text):
        if sample == name and "engine" in labels:
            out[labels["engine"]] = out.get(labels["engine"], 0.0) + value
    return out


def _parse(argv: list[str]):
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from vllm_trio import plugin

    plugin.register()  # what vLLM's plugin loader does in every process
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    return EngineArgs, parser.parse_args(argv)


@pytest.mark.parametrize(
    "flags",
    [["--pipeline-parallel-size", "2"], ["-pp", "2", "-tp", "2"]],
    ids=["pp2", "pp2-tp2"],
)
def test_pipeline_parallel_trio_is_refused_with_the_engine_config(
    tiny_ckpt: Path, flags: list[str]
) -> None:
    engine_args, args = _parse(["--model", str(tiny_ckpt), "--plugin", "trio", *flags])
    parsed = engine_args.from_cli_args(args)
    with pytest.raises(ValueError, match="does not support pipeline parallelism"):
        parsed.create_engine_config()


def test_offline_pipeline_parallel_trio_is_refused(tiny_ckpt: Path) -> None:
    """``LLM(..., pipeline_parallel_size=2)`` fails in the caller, before spawning workers."""
    from vllm import LLM

    import vllm_trio

    start = time.monotonic()
    with pytest.raises(ValueError, match="does not support pipeline parallelism"):
        LLM(model=str(tiny_ckpt), pipeline_parallel_size=2, **ENGINE_KWARGS,
            **vllm_trio.engine_kwargs())  # fmt: skip
    assert time.monotonic() - start < 60


def test_tensor_parallel_config(tiny_ckpt: Path) -> None:
    for flags in (["-tp", "2"], ["-tp", "1"]):
        engine_args, args = _parse(["--model", str(tiny_ckpt), "--plugin", "trio", *flags])
        config = engine_args.from_cli_args(args).create_engine_config()
        assert config.parallel_config.tensor_parallel_size == int(flags[1])
    engine_args, args = _parse(["--model", str(tiny_ckpt), "--pipeline-parallel-size", "2"])
    config = engine_args.from_cli_args(args).create_engine_config()
    assert config.parallel_config.pipeline_parallel_size == 2  # stock: untouched


def test_vllm_serve_pp2_with_trio_fails_fast(tiny_ckpt: Path, tmp_path: Path) -> None:
    """The real CLI exits non-zero with the message, and no engine process ever starts."""
    vllm_bin = Path(sys.executable).with_name("vllm")
    cmd = [str(vllm_bin), "serve", str(tiny_ckpt), "--host", "127.0.0.1", "--port", "1",
           "--plugin", "trio", "--pipeline-parallel-size", "2", "--enforce-eager"]  # fmt: skip
    start = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    elapsed = time.monotonic() - start
    log = out.stdout + out.stderr
    (tmp_path / "serve.log").write_text(log)
    assert out.returncode != 0
    assert "does not support pipeline parallelism" in log
    assert "--pipeline-parallel-size 2" in log and "--tensor-parallel-size" in log
    # Refused before the engine core (and its workers) were spawned.
    assert "EngineCore" not in log and "Worker pid" not in log, f"{elapsed:.0f}s"
