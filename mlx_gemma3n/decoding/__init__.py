"""Choosing the next token: sampling (temperature, top-k / top-p / min-p, repetition penalty)."""
