"""Evaluations: HellaSwag, zero-shot perplexity (WikiText-2, LAMBADA) and validation loss."""
