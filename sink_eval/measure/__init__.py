"""Attention statistics without an N x N tensor (the probe), sink heads and thresholds, correlations across layers and
prompts, token perplexity, and the seeded bootstrap."""
