"""Server-wide TRIO settings, carried in the model's HF config.

``--plugin trio`` writes these into ``hf_overrides`` so that every process
(API server, engine core, workers) reads the same values from the one config
vLLM already ships to all of them, with no globals or environment variables.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .core.budget import validate_keep_ratio


@dataclass(frozen=True)
class Family:
    """A model family TRIO serves: the stock vLLM architecture it extends, the
    architecture it registers, and where that class lives (imported lazily by
    vLLM's registry, only when the family is served)."""

    name: str
    base_arch: str
    trio_arch: str
    model_class: str
    #: ``model_type`` of the text config whose decoder layers the side pass
    #: reproduces (checked by ``layout.check_text_backbone``).
    text_model_types: frozenset[str] = frozenset({"llama"})


#: Every family ``--plugin trio`` serves, keyed by the checkpoint's stock architecture.
FAMILIES: dict[str, Family] = {
    f.base_arch: f
    for f in (
        Family(
            name="LLaVA-NeXT",
            base_arch="LlavaNextForConditionalGeneration",
            trio_arch="TrioLlavaNextForConditionalGeneration",
            model_class="vllm_trio.binding.model:TrioLlavaNextForConditionalGeneration",
            # Vicuna/Llama-2/Llama-3/Yi ("llama"), Mistral, Qwen2 (q/k/v bias):
            # each covered by tests/test_backbones.py.
            text_model_types=frozenset({"llama", "mistral", "qwen2"}),
        ),
        Family(
            name="Qwen2.5-VL",
            base_arch="Qwen2_5_VLForConditionalGeneration",
            trio_arch="TrioQwen2_5_VLForConditionalGeneration",
            model_class="vllm_trio.binding.qwen2_5_vl:TrioQwen2_5_VLForConditionalGeneration",
            text_model_types=frozenset({"qwen2_5_vl_text", "qwen2_5_vl"}),
        ),
    )
}
TRIO_ARCHS = frozenset(f.trio_arch for f in FAMILIES.values())

#: The LLaVA-NeXT names, kept for the binding and tests that are LLaVA-specific.
BASE_ARCH = "LlavaNextForConditionalGeneration"
TRIO_ARCH = FAMILIES[BASE_ARCH].trio_arch


def trio_family(architecture: str) -> Family:
    """The family of a checkpoint's architecture, or a refusal that names the ones served."""
    for family in FAMILIES.values():
        if architecture in (family.base_arch, family.trio_arch):
            return family
    served = ", ".join(f"{f.name} ({f.base_arch})" for f in FAMILIES.values())
    raise ValueError(
        f"vllm-trio: --plugin trio serves {served}; this checkpoint's architecture is "
        f"{architecture!r}. Serve it without --plugin trio."
    )


#: Defaults chosen from the quality table (README "Quality", benchmarks/results/
#: quality.md, 1,002 questions on the 8-layer scene model). Scored at the layer
#: where that model looks its evidence up (3), TRIO lost nothing measurable at
#: 0.333 and 0.222 (100.8% and 98.8% of unpruned, McNemar p = 0.49, 0.33) and
#: 1.8% at 0.111 (p = 0.18); scored below it (depths 1-2), 6-10% at every
#: ratio. 0.25 keeps that margin for a depth that misses the reading layer and
#: for images denser than the scenes. Depth: it must reach the layer where the
#: model reads the image; for LLaVA-NeXT-7B that layer is not measurable here,
#: and 2 of 32 layers is the side-pass cost ((2 + 0.5) / 32 = 7.8% of prefill)
#: the performance target allows. Models whose reading layer is known pass
#: ``--trio-depth`` (the demo passes 3 for the scene model).
DEFAULT_KEEP_RATIO = 0.25
DEFAULT_DEPTH = 2

#: Where the pruning takes effect (``--trio-mode``). ``input``: the kept
#: embeddings enter layer 0 of a shortened prompt, so they never see the dropped
#: tokens. ``layer``: the prompt is as short, but the residual stream entering
#: layer L is replaced by the side pass's full-context hidden states (the
#: paper's in-LLM pruning at L for the prompt; ``vllm_trio.binding.layer_mode``).
TRIO_MODES = ("input", "layer")
DEFAULT_MODE = "input"


@dataclass(frozen=True)
class TrioConfig:
    """Defaults for requests that do not choose their own keep ratio."""

    keep_ratio: float = DEFAULT_KEEP_RATIO
    depth: int = DEFAULT_DEPTH
    tau: float = 0.8
    num_loss_positions: int = 4
    include_final_position: bool = False
    mode: str = DEFAULT_MODE

    def __post_init__(self) -> None:
        validate_keep_ratio(self.keep_ratio, "trio_keep_ratio")
        if self.mode not in TRIO_MODES:
            raise ValueError(f"trio_mode must be one of {', '.join(TRIO_MODES)}, got {self.mode!r}")
        if isinstance(self.depth, bool) or not isinstance(self.depth, int) or self.depth < 0:
            raise ValueError(f"trio_depth must be an integer >= 0, got {self.depth!r}")
        if not -1.0 <= self.tau <= 1.0:
            raise ValueError(f"trio_tau must be in [-1, 1], got {self.tau!r}")
        if self.num_loss_positions < 1:
            raise ValueError("trio_num_loss_positions must be >= 1")

    @classmethod
    def from_hf_config(cls, hf_config: object) -> TrioConfig:
        """Read ``trio_*`` attributes written by :func:`hf_overrides`."""
        return cls(
            keep_ratio=getattr(hf_config, "trio_keep_ratio", DEFAULT_KEEP_RATIO),
            depth=getattr(hf_config, "trio_depth", DEFAULT_DEPTH),
            tau=getattr(hf_config, "trio_tau", 0.8),
            num_loss_positions=getattr(hf_config, "trio_num_loss_positions", 4),
            include_final_position=getattr(hf_config, "trio_include_final_position", False),
            mode=getattr(hf_config, "trio_mode", DEFAULT_MODE),
        )

    def config_attributes(self) -> dict[str, object]:
        """The ``trio_*`` attributes every process reads back from the HF config."""
        return {
            "trio_keep_ratio": self.keep_ratio,
            "trio_depth": self.depth,
            "trio_tau": self.tau,
            "trio_num_loss_positions": self.num_loss_positions,
            "trio_include_final_position": self.include_final_position,
            "trio_mode": self.mode,
        }

    def hf_overrides(self, base: Any = None) -> TrioHfOverrides:
        """The ``hf_overrides`` that switch TRIO on, on top of the user's ``base``."""
        if base is not None and not (isinstance(base, dict) or callable(base)):
            raise TypeError(f"unsupported hf_overrides type {type(base).__name__}")
        return TrioHfOverrides(trio=self, base=base)


@dataclass(frozen=True)
class TrioHfOverrides:
    """vLLM ``hf_overrides`` (the callable form) that switch a checkpoint to TRIO.

    Why a callable and not a dict: the TRIO architecture depends on the
    checkpoint's own (LLaVA-NeXT today, one entry per family in
    :data:`FAMILIES`), and a checkpoint of another architecture must be refused
    with a message naming the ones served, before any engine process starts:
    vLLM calls this while it builds the model config in the ``vllm serve`` (or
    ``LLM``) process. It is a module-level dataclass so that it pickles into
    API-server, engine and worker processes.

    ``base`` is what the user passed as ``--hf-overrides`` (a dict, applied
    first with vLLM's flat/nested semantics, or a callable).
    """

    trio: TrioConfig
    base: Any = field(default=None)

    def __call__(self, config: Any) -> Any:
        config = self._apply_base(config)
        architectures = list(getattr(config, "architectures", None) or [])
        if str(getattr(config, "model_type", "")).startswith("dummy_"):
            # vLLM probes a callable with a dummy config to see whether it
            # changes ``model_type``; TRIO never does.
            return config
        family = trio_family(architectures[0] if architectures else "")
        config.architectures = [family.trio_arch]
        for key, value in self.trio.config_attributes().items():
            setattr(config, key, value)
        return config

    def _apply_base(self, config: Any) -> Any:
        if self.base is None:
            return config
        if callable(self.base):
            return self.base(config)
        for key, value in self.base.items():
            sub = getattr(config, key, None)
            if isinstance(value, dict) and hasattr(sub, "update"):
                sub.update(value)  # a nested config, as vLLM's dict overrides do
            else:
                setattr(config, key, value)
        return config
