"""The TRIO algorithm in pure PyTorch (no vLLM import): testable on tensors.

Used by the vLLM binding (``vllm_trio.binding``) and by the repo-only
HF-transformers oracle and baselines (``trio_dev``).
"""

from .budget import Schedule, Stage, num_kept_tokens, validate_keep_ratio
from .llama_layer import LlamaLayerWeights, Rotary, decoder_layer, lm_head_logits, rms_norm
from .nms import nms_select
from .saliency import gradient_saliency, loss_positions, proxy_loss
from .select import Selection, TrioParams, select_visual_tokens
from .tensor_parallel import TensorParallel

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
    "nms_select",
    "num_kept_tokens",
    "proxy_loss",
    "rms_norm",
    "select_visual_tokens",
    "validate_keep_ratio",
]
