"""sink_eval's ready-made checks of this repository's four zoo models, configured in pyproject.toml
[tool.sink_eval], exactly as any project that uses the plugin collects them (`sink-eval init` writes this module):

    pytest -m analysis        # sink figures, per model, held to baselines/analysis (and the per-prompt scores)
    pytest -m eval            # lm-eval accuracy, held to baselines/eval (and every request's log-likelihood)
    pytest -m longctx         # passkey and perplexity at 1k tokens, held to baselines/longctx
    pytest -m analysis --update-baselines   # re-measure and rewrite, each file reported as not checked
"""

from sink_eval.pytest_plugin.checks import *  # noqa: F401,F403
