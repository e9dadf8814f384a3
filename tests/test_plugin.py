"""Registration and switches: fast, no engine."""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys

import pytest

import vllm_trio
from vllm_trio import patching
from vllm_trio.config import BASE_ARCH, TRIO_ARCH, TrioConfig


def test_entry_point_is_a_general_plugin() -> None:
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    trio = [ep for ep in eps if ep.name == "trio"]
    assert len(trio) == 1
    assert trio[0].value == "vllm_trio.plugin:register"


def test_register_is_idempotent_and_lazy() -> None:
    from vllm import ModelRegistry

    from vllm_trio.plugin import register

    register()
    register()
    assert TRIO_ARCH in ModelRegistry.get_supported_archs()
    assert BASE_ARCH in ModelRegistry.get_supported_archs()
    # Registration names the class by string: the model module (and the vLLM
    # model code it imports) loads only when a TRIO model is served.
    probe = (
        "import sys; from vllm_trio.plugin import register; register(); "
        "print('vllm_trio.binding.model' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_serve_parser_has_trio_group() -> None:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from vllm_trio.plugin import register

    register()
    parser = make_arg_parser(FlexibleArgumentParser())
    args = parser.parse_args(
        ["--plugin", "trio", "--trio-keep-ratio", "0.111", "--trio-depth", "3"]
    )
    assert args.plugin == ["trio"]
    cfg = patching.trio_config_from_args(args)
    assert cfg == TrioConfig(keep_ratio=0.111, depth=3)
    assert "--plugin" in parser.format_help()
    with pytest.raises(SystemExit):
        parser.parse_args(["--plugin", "nope"])


def test_engine_args_from_cli_switch_architecture_only_with_plugin(tiny_ckpt) -> None:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from vllm_trio.plugin import register

    register()
    parser = make_arg_parser(FlexibleArgumentParser())
    m = str(tiny_ckpt)
    stock = AsyncEngineArgs.from_cli_args(parser.parse_args(["--model", m]))
    assert not stock.hf_overrides
    on = AsyncEngineArgs.from_cli_args(
        parser.parse_args(["--model", m, "--plugin", "trio", "--hf-overrides", '{"x": 1}'])
    )
    assert on.hf_overrides["architectures"] == [TRIO_ARCH]
    assert on.hf_overrides["x"] == 1
    assert on.hf_overrides["trio_keep_ratio"] == vllm_trio.config.DEFAULT_KEEP_RATIO
    with pytest.raises(ValueError, match="need --plugin trio"):
        AsyncEngineArgs.from_cli_args(parser.parse_args(["--model", m, "--trio-depth", "1"]))


def test_callable_hf_overrides_are_chained() -> None:
    merged = patching.merge_hf_overrides(lambda c: c, TrioConfig(keep_ratio=0.5, depth=1))
    cfg = merged(argparse.Namespace())
    assert cfg.architectures == [TRIO_ARCH] and cfg.trio_keep_ratio == 0.5 and cfg.trio_depth == 1


@pytest.mark.parametrize("bad", [0, -1, 1.01, float("nan"), "0.5", None, True])
def test_engine_kwargs_validate(bad: object) -> None:
    with pytest.raises(ValueError, match="trio_keep_ratio"):
        vllm_trio.engine_kwargs(keep_ratio=bad)  # type: ignore[arg-type]


def test_depth_validated() -> None:
    with pytest.raises(ValueError, match="trio_depth"):
        TrioConfig(depth=-1)


def test_keep_ratio_from_request_names_the_field() -> None:
    from vllm.exceptions import VLLMValidationError

    req = argparse.Namespace(vllm_xargs={"keep_ratio": 2})
    with pytest.raises(VLLMValidationError) as err:
        patching.keep_ratio_from_request(req)
    assert err.value.parameter == "vllm_xargs.keep_ratio"
    assert patching.keep_ratio_from_request(argparse.Namespace(vllm_xargs=None)) is None
    assert (
        patching.keep_ratio_from_request(argparse.Namespace(vllm_xargs={"keep_ratio": 0.5})) == 0.5
    )


def test_patch_refuses_other_vllm_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    import vllm

    monkeypatch.setattr(patching, "_applied", False)
    monkeypatch.setattr(vllm, "__version__", "0.31.0")
    with pytest.raises(RuntimeError, match=r"supports vLLM 0\.32\.0"):
        patching.apply()
