"""Sparse weights: masks (unstructured, N:M), and the methods that choose them — magnitude,
random (the floor), Wanda, SparseGPT — one module each on the method registry.

``slimtorch.sparsify(model, "2:4-sparsegpt", data)`` runs them; ``masks_of`` / ``apply_masks``
read and set a prepared model's masks."""
from .masks import Pattern, apply_masks, masks_of, parse_pattern, sparsity_summary

__all__ = ["Pattern", "apply_masks", "masks_of", "parse_pattern", "sparsity_summary"]
