"""The vLLM binding: the multimodal processor that sizes each image's
placeholders (``processor``), the model subclass whose ``embed_multimodal``
returns the kept embeddings (``model``), and the side pass that scores them
with the language model's own weights (``side_pass``)."""
