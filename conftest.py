"""Test harness wiring: an offline environment, and real models loaded once per session."""

from __future__ import annotations

import os

# Set before transformers or huggingface_hub is imported anywhere: tests never reach a hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def bundled_model():
    """`bundled_model(name)` -> LoadedModel: each real model loaded (converted if need be) once."""
    from sink_eval.models import load_model

    loaded = {}

    def get(name: str):
        if name not in loaded:
            loaded[name] = load_model(name)
        return loaded[name]

    return get
