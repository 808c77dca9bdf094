"""sink_eval: attention-sink and streaming heads of language models, how predictable they are, and what patches that
skip or shrink their attention really buy.

Its packages form layers (`LAYERS`, bottom first): a module imports from its own package and from lower layers only,
never from a package beside it or above it (`tests/test_architecture.py` checks every import; ARCHITECTURE.md draws
them)."""

__version__ = "0.1.0"

LAYERS = (
    ("core",),  # errors, files, results, shapes, registered attention, resumable work
    ("models", "prompts"),  # the model zoo and loader; prompt sets and passkey prompts
    ("measure", "patches"),  # attention statistics; the plan interface and its kinds (copy, streaming)
    ("policies",),  # statistics -> plans, one class per policy, and their random controls
    ("analyses", "evals"),  # analyze / taxonomy / scale; patch-eval / lm-eval accuracy / longctx / speed
    ("reports", "baselines"),  # tables, figures, Markdown; committed measurements with bands
    ("pytest_plugin",),  # markers, options, session fixtures and ready-made checks; `[tool.sink_eval]`
    ("cli", "lm_eval_plugin"),  # the `sink-eval` command; the `lm_eval` hook
)
