"""The vLLM binding: for each family a multimodal processor that sizes each
image's placeholders and a model subclass whose ``embed_multimodal`` returns
the kept embeddings (LLaVA-NeXT: ``processor``, ``model``; Qwen2.5-VL:
``qwen2_5_vl``), built on what they share (``trio_processor``,
``trio_model``), and the side pass that scores visual tokens with the
language model's own weights (``side_pass``)."""
