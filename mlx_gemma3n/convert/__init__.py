"""Hugging Face checkpoint -> MLX folder conversion and quantization (`python -m mlx_gemma3n.convert`)."""

from .convert import convert

__all__ = ["convert"]
