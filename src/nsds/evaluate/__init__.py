"""Evaluation of (fake-)quantized models: perplexity on real text, zero-shot tasks."""
