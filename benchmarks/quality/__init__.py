"""Answer-quality benchmark: generated scenes, a small trained LLaVA-NeXT, pruning arms."""
