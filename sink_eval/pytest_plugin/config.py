"""The plugin's configuration: the `[tool.sink_eval]` table of the project's pyproject.toml.

```toml
[tool.sink_eval]
models = ["smollm2-135m", "./checkpoints/mine"]  # zoo names, checkpoint directories (relative to the project),
                                                  # hub ids already in the local cache
checks = ["analysis"]       # which ready-made checks run: analysis, eval, longctx, patch
baselines = "baselines"     # the folder of baseline files (analysis/<model>.json, eval/…, longctx/…)
prompts = ""                # a JSONL prompt file for the analysis ("": the committed prompt set)
thresholds = [0.8, 0.3]     # sink thresholds tau of the analysis
offline = true              # HF_HUB_OFFLINE / HF_DATASETS_OFFLINE for the test session

[tool.sink_eval.analysis]
max_prompt_tokens = { "qwen2.5-coder-1.5b" = 512 }  # per model: leave out longer prompts (CI time)

[tool.sink_eval.eval]
tasks = ["piqa", "arc_easy", "sciq"]
limit = 30                                          # the first N documents of each task
policies = [{ name = "calibrated", threshold = 0.8 }]
models = { "qwen2.5-coder-1.5b" = { tasks = ["sciq"], limit = 10 } }  # per model: other tasks or limit

[tool.sink_eval.longctx]
models = ["smollm2-135m"]    # default: every model
lengths = [1024]
depths = [0.1, 0.5, 0.9]
trials = 4                   # per (length, depth)
policies = [{ name = "calibrated", threshold = 0.8 }]

[tool.sink_eval.patch]
policies = [{ name = "calibrated" }, { name = "streaming", window = 64 }]
```

A policy is `{ name = …, <option> = … }` with the options of `sink_eval.policies.options`. Every key is checked when
the session starts: an unknown key, a value of the wrong type or an unknown check is a one-line error naming it.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sink_eval.core.errors import SinkEvalError
from sink_eval.core.results import from_json

TABLE = "tool.sink_eval"
CHECKS = ("analysis", "eval", "longctx", "patch")


@dataclass(frozen=True)
class AnalysisChecks:
    max_prompt_tokens: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class EvalModel:
    tasks: list[str] | None = None
    limit: int | None = None


@dataclass(frozen=True)
class EvalChecks:
    tasks: list[str] = field(default_factory=lambda: ["piqa", "arc_easy", "sciq"])
    limit: int = 30
    policies: list[dict[str, Any]] = field(default_factory=lambda: [{"name": "calibrated", "threshold": 0.8}])
    models: dict[str, EvalModel] = field(default_factory=dict)

    def tasks_of(self, model: str) -> list[str]:
        own = self.models.get(model)
        return own.tasks if own is not None and own.tasks is not None else self.tasks

    def limit_of(self, model: str) -> int:
        own = self.models.get(model)
        return own.limit if own is not None and own.limit is not None else self.limit


@dataclass(frozen=True)
class LongctxChecks:
    models: list[str] | None = None
    lengths: list[int] = field(default_factory=lambda: [1024])
    depths: list[float] = field(default_factory=lambda: [0.1, 0.5, 0.9])
    trials: int = 4
    policies: list[dict[str, Any]] = field(default_factory=lambda: [{"name": "calibrated", "threshold": 0.8}])


@dataclass(frozen=True)
class PatchChecks:
    policies: list[dict[str, Any]] = field(default_factory=lambda: [{"name": "calibrated"}])


@dataclass(frozen=True)
class SinkConfig:
    """`[tool.sink_eval]`, with `root` the folder of the pyproject.toml it came from."""

    models: list[str]
    checks: list[str] = field(default_factory=lambda: ["analysis"])
    baselines: str = "baselines"
    prompts: str = ""
    thresholds: list[float] = field(default_factory=lambda: [0.8, 0.3])
    offline: bool = True
    analysis: AnalysisChecks = field(default_factory=AnalysisChecks)
    eval: EvalChecks = field(default_factory=EvalChecks)
    longctx: LongctxChecks = field(default_factory=LongctxChecks)
    patch: PatchChecks = field(default_factory=PatchChecks)
    root: str = "."  # the project's folder (not a key of the table)

    def model_path(self, model: str) -> str:
        """A model as `load_model` takes it: a relative checkpoint directory is resolved against the project."""
        local = Path(self.root) / model
        return str(local) if not Path(model).is_absolute() and local.is_dir() else model

    def models_of(self, check: str) -> list[str]:
        """The models a check runs on (none where the check is off)."""
        if check not in self.checks:
            return []
        if check == "longctx" and self.longctx.models is not None:
            return self.longctx.models
        return self.models

    def baseline(self, kind: str, model: str, suffix: str = "") -> Path:
        """`<baselines>/<kind>/<model slug><suffix>.json`."""
        return Path(self.root) / self.baselines / kind / f"{slug(model)}{suffix}.json"


def slug(model: str) -> str:
    """A model as a file name: a zoo name as it is, a directory by its last part, a hub id with "--" for "/"."""
    name = Path(model).name if ("/" in model and Path(model).exists()) or model.startswith((".", "/")) else model
    return re.sub(r"[^A-Za-z0-9._-]+", "--", name).strip("-") or "model"


def _unknown_keys(table: dict[str, Any], cls: type, where: str) -> None:
    """Refuse a key that no field of `cls` reads, at any depth of the dataclasses."""
    fields = [f.name for f in dataclasses.fields(cls) if f.name != "root"]
    nested = {"analysis": AnalysisChecks, "eval": EvalChecks, "longctx": LongctxChecks, "patch": PatchChecks}
    for key, value in table.items():
        if key not in fields:
            raise SinkEvalError(f"{where}: unknown key {key!r}; the keys are {', '.join(fields)}")
        if cls is SinkConfig and key in nested and isinstance(value, dict):
            _unknown_keys(value, nested[key], f"{where}.{key}")
        if cls is EvalChecks and key == "models" and isinstance(value, dict):
            for model, own in value.items():
                if isinstance(own, dict):
                    _unknown_keys(own, EvalModel, f"{where}.models.{model}")


def read_config(root: Path) -> SinkConfig | None:
    """The `[tool.sink_eval]` table of `root`/pyproject.toml, checked; None where there is no such table."""
    path = root / "pyproject.toml"
    if not path.is_file():
        return None
    try:
        table: Any = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise SinkEvalError(f"{path} is not readable TOML ({err}); fix it") from err
    for part in TABLE.split("."):
        table = table.get(part) if isinstance(table, dict) else None
    if table is None:
        return None
    where = f"{path} [{TABLE}]"
    if not isinstance(table, dict) or "models" not in table:
        raise SinkEvalError(f"{where} needs `models`, a list of zoo names, checkpoint directories or hub ids")
    _unknown_keys(table, SinkConfig, where)
    config = from_json(SinkConfig, {**table, "root": str(root)}, where)
    unknown = sorted(set(config.checks) - set(CHECKS))
    if unknown:
        raise SinkEvalError(f"{where}: checks {unknown} unknown; choose among {', '.join(CHECKS)}")
    if not config.models:
        raise SinkEvalError(f"{where}: `models` is empty; name at least one model")
    return config


TEST_MODULE = "tests/test_sink_eval.py"
TEST_MODULE_TEXT = '''"""sink_eval's ready-made checks of this project's models, configured in pyproject.toml
[tool.sink_eval]:

    pytest -m analysis --update-baselines   # measure the models and write baselines/analysis/<model>.json
    pytest -m analysis                      # hold the models to them (also: -m eval, -m longctx, -m patch)
"""

from sink_eval.pytest_plugin.checks import *  # noqa: F401,F403
'''


def table_text(models: list[str]) -> str:
    """A `[tool.sink_eval]` table for these models, with the analysis check on."""
    names = ", ".join(f'"{m}"' for m in models)
    return (
        "\n[tool.sink_eval]\n"
        "# sink_eval's checks of this project's models (pytest -m analysis);\n"
        "# every key: sink_eval/pytest_plugin/config.py\n"
        f"models = [{names}]\n"
        'checks = ["analysis"]\n'
    )


def init_project(root: Path, models: list[str]) -> list[str]:
    """Write the `[tool.sink_eval]` table into root/pyproject.toml (appended; the file made if there is none) unless
    it has one, and `TEST_MODULE` unless it exists: what was written, one line each. Atomic; nothing is replaced."""
    from sink_eval.core.files import write_text_atomically

    done = []
    pyproject = root / "pyproject.toml"
    if read_config(root) is not None:
        done.append(f"{pyproject} already has [{TABLE}]: left as it is")
    else:
        before = pyproject.read_text(encoding="utf-8") if pyproject.exists() else ""
        write_text_atomically(
            pyproject, before + ("\n" if before and not before.endswith("\n") else "") + table_text(models)
        )
        done.append(f"{pyproject}: [{TABLE}] written (models {', '.join(models)})")
    module = root / TEST_MODULE
    if module.exists():
        done.append(f"{module} already exists: left as it is")
    else:
        write_text_atomically(module, TEST_MODULE_TEXT)
        done.append(f"{module}: the ready-made checks, collected")
    return done
