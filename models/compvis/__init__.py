"""The CompVis latent-diffusion model zoo (Rombach et al. 2022): its `config.yaml` files read into our configs,
its checkpoints loaded with the original's leniency, and the conditioners only the zoo uses (the x-transformers
BERT encoder, the SpatialRescaler of the semantic-map models)."""
