"""The service around the model library: front ends, queue, workers. Which module owns what, and the layering
the tests enforce: docs/architecture.md."""
