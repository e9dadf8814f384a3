"""The CPU image built and served for real by a Docker engine on this machine.

What a user does with ``docker/Dockerfile.cpu``, with a local base instead of
vLLM's registry image (no registry can be reached here):

* ``scripts/docker_engine.sh start`` installs Debian's ``docker.io`` and starts
  ``dockerd`` if no engine answers (stopped again at the end if it started it);
* ``scripts/docker_cpu_base.sh`` builds (or reuses, by a hash of the install
  route) Debian 12 + vLLM 0.32.0 installed by ``scripts/setup.sh``'s CPU route;
* ``docker build -f docker/Dockerfile.cpu --build-arg BASE_IMAGE=...`` without
  network, the image being one layer on top of the base;
* ``docker run --network host`` of the shipped scene model with ``--plugin
  trio``: it runs as the non-root user, turns healthy by the image's own
  HEALTHCHECK, prunes a request at ``keep_ratio`` 0.111 to the expected
  ``prompt_tokens`` and answers the eval questions ``scripts/demo.py`` shows
  correctly, and ``docker stop`` ends it with exit code 0 inside the grace period.

``TRIO_SKIP_DOCKER=1`` skips the module where no Docker engine can be had
(not root, no apt); CI must not set it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from openai import OpenAI

from benchmarks.quality.shipped import MODEL_DIR, demo_samples, scene_generator, training_record
from trio_dev.local_server import TEST_SERVER_ARGS, free_port, image_chat_messages
from vllm_trio.core.budget import num_kept_tokens

pytestmark = [
    pytest.mark.engine,
    # The first test's setup builds the base when it is absent (20 min measured
    # on a loaded 2-core machine) and the image.
    pytest.mark.timeout(3600),
    pytest.mark.skipif(os.environ.get("TRIO_SKIP_DOCKER") == "1", reason="TRIO_SKIP_DOCKER=1"),
]

ROOT = Path(__file__).resolve().parents[1]
KEEP_RATIO = 0.111
#: ``docker stop``'s default grace period before SIGKILL.
GRACE_S = 10
USER_UID = "10001"


def docker_cli() -> str:
    """docker.io's client (a newer client without buildx cannot use BuildKit), else PATH's."""
    return os.environ.get("DOCKER") or (
        "/usr/bin/docker" if Path("/usr/bin/docker").exists() else "docker"
    )


def run(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    """``cmd`` in its own process group: on a timeout (or the test's) the whole
    group gets SIGTERM, so the scripts' cleanup traps run and no debootstrap,
    pip or docker client is left behind."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kw
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except BaseException:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, f"{cmd}: {stdout[-3000:]}{stderr[-3000:]}"
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


@dataclass
class Served:
    docker: str
    name: str
    url: str


@pytest.fixture(scope="module")
def docker() -> Iterator[str]:
    script = str(ROOT / "scripts" / "docker_engine.sh")
    env = {**os.environ, "DOCKER": docker_cli()}
    started = run([script, "start"], timeout=900, env=env).stdout.split()[-1] == "started"
    yield docker_cli()
    if started:
        run([script, "stop"], timeout=120, env={**os.environ, "DOCKER": docker_cli()})


@pytest.fixture(scope="module")
def image(docker: str) -> Iterator[tuple[str, str]]:
    """(base tag, image tag): the base reused or built, the image built now."""
    env = {**os.environ, "DOCKER": docker}
    base = run([str(ROOT / "scripts" / "docker_cpu_base.sh")], timeout=3600, env=env)
    base_tag = base.stdout.split()[-1]
    tag = f"vllm-trio-ci:{os.getpid()}"
    run(
        [docker, "build", "--network", "none", "-f", "docker/Dockerfile.cpu",
         "--build-arg", f"BASE_IMAGE={base_tag}", "-t", tag, "."],
        timeout=1200, cwd=ROOT, env={**env, "DOCKER_BUILDKIT": "1"},
    )  # fmt: skip
    yield base_tag, tag
    subprocess.run([docker, "rmi", "-f", tag], capture_output=True, timeout=300)
    subprocess.run([docker, "builder", "prune", "-f"], capture_output=True, timeout=300)


def inspect(docker: str, obj: str, fmt: str) -> str:
    return run([docker, "inspect", "-f", fmt, obj], timeout=60).stdout.strip()


@pytest.fixture(scope="module")
def served(docker: str, image: tuple[str, str], tmp_path_factory) -> Iterator[Served]:
    """The image serving the scene model, once its own HEALTHCHECK says healthy."""
    port = free_port()
    name = f"vllm-trio-ci-{os.getpid()}"
    run(
        [docker, "run", "-d", "--name", name, "--network", "host", "--shm-size", "1g",
         "-v", f"{MODEL_DIR}:/models/scenes:ro", "-e", "MODEL=/models/scenes",
         "-e", "HOST=127.0.0.1", "-e", f"PORT={port}", "-e", "HF_HUB_OFFLINE=1",
         image[1], *TEST_SERVER_ARGS],
        timeout=600,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while (health := inspect(docker, name, "{{.State.Health.Status}}")) != "healthy":
            running = inspect(docker, name, "{{.State.Running}}") == "true"
            if health == "unhealthy" or not running or time.monotonic() > deadline:
                logs = subprocess.run([docker, "logs", "--tail", "60", name], capture_output=True)
                log = (logs.stdout + logs.stderr).decode(errors="replace")
                pytest.fail(f"container {health}, running={running}:\n{log}")
            time.sleep(2)
        yield Served(docker, name, f"http://127.0.0.1:{port}")
    finally:
        log = tmp_path_factory.mktemp("docker") / "container.log"
        logs = subprocess.run([docker, "logs", name], capture_output=True)
        log.write_bytes(logs.stdout + logs.stderr)
        subprocess.run([docker, "rm", "-f", "-v", name], capture_output=True, timeout=120)


def test_image_is_one_layer_on_the_base(docker: str, image: tuple[str, str]) -> None:
    """vfs copies the whole file system per layer: the Dockerfile adds exactly one."""
    base, tag = image
    base_layers = json.loads(inspect(docker, base, "{{json .RootFS.Layers}}"))
    layers = json.loads(inspect(docker, tag, "{{json .RootFS.Layers}}"))
    assert layers[: len(base_layers)] == base_layers
    assert len(layers) == len(base_layers) + 1
    assert inspect(docker, tag, "{{.Config.User}}") == USER_UID


def test_serves_as_the_non_root_user(served: Served) -> None:
    status = run([served.docker, "exec", served.name, "cat", "/proc/1/status"], timeout=60)
    uids = next(line for line in status.stdout.splitlines() if line.startswith("Uid:")).split()
    assert uids[1:] == [USER_UID] * 4  # real, effective, saved, filesystem
    cmdline = run([served.docker, "exec", served.name, "cat", "/proc/1/cmdline"], timeout=60)
    argv = cmdline.stdout.split("\0")
    # PID 1 is vLLM itself (the entry point exec'd it), serving with the plugin.
    assert "serve" in argv and argv[argv.index("--plugin") + 1] == "trio", argv


def test_healthy_by_its_own_healthcheck(served: Served) -> None:
    health = json.loads(inspect(served.docker, served.name, "{{json .State.Health}}"))
    assert health["Status"] == "healthy"
    assert health["Log"] and health["Log"][-1]["ExitCode"] == 0


def test_chat_at_keep_ratio_0111_is_pruned_and_answered(served: Served) -> None:
    from transformers import AutoProcessor

    normalize_answer = scene_generator(training_record(MODEL_DIR)).normalize_answer
    processor = AutoProcessor.from_pretrained(MODEL_DIR)
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    client = OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0, timeout=300)
    model = client.models.list().data[0].id
    for sample in demo_samples(MODEL_DIR):
        ids = processor(text=processor.image_token, images=sample.image)["input_ids"][0]
        num_visual = sum(1 for i in ids if i == image_token)
        usage = {}
        for r in (1.0, KEEP_RATIO):
            out = client.chat.completions.create(
                model=model,
                messages=image_chat_messages(sample.question, [sample.image]),
                max_tokens=8,
                temperature=0,
                extra_body={"vllm_xargs": {"keep_ratio": r}},
            )
            usage[r] = out.usage.prompt_tokens
            answer = normalize_answer(out.choices[0].message.content)
            assert answer == normalize_answer(sample.answer), (sample.question, r, answer)
        text_tokens = usage[1.0] - num_visual
        assert usage[KEEP_RATIO] == text_tokens + num_kept_tokens(num_visual, KEEP_RATIO)


def test_docker_stop_exits_0_within_the_grace_period(served: Served) -> None:
    start = time.monotonic()
    run([served.docker, "stop", "-t", str(GRACE_S), served.name], timeout=GRACE_S + 60)
    elapsed = time.monotonic() - start
    assert inspect(served.docker, served.name, "{{.State.ExitCode}}") == "0"
    assert elapsed < GRACE_S, elapsed
