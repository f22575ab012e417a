"""What the layer scores are for: experts per layer (allocation, moe) and sparsity
per layer (allocation, prune)."""
