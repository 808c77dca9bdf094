"""Committed baselines: measured values with bands and provenance; read, write (atomically), compare, diff.

A band is measured, never chosen to make a test pass: value ± max(2 x bootstrap standard error over prompts, 0.01).
The bootstrap (`sink_eval.analysis`) is seeded, so the same measurement gives the same band.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from sink_eval.analysis import summary_groups
from sink_eval.errors import SinkEvalError
from sink_eval.files import write_text_atomically

BASELINE_SCHEMA = "sink_eval.baseline/1"
SE_MULTIPLE = 2.0
MIN_HALF_WIDTH = 0.01
BAND_RULE = f"value ± max({SE_MULTIPLE:g} x bootstrap standard error over prompts, {MIN_HALF_WIDTH:g})"
METRICS = ("prevalence", "first_layer_agreement")


def value_key(metric: str, tau: str, bin_key: str) -> str:
    return f"{metric}/{tau}/{bin_key}"


def measured_values(res: dict) -> dict[str, dict]:
    """Every banded quantity of an analysis result: {key: {"value": v or None, "se": s or None}}."""
    out = {}
    for tau, summary in res["summary"].items():
        if not tau.startswith("tau="):
            continue
        for bin_key, group in summary_groups(summary):
            for metric in METRICS:
                out[value_key(metric, tau, bin_key)] = {"value": group.get(metric), "se": group.get(f"{metric}_se")}
    return out


def band(value: float | None, se: float | None) -> dict:
    if value is None:
        return {"value": None, "se": None, "lo": None, "hi": None}
    half = max(SE_MULTIPLE * (se or 0.0), MIN_HALF_WIDTH)
    return {"value": value, "se": se, "lo": value - half, "hi": value + half}


def make_baseline(res: dict, command: str) -> dict:
    return {
        "schema": BASELINE_SCHEMA,
        "model": {"name": res["model"]["name"], "fingerprint": res["model"]["fingerprint"]},
        "provenance": {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": command,
            "versions": res["versions"],
            "prompt_set_sha256": res["settings"]["prompt_set_sha256"],
            "n_prompts": len(res["prompts"]),
        },
        "band_rule": BAND_RULE,
        "values": {k: band(v["value"], v["se"]) for k, v in measured_values(res).items()},
    }


def read_baseline(
    path: Path,
    schema: str = BASELINE_SCHEMA,
    marker: str = "analysis",
    identity: tuple[tuple[str, str], ...] = (("model", "fingerprint"), ("provenance", "prompt_set_sha256")),
) -> dict:
    """A baseline file, checked for its schema and fields; every problem says how to make a good one."""
    fix = f"regenerate it from a measurement with `pytest -m {marker} --update-baselines`"
    try:
        baseline = json.loads(Path(path).read_text())
    except FileNotFoundError as err:
        raise SinkEvalError(f"no baseline at {path}; {fix}") from err
    except json.JSONDecodeError as err:
        raise SinkEvalError(f"baseline {path} is not valid JSON ({err.msg}, line {err.lineno}); {fix}") from err
    if not isinstance(baseline, dict) or baseline.get("schema") != schema:
        raise SinkEvalError(f"baseline {path} is not a {schema} file; {fix}")
    try:
        for entry in baseline["values"].values():
            if entry["value"] is not None and not entry["lo"] <= entry["value"] <= entry["hi"]:
                raise SinkEvalError(f"baseline {path} has a band that does not contain its value; {fix}")
        for section, field in identity:
            if not isinstance(baseline[section][field], str):
                raise SinkEvalError(f"baseline {path} has no {section}.{field}; {fix}")
    except (KeyError, TypeError) as err:
        raise SinkEvalError(f"baseline {path} is missing field {err}; {fix}") from err
    return baseline


def check_comparable(res: dict, baseline: dict, path: Path) -> None:
    """Refuse to compare a result with a baseline of other weights or another prompt set."""
    how = "if the change is intended, re-measure with `pytest -m analysis --update-baselines` and say why in the commit"
    if res["model"]["fingerprint"] != baseline["model"]["fingerprint"]:
        raise SinkEvalError(
            f"baseline {path} was measured on weights {baseline['model']['fingerprint']}, but the loaded model is "
            f"{res['model']['fingerprint']}: the numbers are not comparable; {how}"
        )
    if res["settings"]["prompt_set_sha256"] != baseline["provenance"]["prompt_set_sha256"]:
        raise SinkEvalError(
            f"baseline {path} was measured on another prompt set (sha256 "
            f"{baseline['provenance']['prompt_set_sha256'][:12]}, now {res['settings']['prompt_set_sha256'][:12]}: "
            f"the eval data or the Python standard library differ); {how}"
        )


def outside_band(measured: dict, expected: dict) -> str | None:
    """Why a measured {"value"} lies outside the expected band, or None when it is inside."""
    value, lo, hi = measured["value"], expected["lo"], expected["hi"]
    if expected["value"] is None or value is None:
        if (expected["value"] is None) != (value is None):
            return f"expected {expected['value']}, measured {value} (one of them is undefined)"
        return None
    if not lo <= value <= hi:
        return f"measured {value:.4f}, outside the band [{lo:.4f}, {hi:.4f}] around {expected['value']:.4f}"
    return None


def write_baseline(path: Path, baseline: dict) -> None:
    write_text_atomically(Path(path), json.dumps(baseline, indent=1) + "\n")


def diff(old: dict | None, new: dict) -> str:
    """What changed between two baselines, one line a value."""
    if old is None:
        return f"new baseline with {len(new['values'])} values"
    lines = []
    for key, entry in new["values"].items():
        before = old["values"].get(key, {}).get("value")
        if before != entry["value"]:
            fmt = lambda v: "undefined" if v is None else f"{v:.4f}"  # noqa: E731
            lines.append(f"{key}: {fmt(before)} -> {fmt(entry['value'])}")
    return "\n".join(lines) or "no value changed"


EVAL_BASELINE_SCHEMA = "sink_eval.eval_baseline/2"
EVAL_IDENTITY = (("model", "fingerprint"), ("provenance", "settings_sha256"))
EVAL_BAND_RULE = (
    f"unpatched accuracy ± max({SE_MULTIPLE:g} x lm-eval stderr, {MIN_HALF_WIDTH:g}); a policy's change against "
    f"unpatched ± max({SE_MULTIPLE:g} x paired stderr, {MIN_HALF_WIDTH:g})"
)


def eval_values(res: dict) -> dict[str, dict]:
    """Every banded quantity of an eval result: unpatched accuracy per task, each policy's change per task."""
    out = {}
    for run in res["runs"]:
        for task, t in run["tasks"].items():
            if run["policy"] is None:
                out[f"{task}/unpatched/acc"] = {"value": t["acc"], "se": t["acc_stderr"]}
            else:
                out[f"{task}/{run['label']}/change"] = {"value": t["change"], "se": t["change_se"]}
    return out


def eval_settings_sha256(res: dict) -> str:
    """What an eval baseline is comparable on: tasks, limit, data file hashes and policies."""
    import hashlib

    identity = [res["settings"]["tasks"], res["settings"]["limit"], res["settings"]["data_sha256"]]
    identity.append([[run["label"], run["options"]] for run in res["runs"]])
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def static_plans(res: dict) -> dict[str, dict]:
    """The copy plan of each static policy (calibrated, hybrid over calibrated): the heads its accuracy was measured
    with. Per-prompt policies (oracle, first_layer) have none: their plans are made per request."""
    return {run["label"]: run["plan"] for run in res["runs"] if run.get("plan") is not None}


def make_eval_baseline(res: dict, command: str) -> dict:
    return {
        "schema": EVAL_BASELINE_SCHEMA,
        "model": {"name": res["model"]["name"], "fingerprint": res["model"]["fingerprint"]},
        "provenance": {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": command,
            "versions": res["versions"],
            "settings": {k: res["settings"][k] for k in ("tasks", "limit", "splits", "data_sha256", "batch_size")},
            "settings_sha256": eval_settings_sha256(res),
            "plans": static_plans(res),
            "wall_s": {run["label"]: run["wall_s"] for run in res["runs"]},
        },
        "band_rule": EVAL_BAND_RULE,
        "values": {k: band(v["value"], v["se"]) for k, v in eval_values(res).items()},
    }


def read_eval_baseline(path: Path) -> dict:
    baseline = read_baseline(path, EVAL_BASELINE_SCHEMA, "eval", EVAL_IDENTITY)
    if not isinstance(baseline["provenance"].get("plans"), dict):
        raise SinkEvalError(
            f"baseline {path} has no provenance.plans; regenerate it from a measurement with "
            "`pytest -m eval --update-baselines`"
        )
    return baseline


def check_eval_comparable(res: dict, baseline: dict, path: Path) -> None:
    """Refuse to compare with a baseline of other weights, tasks, data, limit or policies."""
    how = "if the change is intended, re-measure with `pytest -m eval --update-baselines` and say why in the commit"
    if res["model"]["fingerprint"] != baseline["model"]["fingerprint"]:
        raise SinkEvalError(
            f"baseline {path} was measured on weights {baseline['model']['fingerprint']}, but the loaded model is "
            f"{res['model']['fingerprint']}: the numbers are not comparable; {how}"
        )
    if eval_settings_sha256(res) != baseline["provenance"]["settings_sha256"]:
        raise SinkEvalError(
            f"baseline {path} was measured with other tasks, data, --limit or policies "
            f"({json.dumps(baseline['provenance']['settings'])}); {how}"
        )
    for label, plan in baseline["provenance"]["plans"].items():
        now = static_plans(res).get(label)
        if now != plan:
            raise SinkEvalError(
                f"baseline {path}: policy {label!r} copies other heads now ({_heads(now)}) than when it was measured "
                f"({_heads(plan)}), so its accuracy change is not comparable. The calibration prompts differ: the "
                f"default set reads code from this Python's standard library, which changes between Python versions "
                f"(or --data-dir points at other data); {how}"
            )


def _heads(plan: dict | None) -> str:
    if not plan or not plan["heads"]:
        return "none"
    return ", ".join(f"L{layer}.H{h}" for layer, heads in plan["heads"].items() for h in heads)
