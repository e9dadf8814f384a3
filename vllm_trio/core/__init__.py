"""The TRIO algorithm in pure PyTorch (no vLLM import): testable on tensors.

Used by the vLLM binding (``vllm_trio.binding``) and by the repo-only
HF-transformers oracle and baselines (``trio_dev``).
"""

from .batch import MAX_BATCH_ROWS, pad_rows, plan_batches
from .budget import Schedule, Stage, num_kept_tokens, validate_keep_ratio
from .llama_layer import LlamaLayerWeights, Rotary, decoder_layer, lm_head_logits, rms_norm
from .nms import nms_select
from .saliency import gradient_saliency, gradient_saliency_batch, loss_positions, proxy_loss
from .select import Selection, TrioParams, select_visual_tokens, select_visual_tokens_batch
from .tensor_parallel import TensorParallel

__all__ = [
    "MAX_BATCH_ROWS",
    "LlamaLayerWeights",
    "Rotary",
    "Schedule",
    "Selection",
    "Stage",
    "TensorParallel",
    "TrioParams",
    "decoder_layer",
    "gradient_saliency",
    "gradient_saliency_batch",
    "lm_head_logits",
    "loss_positions",
    "nms_select",
    "num_kept_tokens",
    "pad_rows",
    "plan_batches",
    "proxy_loss",
    "rms_norm",
    "select_visual_tokens",
    "select_visual_tokens_batch",
    "validate_keep_ratio",
]
