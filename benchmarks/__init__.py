"""Benchmarks for vllm-trio (speed, KV cache and answer quality)."""
