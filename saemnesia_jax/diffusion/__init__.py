"""The diffusion model layer: loading, hooks, the sampler and the latent clamp."""
