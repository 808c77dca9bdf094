"""The streaming plan kind: the plan and its rules (`plan`), its attention (`patch`), its constant-size decode cache
(`cache`) and its sink + window kernels (`banded`)."""
