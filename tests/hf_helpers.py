"""HF-transformers side of the cross-checks: the same weights as vLLM, other code."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoProcessor, LlavaNextForConditionalGeneration


@dataclass(frozen=True)
class HFPrompt:
    """A prompt as HF's processor expands it (one placeholder per visual token)."""

    input_ids: torch.Tensor
    pixel_values: torch.Tensor
    image_sizes: torch.Tensor
    image_token_id: int

    @property
    def visual_positions(self) -> torch.Tensor:
        return torch.nonzero(self.input_ids == self.image_token_id).squeeze(1)


def load_hf(ckpt: Path) -> tuple[LlavaNextForConditionalGeneration, object]:
    model = LlavaNextForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(ckpt)


def hf_prompt(model, processor, text: str, image) -> HFPrompt:
    enc = processor(images=image, text=text, return_tensors="pt")
    return HFPrompt(
        input_ids=enc["input_ids"][0],
        pixel_values=enc["pixel_values"],
        image_sizes=enc["image_sizes"],
        image_token_id=model.config.image_token_index,
    )


def hf_hidden_entering(model, p: HFPrompt, layer: int) -> torch.Tensor:
    """Residual stream entering decoder ``layer`` (HF's own forward)."""
    with torch.no_grad():
        out = model(
            input_ids=p.input_ids[None],
            pixel_values=p.pixel_values,
            image_sizes=p.image_sizes,
            output_hidden_states=True,
        )
    return out.hidden_states[layer][0]
