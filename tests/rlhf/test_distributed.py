"""`torchrun` with 2 gloo processes on localhost gives the metrics of 1 process with the same global batch,
and an FSDP2 run stopped mid-stage resumes to the metrics of an uninterrupted one."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import rlhf_fast
from rlhf_fast.rlhf import checkpoint, pipeline
from rlhf_fast.rlhf.run_io import read_metrics

from .stop_after import Stop, stop_after
from .test_pipeline import tiny

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
CLI = ["-m", "rlhf_fast"]
STOP_AFTER = [str(Path(__file__).with_name("stop_after.py"))]  # + the step: see stop_after.py
FSDP = "--run.distributed=fsdp"


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, device):
    """The tiny demo in this process (1 rank): the reference the 2-rank runs must reproduce."""
    if device.type != "cpu":
        pytest.skip("the gloo equivalence tests run on CPU")
    out = tmp_path_factory.mktemp("one")
    pipeline.run_demo(tiny(out, device))
    return out


def _torchrun(entry: list[str], stage: str, out, device, *extra: str) -> None:
    cfg = tiny(out, device)
    opts = [f"--{section}.{k}={v}" for section in ("run", "model", "task", "sft", "rm", "ppo")
            for k, v in vars(getattr(cfg, section)).items()]
    root = str(Path(rlhf_fast.__file__).parents[1])  # a script entry has its own folder on sys.path, not ours
    path = [root, os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [root]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(path)}
    proc = subprocess.run(TORCHRUN + entry + [stage, *opts, *extra], capture_output=True, text=True, timeout=600,
                          env=env)
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
    _torchrun(CLI, "demo", two, device)
    assert json.loads((two / "summary.json").read_text())["world_size"] == 2
    for stage in ("sft", "rm", "ppo"):
        _same_metrics(one_process, two, stage)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, device):
    """The tiny demo under FSDP2 on 2 gloo processes, uninterrupted."""
    if device.type != "cpu":
        pytest.skip("the gloo equivalence tests run on CPU")
    out = tmp_path_factory.mktemp("fsdp")
    _torchrun(CLI, "demo", out, device, FSDP)
    return out


def test_fsdp2_two_gloo_processes_match_one(one_process, fsdp_run):
    for stage in ("sft", "rm", "ppo"):
        _same_metrics(one_process, fsdp_run, stage)


def test_fsdp2_run_stopped_mid_ppo_resumes_to_the_same_metrics(fsdp_run, tmp_path, device):
    """Stopped after PPO step 3 (last checkpoint: step 2), then resumed under FSDP2: the metrics of the
    uninterrupted FSDP2 run, to the bit. The same checkpoint resumed in one process: to float32 rounding."""
    stopped, one = tmp_path / "stopped", tmp_path / "one"
    shutil.copytree(fsdp_run, stopped, ignore=shutil.ignore_patterns("ppo"))
    _torchrun(STOP_AFTER + ["3"], "ppo", stopped, device, FSDP)
    ckpt = checkpoint.load(stopped / "ppo" / checkpoint.NAME)
    assert ckpt["step"] == 2 and all(ckpt["optimizers"][m]["state"] for m in ("policy", "value"))
    shutil.copytree(stopped, one)
    _torchrun(CLI, "ppo", stopped, device, FSDP, f"--resume={stopped}")
    assert read_metrics(stopped / "ppo" / "metrics.jsonl") == read_metrics(fsdp_run / "ppo" / "metrics.jsonl")
    pipeline.run_ppo(tiny(one, device), resume=True)
    _same_metrics(fsdp_run, one, "ppo")


@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_one_process_run_stopped_mid_ppo_resumes_on_two_ranks(fsdp_run, tmp_path, device, mode):
    """The other way round: a checkpoint of one process, resumed on 2 ranks (to float32 rounding)."""
    out = tmp_path / "one"
    shutil.copytree(fsdp_run, out, ignore=shutil.ignore_patterns("ppo"))
    with pytest.raises(Stop):
        pipeline.run_ppo(tiny(out, device), on_step=stop_after(3))
    _torchrun(CLI, "ppo", out, device, f"--run.distributed={mode}", f"--resume={out}")
    _same_metrics(fsdp_run, out, "ppo")
