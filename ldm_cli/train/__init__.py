"""Training: config, a loop readable top to bottom (loop.py), batches, loss, data, latent cache, checkpoints."""
