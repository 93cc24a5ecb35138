"""Compression verbs over quant/ (and, later, pruning and distillation over the Trainer)."""
