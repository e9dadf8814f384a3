"""Repo-only development tooling: never shipped in the wheel or the image.

Tests, benchmarks and the demo import it from the checkout: local LLaVA-NeXT
checkpoints (``checkpoints``), a ``vllm serve`` on 127.0.0.1 (``local_server``),
KV accounting read from vLLM's scheduler (``accounting``), the HF-transformers
oracle that prunes inside the LLM (``reference``, ``hf_adapter``), and the
baselines and vision-encoder stage the quality harness compares against
(``baselines``, ``vision_stage``).
"""
