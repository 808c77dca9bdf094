"""Typed results on disk: a dataclass to JSON and back, every field checked on the way in.

`from_json(cls, data, source)` reads a dataclass from parsed JSON by its type hints (nested dataclasses, lists,
string-keyed dicts, `X | None`, str, int, float, bool, Any); a missing or mistyped field is a `SinkEvalError` that
names the file and the field, e.g. "runs/x/results.json: summary[0].bins[2].prevalence is missing". A field with a
default may be absent (a file written before the field existed): it reads as its default.

Every results and baseline file carries its `Provenance`: the date, the command, the library versions, the code
that made it (sink_eval's version and git commit, "+dirty" where tracked files had uncommitted changes) and the
machine (CPU model, and the GPU where one is visible).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import subprocess
import types
import typing
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, ClassVar, Self, TypeVar

from sink_eval.core.errors import SinkEvalError

T = TypeVar("T")


@dataclasses.dataclass
class ModelId:
    name: str
    fingerprint: str


@dataclasses.dataclass
class ModelInfo:
    name: str
    fingerprint: str
    layers: int
    heads: int
    kv_heads: int
    dtype: str


@dataclasses.dataclass
class Provenance:
    date: str
    command: str
    versions: dict[str, str]
    code: str | None = None  # `code_version()` (None: a file written before it was recorded)
    machine: str | None = None  # `machine_name()` (None: likewise)


PACKAGES = ("sink_eval", "torch", "transformers", "lm_eval")


def provenance(command: str, packages: tuple[str, ...] = PACKAGES) -> Provenance:
    """Now, the command, the installed versions of `packages` (those installed), the code and the machine."""
    return Provenance(
        date=datetime.now(UTC).isoformat(timespec="seconds"),
        command=command,
        versions=installed_versions(packages),
        code=code_version(),
        machine=machine_name(),
    )


def installed_versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """The version of each of `packages` that is installed."""
    found = {}
    for name in packages:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


@functools.cache
def code_version() -> str:
    """sink_eval's version and, run from a git checkout, its commit: "0.1.0 git 1a2b3c4d5e6f", with "+dirty" where
    tracked files have uncommitted changes; "0.1.0 (installed)" otherwise."""
    root = Path(__file__).resolve().parents[2]
    base = version("sink_eval")
    if not (root / ".git").exists():
        return f"{base} (installed)"
    try:
        git = ["git", "-C", str(root)]
        sha = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True)
        status = [*git, "status", "--porcelain", "--untracked-files=no"]
        dirty = subprocess.run(status, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"{base} (git checkout, commit unreadable)"
    return f"{base} git {sha.stdout.strip()[:12]}" + ("+dirty" if dirty else "")


@functools.cache
def machine_name() -> str:
    """The CPU model (from /proc/cpuinfo where there is one) and the number of CPUs, and the CUDA device's name
    where torch sees one."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    name = f"{cpu}, {os.cpu_count()} CPUs"
    import torch  # core imports no torch at module level: reading results needs none

    if torch.cuda.is_available():
        name += f"; GPU {torch.cuda.get_device_name()}"
    return name


def to_json(obj: Any) -> Any:
    """Plain JSON values of a dataclass (recursively), fields in their declared order."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_json(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_json(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_json(v) for k, v in obj.items()}
    return obj


def from_json(cls: type[T], data: Any, source: str | Path, where: str = "") -> T:
    """`cls` read from parsed JSON, every field present and of its declared type."""
    return _read(cls, data, str(source), where)


def _describe(tp: Any) -> str:
    if tp is Any:
        return "any value"
    if dataclasses.is_dataclass(tp):
        return "an object"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is list:
        return "a list"
    if origin is dict:
        return "an object"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false", type(None): "null"}[tp]


def _json_type(value: Any) -> str:
    names = {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "a boolean",
        list: "a list",
        dict: "an object",
    }
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _read(tp: Any, value: Any, source: str, where: str, expected: str | None = None) -> Any:
    """`value` read as `tp`; `expected` describes the type in errors (default: `tp`'s description)."""

    def mistyped() -> SinkEvalError:
        what = expected or _describe(tp)
        return SinkEvalError(f"{source}: {where or 'the file'} should be {what}, not {_json_type(value)}")

    if tp is Any:
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):  # a dataclass type (tp is a type hint)
        if not isinstance(value, dict):
            raise mistyped()
        hints = typing.get_type_hints(tp)
        kwargs = {}
        for f in dataclasses.fields(tp):
            sub = f"{where}.{f.name}" if where else f.name
            if f.name not in value:
                if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
                    continue  # absent from a file older than the field: its default
                raise SinkEvalError(f"{source}: {sub} is missing")
            kwargs[f.name] = _read(hints[f.name], value[f.name], source, sub)
        return tp(**kwargs)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) != 1:
            raise TypeError(f"from_json reads X | None, not {tp}")
        if value is None:
            raise mistyped()
        return _read(options[0], value, source, where, expected or _describe(tp))
    if origin is list:
        if not isinstance(value, list):
            raise mistyped()
        return [_read(args[0], v, source, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise mistyped()
        return {k: _read(args[1], v, source, f"{where}[{k!r}]") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise mistyped()
        try:
            return float(value)
        except OverflowError:
            raise SinkEvalError(f"{source}: {where or 'the file'} is {str(value)[:20]}…, beyond any float") from None
    if tp is int and isinstance(value, bool):
        raise mistyped()
    if not isinstance(value, tp):
        raise mistyped()
    return value


def read_json_file(path: Path, schema: str, fix: str) -> dict:
    """The parsed JSON object of a file written with `schema`; any other content says what is wrong and `fix`."""
    try:
        data = json.loads(Path(path).read_bytes().decode("utf-8"))
    except FileNotFoundError as err:
        raise SinkEvalError(f"no file at {path}; {fix}") from err
    except OSError as err:
        raise SinkEvalError(f"cannot read {path}: {err.strerror}; {fix}") from err
    except UnicodeDecodeError as err:
        raise SinkEvalError(f"{path} is not UTF-8 text (byte offset {err.start}); {fix}") from err
    except json.JSONDecodeError as err:
        raise SinkEvalError(f"{path} is not valid JSON ({err.msg}, line {err.lineno}); {fix}") from err
    except RecursionError as err:
        raise SinkEvalError(f"{path} is not a results file (its JSON nests too deeply); {fix}") from err
    found = data.get("schema") if isinstance(data, dict) else None
    if found != schema:
        raise SinkEvalError(f"{path} has schema {found!r}, this sink_eval reads {schema!r}; {fix}")
    return data


def with_schema(schema: str, obj: Any) -> dict:
    """The JSON object of a top-level result: its schema first, then its fields."""
    return {"schema": schema, **to_json(obj)}


def without_schema(data: dict, schema: str, source: str | Path) -> dict:
    """The fields of a top-level result's JSON object, after checking its schema."""
    if not isinstance(data, dict) or data.get("schema") != schema:
        found = data.get("schema") if isinstance(data, dict) else None
        raise SinkEvalError(f"{source} has schema {found!r}, this sink_eval reads {schema!r}")
    return {k: v for k, v in data.items() if k != "schema"}


RESULTS_FILE = "results.json"


def results_file(path: Path) -> Path:
    """The results file a command's output directory holds (a file is taken as it is)."""
    path = Path(path)
    return path / RESULTS_FILE if path.is_dir() else path


class TopLevel:
    """Base of a results file's dataclass: `SCHEMA` names its format and `COMMAND` the `sink-eval` command that writes
    it; `to_json` writes the schema first, `from_json` checks it and then every field, `read` reads a file."""

    SCHEMA: ClassVar[str]
    COMMAND: ClassVar[str]

    def __init_subclass__(cls, schema: str = "", command: str = "", **kwargs: Any) -> None:
        """`class XResult(TopLevel, schema="sink_eval.x/1", command="x")`."""
        super().__init_subclass__(**kwargs)
        cls.SCHEMA, cls.COMMAND = schema, command

    @classmethod
    def read(cls, path: Path) -> Self:
        """The results of an output directory (or a results file), every field checked; anything else is an error
        that says what to give instead."""
        file = results_file(path)
        fix = f"give a directory written by this version's `sink-eval {cls.COMMAND}`, or re-run it"
        return cls.from_json(read_json_file(file, cls.SCHEMA, fix), file)

    def to_json(self) -> dict:
        return with_schema(self.SCHEMA, self)

    @classmethod
    def from_json(cls, data: dict, source: str | Path) -> Self:
        return from_json(cls, without_schema(data, cls.SCHEMA, source), source)
