"""Registration, switches and the patch inventory: fast, no engine."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

import vllm_trio
from vllm_trio.config import BASE_ARCH, TRIO_ARCH, TrioConfig, TrioHfOverrides
from vllm_trio.requests.cli import trio_config_from_args
from vllm_trio.requests.keep_ratio import keep_ratio_from_request

#: Where vLLM keeps `make_arg_parser`: moved between 0.32 and 0.33.
_CLI_ARGS_MODULES = ("vllm.entrypoints.launchers.cli_args", "vllm.entrypoints.common.cli_args")


def serve_parser():
    """``vllm serve``'s argument parser, with the plugin registered."""
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from vllm_trio.plugin import register

    register()
    for name in _CLI_ARGS_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        return module.make_arg_parser(FlexibleArgumentParser())
    raise ImportError(f"none of {_CLI_ARGS_MODULES}")


def run_python(code: str) -> str:
    """Run ``code`` in a fresh interpreter; its last stdout line."""
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent,  # so that a probe can import this module's helpers
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def test_entry_point_is_a_general_plugin() -> None:
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    trio = [ep for ep in eps if ep.name == "trio"]
    assert len(trio) == 1
    assert trio[0].value == "vllm_trio.plugin:register"


def test_register_is_idempotent() -> None:
    from vllm import ModelRegistry

    from vllm_trio.plugin import register

    register()
    register()
    assert TRIO_ARCH in ModelRegistry.get_supported_archs()
    assert BASE_ARCH in ModelRegistry.get_supported_archs()


def test_register_imports_no_vllm_model_code() -> None:
    """vLLM loads general plugins in every process for every model: registering
    must not pull LLaVA-NeXT, LLaVA or CLIP model code (or TRIO's binding) into a
    process that serves, say, a Llama."""
    probe = """
        import sys
        import vllm.model_executor.models  # what vLLM itself has loaded by then
        before = set(sys.modules)
        from vllm_trio.plugin import register
        register()
        added = sorted(
            m for m in set(sys.modules) - before
            if m.startswith("vllm.model_executor.models.") or m.startswith("vllm_trio.binding")
        )
        print(added)
    """
    # The per-architecture config hook table is config code that vLLM itself
    # imports whenever it builds an engine config; no model is among them.
    assert run_python(probe) == "['vllm.model_executor.models.config']"


def test_unsupported_vllm_leaves_stock_untouched_and_refuses_trio(tiny_ckpt) -> None:
    """On a vLLM outside the declared range: one error logged, no wrapper but the
    command line's, stock arguments parse as before, and `--plugin trio` fails
    with the reason (also offline, where the engine config is built)."""
    probe = f"""
        import logging
        from packaging.version import Version
        import vllm_trio.versions as versions
        versions.installed_vllm = lambda: Version("0.31.0")
        records = []
        class Keep(logging.Handler):
            def emit(self, record):
                records.append(record)
        logging.getLogger("vllm").addHandler(Keep())
        from vllm.renderers.online_renderer import OnlineRenderer
        from vllm.v1.engine.async_llm import AsyncLLM
        chat, shutdown = OnlineRenderer.preprocess_chat, AsyncLLM.shutdown
        from vllm_trio.plugin import register
        register(); register()
        assert OnlineRenderer.preprocess_chat is chat and AsyncLLM.shutdown is shutdown
        errors = [r.getMessage() for r in records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and "supports vLLM" in errors[0], errors
        from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs
        from test_plugin import serve_parser
        parser = serve_parser()
        model = ["--model", {str(tiny_ckpt)!r}]
        stock = AsyncEngineArgs.from_cli_args(parser.parse_args(model))
        assert not stock.hf_overrides
        try:
            AsyncEngineArgs.from_cli_args(parser.parse_args([*model, "--plugin", "trio"]))
        except RuntimeError as exc:
            assert "supports vLLM" in str(exc)
        else:
            raise AssertionError("--plugin trio was accepted")
        import vllm_trio
        args = EngineArgs(model={str(tiny_ckpt)!r}, **vllm_trio.engine_kwargs())
        try:
            args.create_engine_config()
        except Exception as exc:
            assert "supports vLLM" in str(exc), exc
        else:
            raise AssertionError("offline TRIO accepted")
        print("ok")
    """
    assert run_python(probe) == "ok"


def test_serve_parser_has_trio_group() -> None:
    parser = serve_parser()
    args = parser.parse_args(
        ["--plugin", "trio", "--trio-keep-ratio", "0.111", "--trio-depth", "3"]
    )
    assert args.plugin == ["trio"]
    assert trio_config_from_args(args) == TrioConfig(keep_ratio=0.111, depth=3)
    assert "--plugin" in parser.format_help()
    with pytest.raises(SystemExit):
        parser.parse_args(["--plugin", "nope"])


def test_trio_group_survives_another_plugins_plugin_flag() -> None:
    """Another plugin that already defines `--plugin` must not hide TRIO's group."""
    from vllm_trio.requests.cli import add_cli_args

    parser = argparse.ArgumentParser()
    parser.add_argument("--plugin", action="append", choices=["other"])
    add_cli_args(parser)
    add_cli_args(parser)  # idempotent
    args = parser.parse_args(["--plugin", "other", "--plugin", "trio", "--trio-depth", "1"])
    assert args.plugin == ["other", "trio"]
    assert trio_config_from_args(args) == TrioConfig(depth=1)
    bare = argparse.ArgumentParser()
    bare.add_argument("--plugin")  # a plain string option
    add_cli_args(bare)
    assert trio_config_from_args(bare.parse_args(["--plugin", "trio"])) == TrioConfig()


def test_engine_args_from_cli_switch_architecture_only_with_plugin(tiny_ckpt) -> None:
    from vllm.engine.arg_utils import AsyncEngineArgs

    parser = serve_parser()
    m = str(tiny_ckpt)
    stock = AsyncEngineArgs.from_cli_args(parser.parse_args(["--model", m]))
    assert not stock.hf_overrides
    on = AsyncEngineArgs.from_cli_args(
        parser.parse_args(["--model", m, "--plugin", "trio", "--hf-overrides", '{"x": 1}'])
    )
    assert isinstance(on.hf_overrides, TrioHfOverrides)
    cfg = on.hf_overrides(SimpleNamespace(architectures=[BASE_ARCH], model_type="llava_next"))
    assert cfg.architectures == [TRIO_ARCH] and cfg.x == 1
    assert cfg.trio_keep_ratio == vllm_trio.config.DEFAULT_KEEP_RATIO
    with pytest.raises(ValueError, match="need --plugin trio"):
        AsyncEngineArgs.from_cli_args(parser.parse_args(["--model", m, "--trio-depth", "1"]))


def test_hf_overrides_chain_callables_and_nested_dicts() -> None:
    trio = TrioConfig(keep_ratio=0.5, depth=1)
    chained = trio.hf_overrides(lambda c: (setattr(c, "seen", True), c)[1])
    cfg = chained(SimpleNamespace(architectures=[BASE_ARCH], model_type="llava_next"))
    assert cfg.seen and cfg.architectures == [TRIO_ARCH]
    assert cfg.trio_keep_ratio == 0.5 and cfg.trio_depth == 1
    text = {"rope_theta": 1.0}
    nested = trio.hf_overrides({"text_config": {"rope_theta": 5.0}})
    cfg = nested(SimpleNamespace(architectures=[BASE_ARCH], model_type="x", text_config=text))
    assert text == {"rope_theta": 5.0}
    # vLLM probes callables with a dummy config: TRIO leaves it alone.
    dummy = SimpleNamespace(architectures=[""], model_type="dummy_llava_next")
    assert trio.hf_overrides()(dummy).architectures == [""]


def test_other_architectures_are_refused_naming_the_served_ones() -> None:
    with pytest.raises(ValueError, match=r"serves LLaVA-NeXT .*Qwen2\.5-VL .*Qwen3VL"):
        TrioConfig().hf_overrides()(
            SimpleNamespace(architectures=["Qwen3VLForConditionalGeneration"], model_type="q")
        )


def test_qwen2_5_vl_maps_to_its_trio_architecture() -> None:
    config = TrioConfig().hf_overrides()(
        SimpleNamespace(architectures=["Qwen2_5_VLForConditionalGeneration"], model_type="q")
    )
    assert config.architectures == ["TrioQwen2_5_VLForConditionalGeneration"]


def test_overrides_pickle() -> None:
    """They travel to API server, engine and worker processes."""
    import pickle

    overrides = TrioConfig(keep_ratio=0.3).hf_overrides({"x": 1})
    assert pickle.loads(pickle.dumps(overrides)) == overrides


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
        keep_ratio_from_request(req)
    assert err.value.parameter == "vllm_xargs.keep_ratio"
    assert keep_ratio_from_request(argparse.Namespace(vllm_xargs=None)) is None
    assert keep_ratio_from_request(argparse.Namespace(vllm_xargs={"keep_ratio": 0.5})) == 0.5


def test_kwargs_trust_check_is_unchanged_outside_trio_requests() -> None:
    """The wrapped trust check skips TRIO's key only inside a TRIO model's request."""
    from vllm.exceptions import VLLMValidationError
    from vllm.renderers import online_renderer

    from vllm_trio.plugin import register

    register()
    with pytest.raises(VLLMValidationError, match="trust-request-mm-kwargs"):
        online_renderer.validate_request_mm_kwargs(
            mm_processor_kwargs={"trio_keep_ratio": 0.5},
            media_io_kwargs=None,
            trust_request_mm_kwargs=False,
        )


def test_patch_inventory_is_documented_and_applied_on_import() -> None:
    from vllm_trio import patches
    from vllm_trio.plugin import register

    register()
    inventory = patches.inventory()
    assert len({p.name for p in inventory}) == len(inventory) >= 5
    for patch in inventory:
        assert patch.targets and patch.why and patch.remove_when
        assert all(t.startswith(patch.module) for t in patch.targets[:1])
        importlib.import_module(patch.module)
        assert patch.name in patches._applied


def test_patches_wait_for_their_modules() -> None:
    """register() imports none of the modules it patches; importing one later
    installs its patch (an engine worker never imports the serving layer)."""
    probe = """
        import sys
        import vllm, vllm.engine.arg_utils  # what every vLLM process has imported
        from vllm_trio import patches
        from vllm_trio.plugin import register
        register()
        lazy = [p for p in patches.inventory() if p.name != "engine_args"]
        assert not any(p.module in sys.modules for p in lazy), [p.module for p in lazy]
        assert patches._applied == {"engine_args"}, patches._applied
        from vllm.renderers.online_renderer import OnlineRenderer
        assert "online_renderer" in patches._applied
        assert hasattr(OnlineRenderer.preprocess_chat, "__wrapped__")
        print("ok")
    """
    assert run_python(probe) == "ok"
