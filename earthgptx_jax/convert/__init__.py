"""Weight conversion between PyTorch layouts (transformers / open_clip / SAM) and Flax params."""
