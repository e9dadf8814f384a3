"""Turn on vLLM's pruned-media M-RoPE path for TRIO's Qwen2.5-VL, in every model runner.

vLLM recomputes a request's M-RoPE positions from the position columns that
a pruning model appends to its media rows (``recompute_mrope_positions``),
but only when the runner's own switch is on, and each runner sets it from
``--video-pruning-rate`` alone:

* the GPU V1 runner (``GPUModelRunner.load_model``) sets
  ``is_multimodal_pruning_enabled`` from the video pruning rate;
* the CPU runner (``CPUModelRunner.load_model``) never sets it (it
  overrides ``load_model`` without that line);
* Model Runner V2 creates its ``MultiModalPruner`` in
  ``maybe_create_mm_pruner`` (bound into ``model_states.default``) only
  with a video pruning rate.

TRIO prunes images whatever the video setting, so each wrapper switches the
path on when the loaded model is TRIO's and asks for it (its
``is_multimodal_pruning_enabled``). Inert for every other model, LLaVA-NeXT
with TRIO included. Each runner module is patched when it is imported (or
at once if it already is; ``patches._on_import``), so registering the plugin
imports no runner or model code.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from types import ModuleType

from . import Patch, is_trio_model

_V1 = "vllm.v1.worker.gpu_model_runner"
_CPU = "vllm.v1.worker.cpu_model_runner"
_V2 = "vllm.v1.worker.gpu.model_states.default"


def wants_pruning_path(model_config: object, model: object) -> bool:
    """Whether a loaded model is TRIO's and prunes media with M-RoPE columns."""
    return is_trio_model(model_config) and bool(
        getattr(model, "is_multimodal_pruning_enabled", False)
    )


def _wrap_load_model(cls: type) -> None:
    original = cls.__dict__["load_model"]
    if getattr(original, "_trio_wrapped", False):
        return

    @functools.wraps(original)
    def load_model(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if getattr(self, "uses_mrope", False) and wants_pruning_path(
            self.model_config, self.get_model()
        ):
            self.is_multimodal_pruning_enabled = True
        return result

    load_model._trio_wrapped = True  # type: ignore[attr-defined]
    cls.load_model = load_model


def _patch_v1(module: ModuleType) -> None:
    _wrap_load_model(module.GPUModelRunner)


def _patch_cpu(module: ModuleType) -> None:
    _wrap_load_model(module.CPUModelRunner)


def _patch_v2(module: ModuleType) -> None:
    original = module.maybe_create_mm_pruner
    if getattr(original, "_trio_wrapped", False):
        return

    @functools.wraps(original)
    def maybe_create_mm_pruner(model_config, model, rope_state, encoder_cache):
        pruner = original(model_config, model, rope_state, encoder_cache)
        if (
            pruner is None
            and rope_state is not None
            and encoder_cache is not None
            and wants_pruning_path(model_config, model)
        ):
            from vllm.v1.worker.gpu.model_states.mm_pruning import MultiModalPruner

            pruner = MultiModalPruner(
                model, rope_state, encoder_cache, model_config.get_inputs_embeds_size()
            )
        return pruner

    maybe_create_mm_pruner._trio_wrapped = True  # type: ignore[attr-defined]
    module.maybe_create_mm_pruner = maybe_create_mm_pruner


def _when_imported(name: str, patcher: Callable[[ModuleType], None]) -> Callable[[], None]:
    def install() -> None:
        patcher(sys.modules[name])

    return install


_WHY = (
    "the runners call the model's recompute_mrope_positions only with "
    "--video-pruning-rate (the CPU runner never); TRIO's Qwen2.5-VL prunes images "
    "and needs it for exact M-RoPE positions"
)
_REMOVE_WHEN = (
    "vLLM's runners take the pruning switch from the model "
    "(supports_multimodal_pruning + the model's is_multimodal_pruning_enabled)"
)

PATCHES = tuple(
    Patch(
        name=f"mm_pruning_{label}",
        module=module,
        targets=(f"{module}.{target}",),
        why=_WHY,
        remove_when=_REMOVE_WHEN,
        install=_when_imported(module, patcher),
    )
    for label, module, target, patcher in (
        ("gpu_v1", _V1, "GPUModelRunner.load_model", _patch_v1),
        ("cpu", _CPU, "CPUModelRunner.load_model", _patch_cpu),
        ("mrv2", _V2, "maybe_create_mm_pruner", _patch_v2),
    )
)
