"""EarthGPT-X in JAX/Flax."""
