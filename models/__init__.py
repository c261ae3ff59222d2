"""The Latent Diffusion Model library. It never imports `service/`; which module owns what: docs/architecture.md."""
