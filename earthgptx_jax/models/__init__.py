"""Flax Linen networks: the LLaMA decoder, shared attention, decoding; encoders and heads."""
