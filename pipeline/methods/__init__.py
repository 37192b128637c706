"""Quantization methods, one file each. Each takes tensors and a format and returns tensors."""
