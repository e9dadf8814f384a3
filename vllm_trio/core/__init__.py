"""The TRIO algorithm in pure PyTorch (no vLLM import): testable on tensors.

Used both by the vLLM binding (``vllm_trio.model``) and by the HF-transformers
reference path (``vllm_trio.reference``).
"""

from .budget import Schedule, Stage, num_kept_tokens, validate_keep_ratio
from .llama_layer import LlamaLayerWeights, Rotary, decoder_layer, lm_head_logits, rms_norm
from .nms import nms_select
from .saliency import gradient_saliency, loss_positions, proxy_loss
from .select import Selection, TrioParams, select_visual_tokens
from .tensor_parallel import TensorParallel
from .vision_stage import merge_dropped, vision_stage_select, window_topk

__all__ = [
    "LlamaLayerWeights",
    "Rotary",
    "Schedule",
    "Selection",
    "Stage",
    "TensorParallel",
    "TrioParams",
    "decoder_layer",
    "gradient_saliency",
    "lm_head_logits",
    "loss_positions",
    "merge_dropped",
    "nms_select",
    "num_kept_tokens",
    "proxy_loss",
    "rms_norm",
    "select_visual_tokens",
    "validate_keep_ratio",
    "vision_stage_select",
    "window_topk",
]
