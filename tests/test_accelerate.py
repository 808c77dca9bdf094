"""Scale-out on accelerate: `accelerate launch --multi_gpu --num_processes 2 -m lm_eval --model sink_hf ...` on the CPU
(gloo) splits the requests between two processes and scores each as one process does, under a patched model.

CI-sized (a tiny model, 6 piqa documents: about a minute here for both runs); it needs the sink_hf hook installed
(`python -m sink_eval.lm_eval_plugin`, which make and tox run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval", reason="the evals extra (lm-eval) is not installed")

from sink_eval import lm_eval_plugin  # noqa: E402
from sink_eval.evals.accuracy import write_task_yamls  # noqa: E402

pytestmark = pytest.mark.accelerate

DOCS = 6
MODEL_ARGS = "pretrained=tiny-llama,policy=oracle,threshold=0.3"  # per-request plans: rows copy different heads


def _run(command: list[str], out: Path, tasks: Path) -> tuple[dict[int, list[float]], str]:
    """Run lm_eval (through `command`, the launcher) on the first DOCS piqa documents: each document's per-choice
    log-likelihoods from the logged samples, and the log."""
    args = ["--model", "sink_hf", "--model_args", MODEL_ARGS, "--tasks", "piqa_local", "--include_path", str(tasks)]
    args += ["--limit", str(DOCS), "--batch_size", "4", "--log_samples", "--output_path", str(out)]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*command, *args], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    (samples,) = out.glob("*/samples_piqa_local_*.jsonl")
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    return {row["doc_id"]: [float(resp[0]) for resp in row["filtered_resps"]] for row in rows}, done.stderr


def test_two_launched_processes_score_every_request_as_one_process_does(tmp_path):
    assert lm_eval_plugin.installed(), (
        "the sink_hf hook of this version is not installed: run `python -m sink_eval.lm_eval_plugin`"
    )
    tasks = tmp_path / "tasks"
    write_task_yamls(tasks, ["piqa"])
    one, _ = _run([sys.executable, "-m", "lm_eval"], tmp_path / "one", tasks)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "lm_eval"]
    two, log = _run(launch, tmp_path / "two", tasks)
    assert "on rank 0" in log and "on rank 1" in log  # the requests were split between two processes
    assert sorted(one) == sorted(two) == list(range(DOCS))
    for doc in one:
        assert two[doc] == pytest.approx(one[doc], abs=1e-5), doc
