"""Weights in and out: checkpoint names and files, loading, the mapped PLE table, quantization, MatFormer slices, export."""
