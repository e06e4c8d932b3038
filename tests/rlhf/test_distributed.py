"""`torchrun` with 2 gloo processes on localhost gives the metrics of 1 process with the same global batch."""
import json
import math
import os
import subprocess
import sys

import pytest

from rlhf_fast.rlhf.run_io import read_metrics

from .test_pipeline import TINY


def _cli(out, device) -> list[str]:
    opts = {**TINY, "run.device": str(device)}
    return ["demo", "--out", str(out)] + [f"--{k}={v}" for k, v in opts.items()]


def _run(cmd, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _close(a: dict, b: dict, where: str) -> None:
    assert a.keys() == b.keys(), where
    for k in a:
        if isinstance(a[k], float) and math.isnan(a[k]):
            assert math.isnan(b[k]), (where, k)
        else:
            # gradients are summed over ranks in a different order: float32 rounding, nothing more
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), (where, k, a[k], b[k])


def test_two_gloo_processes_match_one(tmp_path, device):
    if device.type != "cpu":
        pytest.skip("the gloo equivalence test runs on CPU")
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, "-m", "rlhf_fast"] + _cli(one, device))
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "rlhf_fast"]
         + _cli(two, device))
    assert [json.loads((d / "summary.json").read_text())["world_size"] for d in (one, two)] == [1, 2]
    for stage in ("sft", "rm", "ppo"):
        a, b = read_metrics(one / stage / "metrics.jsonl"), read_metrics(two / stage / "metrics.jsonl")
        assert len(a) == len(b) > 0, stage
        for ra, rb in zip(a, b):
            _close(ra, rb, f"{stage} step {ra['step']}")
