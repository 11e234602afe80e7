"""Prompts to model inputs: tokenizer and chat template, images, audio features, the checkpoint's preprocessing settings."""
