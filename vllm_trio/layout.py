"""Which serving layouts TRIO can serve: refused where the engine config is built.

vLLM runs :func:`check_layout` through its per-architecture config hook in
the process that calls ``vllm serve`` or ``LLM(...)``, before any engine or
worker process exists, so an unservable layout fails there with TRIO's reason
instead of inside every worker (or, worse, serving a wrong selection).
"""

from __future__ import annotations

from typing import Any


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
    check_video_pruning(getattr(model_config, "multimodal_config", None))
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
    supported = _family_text_model_types(hf_config)
    if model_type not in supported:
        raise ValueError(
            f"vllm-trio: the text backbone {model_type!r} is not supported by the TRIO side "
            f"pass (supported: {', '.join(sorted(supported))}). Serve this "
            "checkpoint without --plugin trio"
        )
    window = getattr(text, "sliding_window", None)
    if window is not None and window < getattr(text, "max_position_embeddings", 0):
        raise ValueError(
            f"vllm-trio: sliding-window attention (sliding_window={window}) is not supported "
            "by the TRIO side pass, which attends over the whole prompt"
        )


def _family_text_model_types(hf_config: Any) -> frozenset[str]:
    """The text backbones of the checkpoint's family (LLaVA-NeXT's when unknown)."""
    from .config import BASE_ARCH, FAMILIES, trio_family

    architectures = list(getattr(hf_config, "architectures", None) or [])
    for arch in architectures:
        if any(arch in (f.base_arch, f.trio_arch) for f in FAMILIES.values()):
            return trio_family(arch).text_model_types
    return FAMILIES[BASE_ARCH].text_model_types


def check_video_pruning(multimodal_config: Any) -> None:
    """Refuse vLLM's EVS video pruning next to TRIO: both would append M-RoPE
    columns to media rows, in different layouts (TRIO's Qwen2.5-VL leaves
    videos unpruned, with stock positions)."""
    rate = getattr(multimodal_config, "video_pruning_rate", None)
    if rate:
        raise ValueError(
            f"vllm-trio: --video-pruning-rate {rate} cannot be combined with --plugin trio; "
            "TRIO prunes images and serves videos unpruned. Drop one of the two"
        )


def check_quantization(method: str | None) -> None:
    """Refuse quantized checkpoints (FP8, AWQ, GPTQ, ...).

    Why: the side pass differentiates layers 0..L in plain PyTorch over their
    dense weights, and a quantized layer holds other tensors (FP8 weights and
    scales, packed int4 groups). Dequantizing layers 0..L for the side pass is
    the plan ((L + 1) / num_layers of the dense weights in memory), but it
    cannot be tested here: vLLM 0.32's CPU build, where this project's engine
    tests run, cannot quantize or run FP8 (its ``_C::static_scaled_fp8_quant``
    is a stub), so shipping it would mean serving selections nobody has checked.
    """
    if method is None:
        return
    raise ValueError(
        f"vllm-trio: quantized checkpoints ({method}) are not supported yet: the side pass "
        "differentiates decoder layers 0..L in plain PyTorch and needs their dense weights, "
        "which a quantized layer does not hold. Serve the unquantized checkpoint with "
        "--plugin trio, or this one without it (README 'Layouts')"
    )


def check_layer_mode(vllm_config: Any) -> None:
    """Refuse micro-batching (``--enable-dbo``, ``--ubatch-size``) in layer mode: it
    runs the forward on slices of a step's tokens, so row ``i`` of layer L's input
    would no longer be row ``i`` of the rows staged for that step."""
    from .config import TRIO_ARCH, TrioConfig

    hf_config = vllm_config.model_config.hf_config
    mode = TrioConfig.from_hf_config(hf_config).mode
    if mode == "layer" and TRIO_ARCH not in (getattr(hf_config, "architectures", None) or []):
        raise ValueError(
            "vllm-trio: --trio-mode layer is implemented for LLaVA-NeXT only (Qwen2.5-VL's "
            "handover would also need its M-RoPE positions at layer L); use --trio-mode input"
        )
    if mode == "layer" and getattr(vllm_config.parallel_config, "use_ubatching", False):
        raise ValueError(
            "vllm-trio: --trio-mode layer does not support micro-batching (--enable-dbo, "
            "--ubatch-size): the handed-over rows are staged per step, not per micro-batch. "
            "Use --trio-mode input, or serve without micro-batching"
        )
