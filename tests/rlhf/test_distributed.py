"""`torchrun` with 2 gloo processes on localhost gives the metrics of 1 process with the same global batch."""
import json
import math
import os
import subprocess
import sys

import pytest

from rlhf_fast.rlhf import pipeline
from rlhf_fast.rlhf.run_io import read_metrics

from .test_pipeline import tiny

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "rlhf_fast"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, device):
    """The tiny demo in this process (1 rank): the reference the 2-rank runs must reproduce."""
    if device.type != "cpu":
        pytest.skip("the gloo equivalence tests run on CPU")
    out = tmp_path_factory.mktemp("one")
    pipeline.run_demo(tiny(out, device))
    return out


def _torchrun(stage: str, out, device, *extra: str) -> None:
    cfg = tiny(out, device)
    opts = [f"--{section}.{k}={v}" for section in ("run", "model", "task", "sft", "rm", "ppo")
            for k, v in vars(getattr(cfg, section)).items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(TORCHRUN + [stage, *opts, *extra], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _same_metrics(one, two, stage: str) -> None:
    a, b = read_metrics(one / stage / "metrics.jsonl"), read_metrics(two / stage / "metrics.jsonl")
    assert len(a) == len(b) > 0, stage
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys(), (stage, ra["step"])
        for k in ra:
            if isinstance(ra[k], float) and math.isnan(ra[k]):
                assert math.isnan(rb[k]), (stage, ra["step"], k)
            else:  # ranks sum gradients in another order: float32 rounding, nothing more
                assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-5), (stage, ra["step"], k, ra[k], rb[k])


def test_ddp_two_gloo_processes_match_one(one_process, tmp_path, device):
    two = tmp_path / "two"
    _torchrun("demo", two, device)
    assert json.loads((two / "summary.json").read_text())["world_size"] == 2
    for stage in ("sft", "rm", "ppo"):
        _same_metrics(one_process, two, stage)


def test_fsdp2_two_gloo_processes_match_one(one_process, tmp_path, device):
    two = tmp_path / "two"
    _torchrun("demo", two, device, "--run.distributed=fsdp")
    for stage in ("sft", "rm", "ppo"):
        _same_metrics(one_process, two, stage)
