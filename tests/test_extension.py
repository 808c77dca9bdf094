"""sink_eval is extended by adding a class, not by editing the package: a plan kind defined here ("a planned head
attends only to itself") runs through the whole patch machinery by its `allowed` pattern alone, and a policy defined
here, registered by name, is measured by `sink-eval patch-eval` like the built-in ones."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from helpers import random_model

from sink_eval import cli
from sink_eval.measure.probe import PromptStats
from sink_eval.patches.base import PLAN_KINDS, Plan
from sink_eval.policies.base import Calibration, Policy, Target, heads_where
from sink_eval.policies.options import SinkOptions
from sink_eval.policies.registry import names, register_policy


@dataclass(frozen=True)
class SelfOnlyPlan(Plan):
    """A planned head's query attends to its own key only (its output is its own value)."""

    kind = "self_only"

    def allowed(self, query_pos: torch.Tensor, key_pos: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        return key_pos == query_pos


@register_policy
class SelfOnly(Policy):
    """Heads whose mean self score over the calibration prompts is at least tau attend only to themselves."""

    name = "self_only"
    kind = "self_only"
    Options = SinkOptions
    options: SinkOptions

    def plan(self, target: Target, prompt: PromptStats | None = None, calibration: Calibration = ()) -> Plan:
        scores = torch.stack([s.self_ for s in calibration if s.n_tokens >= 2]).mean(0)
        return SelfOnlyPlan.of(heads_where(scores >= self.options.threshold, target.layers))


def test_a_plan_kind_defined_outside_the_package_is_registered_and_patches_by_its_pattern_alone():
    assert PLAN_KINDS["self_only"] is SelfOnlyPlan
    model = random_model("llama", kv_heads=1, groups=2, head_dim=8, window=4)
    ids = torch.randint(1, 64, (1, 12), generator=torch.Generator().manual_seed(0))
    plan = SelfOnlyPlan.of({0: [1]})
    values = {}
    layer = model.model.layers[0].self_attn

    def keep_values(module, args, output):
        values["v"] = output  # v_proj output: (B, N, H_kv * D), before RoPE (values are not rotated)

    handle = layer.v_proj.register_forward_hook(keep_values)
    outputs = {}
    attention = layer.o_proj.register_forward_hook(lambda m, args, out: outputs.setdefault("in", args[0]))
    with torch.no_grad(), plan.patched(model):
        model(input_ids=ids)
    handle.remove()
    attention.remove()
    head_dim = 8
    head_1 = outputs["in"][0, :, head_dim : 2 * head_dim]  # head 1's attention output, every query
    assert torch.allclose(head_1, values["v"][0, :, :head_dim], atol=1e-6)  # its own value (one KV head)
    generated, _ = plan.generate(model, ids, max_new_tokens=3)
    assert generated.shape == (1, 15)


def test_a_policy_registered_from_outside_the_package_runs_through_patch_eval(tmp_path):
    prompts = [{"id": f"p{i}", "text": "the cat sat on the mat and then it sat again " * (i + 1)} for i in range(4)]
    evaluation, calibration = tmp_path / "eval.jsonl", tmp_path / "cal.jsonl"
    evaluation.write_text("\n".join(json.dumps(p) for p in prompts[:2]))
    calibration.write_text("\n".join(json.dumps({**p, "id": f"c{p['id']}"}) for p in prompts[2:]))
    assert "self_only" in names()
    out = tmp_path / "out"
    argv = ["patch-eval", "--model", "tiny-llama", "--policy", "self_only", "--threshold", "0.02"]
    argv += ["--prompts", str(evaluation), "--calibration-prompts", str(calibration), "--speed-tokens", "16"]
    argv += ["--speed-rounds", "1", "--generations", "1", "--new-tokens", "2", "--out", str(out)]
    assert cli.main(argv) == 0
    (row,) = json.loads((out / "results.json").read_text())["policies"]
    assert (row["policy"], row["kind"], row["label"]) == ("self_only", "self_only", "self_only tau=0.02")
    assert row["fidelity"]["fraction_heads"] > 0 and row["fidelity"]["kl"] > 0
    assert row["ceilings"]["prefill"] == pytest.approx(1.0)  # a kind that does not say what work it removes claims none
