"""What a plan costs and buys: `patch_eval` (fidelity, speed, KV memory), `accuracy` (lm-evaluation-harness on local
data), `longctx` (passkey and long-text perplexity against random controls), `speed` (paired timings and ceilings)."""
