"""The Gemma 3n network in MLX: config, text decoder, vision and audio towers, multimodal embedders, model, caches."""
