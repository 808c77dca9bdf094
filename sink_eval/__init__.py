"""sink_eval: attention-sink heads of language models, their predictability, and a copy-pattern patch."""

__version__ = "0.1.0"
