"""Flax NNX models: the causal Wan DiT, the Wan VAE and the umT5 text encoder."""
