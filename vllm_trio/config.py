"""Server-wide TRIO settings, carried in the model's HF config.

``--plugin trio`` writes these into ``hf_overrides`` so that every process
(API server, engine core, workers) reads the same values from the one config
vLLM already ships to all of them, with no globals or environment variables.
"""

from __future__ import annotations

from dataclasses import dataclass

from .core.budget import validate_keep_ratio

#: Architecture name the plugin registers; ``--plugin trio`` selects it.
TRIO_ARCH = "TrioLlavaNextForConditionalGeneration"
#: The stock architecture TRIO extends.
BASE_ARCH = "LlavaNextForConditionalGeneration"

#: Defaults chosen from the quality table (README "Quality", benchmarks/results/
#: quality.md): at 0.222-0.333 TRIO kept 95-104% of unpruned accuracy, at 0.111
#: 87%; 0.25 sits in the no-measurable-loss range. Scoring at depth 0 lost 15
#: points at 0.111 where depths 1 and 2 tied; 2 of 32 layers is the side-pass
#: cost ((2 + 0.5) / 32 = 7.8% of prefill) the performance target allows.
DEFAULT_KEEP_RATIO = 0.25
DEFAULT_DEPTH = 2


def check_pipeline_parallel(pipeline_parallel_size: int) -> None:
    """Refuse pipeline parallelism: the side pass needs decoder layers 0..L, the
    final norm and the LM head on one rank, and pipeline stages split them.
    (Tensor parallelism is supported: each rank scores with its shards.)"""
    if pipeline_parallel_size > 1:
        raise ValueError(
            "vllm-trio: the TRIO side pass does not support pipeline parallelism "
            f"(got --pipeline-parallel-size {pipeline_parallel_size}): it needs decoder "
            "layers 0..L, the final norm and the LM head in one stage. Use "
            "--tensor-parallel-size to split the model, and replicas behind a load "
            "balancer to scale out (docker/README.md)"
        )


@dataclass(frozen=True)
class TrioConfig:
    """Defaults for requests that do not choose their own keep ratio."""

    keep_ratio: float = DEFAULT_KEEP_RATIO
    depth: int = DEFAULT_DEPTH
    tau: float = 0.8
    num_loss_positions: int = 4
    include_final_position: bool = False

    def __post_init__(self) -> None:
        validate_keep_ratio(self.keep_ratio, "trio_keep_ratio")
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
        )

    def hf_overrides(self) -> dict[str, object]:
        """What to merge into ``EngineArgs.hf_overrides`` to switch TRIO on."""
        return {
            "architectures": [TRIO_ARCH],
            "trio_keep_ratio": self.keep_ratio,
            "trio_depth": self.depth,
            "trio_tau": self.tau,
            "trio_num_loss_positions": self.num_loss_positions,
            "trio_include_final_position": self.include_final_position,
        }
