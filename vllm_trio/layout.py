"""Which serving layouts TRIO can serve: refused where the engine config is built.

vLLM runs :func:`check_layout` through its per-architecture config hook in
the process that calls ``vllm serve`` or ``LLM(...)``, before any engine or
worker process exists, so an unservable layout fails there with TRIO's reason
instead of inside every worker (or, worse, serving a wrong selection).
"""

from __future__ import annotations

from typing import Any

#: Text backbones whose decoder layers the side pass reproduces exactly
#: (dense Llama-style layers: RMSNorm, fused qkv with optional bias, SiLU MLP,
#: rotary from vLLM's ``cos_sin_cache``), each covered by a test.
SUPPORTED_TEXT_MODEL_TYPES = frozenset({"llama"})


def check_layout(vllm_config: Any) -> None:
    """Raise ``ValueError`` with the reason if TRIO cannot serve this configuration."""
    from .versions import unsupported_reason

    reason = unsupported_reason()
    if reason is not None:
        raise ValueError(reason)
    model_config = vllm_config.model_config
    check_pipeline_parallel(vllm_config.parallel_config.pipeline_parallel_size)
    check_text_backbone(model_config.hf_config)
    check_quantization(getattr(model_config, "quantization", None))
    check_layer_mode(vllm_config)
    if getattr(vllm_config, "lora_config", None) is not None:
        raise ValueError(
            "vllm-trio: --enable-lora is not supported with --plugin trio: the side pass "
            "scores visual tokens with the base weights, so an adapter's requests would be "
            "pruned by a selection the adapter never saw. Serve LoRA adapters without "
            "--plugin trio, or merge the adapter into the checkpoint"
        )


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


def check_text_backbone(hf_config: Any) -> None:
    text = getattr(hf_config, "text_config", hf_config)
    model_type = getattr(text, "model_type", None)
    if model_type not in SUPPORTED_TEXT_MODEL_TYPES:
        raise ValueError(
            f"vllm-trio: the text backbone {model_type!r} is not supported by the TRIO side "
            f"pass (supported: {', '.join(sorted(SUPPORTED_TEXT_MODEL_TYPES))}). Serve this "
            "checkpoint without --plugin trio"
        )
    window = getattr(text, "sliding_window", None)
    if window is not None and window < getattr(text, "max_position_embeddings", 0):
        raise ValueError(
            f"vllm-trio: sliding-window attention (sliding_window={window}) is not supported "
            "by the TRIO side pass, which attends over the whole prompt"
        )


def check_quantization(method: str | None) -> None:
    if method is None:
        return
    raise ValueError(
        f"vllm-trio: quantized checkpoints ({method}) are not supported yet: the side pass "
        "differentiates decoder layers 0..L in plain PyTorch and needs their dense weights, "
        "which a quantized checkpoint does not hold. Serve the unquantized checkpoint with "
        "--plugin trio (docs: README 'Layouts')"
    )


def check_layer_mode(vllm_config: Any) -> None:
    """Refuse micro-batching (``--enable-dbo``, ``--ubatch-size``) in layer mode: it
    runs the forward on slices of a step's tokens, so row ``i`` of layer L's input
    would no longer be row ``i`` of the rows staged for that step."""
    from .config import TrioConfig

    mode = TrioConfig.from_hf_config(vllm_config.model_config.hf_config).mode
    if mode == "layer" and getattr(vllm_config.parallel_config, "use_ubatching", False):
        raise ValueError(
            "vllm-trio: --trio-mode layer does not support micro-batching (--enable-dbo, "
            "--ubatch-size): the handed-over rows are staged per step, not per micro-batch. "
            "Use --trio-mode input, or serve without micro-batching"
        )
