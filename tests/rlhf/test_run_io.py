"""Run I/O: a failed write leaves the old file (or none) and no temp file; metrics resume; PNGs; RNG."""
import json
import os
import random
import struct

import numpy as np
import pytest
import torch

from rlhf_fast.rlhf import run_io
from rlhf_fast.rlhf.run_io import (
    MetricsLogger, atomic_torch_save, atomic_write_json, atomic_write_text, get_rng_state,
    plot_metrics, read_metrics, set_rng_state,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_atomic_torch_save_round_trip(tmp_path, device):
    obj = {"w": torch.randn(17, 3, device=device), "step": 5}
    path = atomic_torch_save(obj, tmp_path / "sub" / "ckpt.pt")
    loaded = torch.load(path, weights_only=True)
    assert loaded["step"] == 5
    torch.testing.assert_close(loaded["w"], obj["w"], atol=0, rtol=0)
    assert os.listdir(tmp_path / "sub") == ["ckpt.pt"]


def _torch_save_dies_midway(obj, f):
    f.write(b"PARTIAL CHECKPOINT")
    raise RuntimeError("killed mid-save")


@pytest.mark.parametrize("exists_before", [True, False])
def test_atomic_torch_save_failure_keeps_old_file(tmp_path, monkeypatch, exists_before):
    path = tmp_path / "ckpt.pt"
    if exists_before:
        atomic_torch_save({"step": 1}, path)
    monkeypatch.setattr(run_io.torch, "save", _torch_save_dies_midway)
    with pytest.raises(RuntimeError, match="killed mid-save"):
        atomic_torch_save({"step": 2}, path)
    monkeypatch.undo()
    if exists_before:
        assert torch.load(path, weights_only=True) == {"step": 1}
    assert os.listdir(tmp_path) == (["ckpt.pt"] if exists_before else [])


def test_atomic_write_text_failure_before_rename(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    atomic_write_text("old: 1\n", path)

    def fsync_fails(fd):
        raise OSError("disk full")

    monkeypatch.setattr(run_io.os, "fsync", fsync_fails)  # the new bytes are in the temp file by now
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text("new: 2\n" * 1000, path)
    monkeypatch.undo()
    assert path.read_text() == "old: 1\n"
    assert os.listdir(tmp_path) == ["config.yaml"]


def test_atomic_write_json(tmp_path):
    path = atomic_write_json({"score": torch.tensor(0.25), "n": np.int64(3), "dir": tmp_path}, tmp_path / "s.json")
    assert json.loads(path.read_text()) == {"score": 0.25, "n": 3, "dir": str(tmp_path)}
    with pytest.raises(TypeError, match="object"):
        atomic_write_json({"bad": object()}, path)
    assert json.loads(path.read_text())["n"] == 3
    assert os.listdir(tmp_path) == ["s.json"]


def test_metrics_logger_converts_and_flushes(tmp_path):
    path = tmp_path / "metrics.jsonl"
    logger = MetricsLogger(path)
    logger.log(np.int64(0), loss=torch.tensor(0.5), kl=np.float32(0.25), stage="ppo", done=False)
    # flushed at once: readable before close
    assert read_metrics(path) == [{"step": 0, "loss": 0.5, "kl": 0.25, "stage": "ppo", "done": False}]
    with pytest.raises(ValueError, match="'loss'"):
        logger.log(1, loss=torch.ones(2))
    with pytest.raises(ValueError, match="step"):
        logger.log(1.5, loss=1.0)
    logger.close()


def test_metrics_resume_truncates_later_steps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLogger(path) as logger:
        for step in range(6):
            logger.log(step, reward=float(step))
    with open(path, "a") as f:
        f.write('{"step": 6, "rew')  # torn line: killed mid-write
    with MetricsLogger(path, resume_step=2) as logger:  # the checkpoint was taken at step 2
        for step in range(3, 5):
            logger.log(step, reward=10.0 * step)
    records = read_metrics(path)
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    assert [r["reward"] for r in records] == [0.0, 1.0, 2.0, 30.0, 40.0]
    with MetricsLogger(path) as logger:  # no resume_step: plain append
        logger.log(5, reward=50.0)
    assert [r["step"] for r in read_metrics(path)] == [0, 1, 2, 3, 4, 5]
    with open(path, "a") as f:
        f.write('{"step": 6, "rew')
    with MetricsLogger(path) as logger:  # appending after a torn line must not glue onto it
        logger.log(6, reward=60.0)
    assert [r["step"] for r in read_metrics(path)] == [0, 1, 2, 3, 4, 5, 6]


def test_read_metrics_reports_corrupt_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\nnot json\n{"step": 1}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        read_metrics(path)


def test_plot_metrics_writes_valid_pngs(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLogger(path) as logger:
        for step in range(7):
            logger.log(step, reward=step * 0.5, **{"loss/policy": 1.0 / (step + 1)}, stage="ppo")
        logger.log(7, kl=0.1)
    paths = plot_metrics(path, tmp_path / "plots")
    assert sorted(p.name for p in paths) == ["kl.png", "loss_policy.png", "reward.png"]
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == PNG_SIGNATURE
        assert data[12:16] == b"IHDR"
        width, height = struct.unpack(">II", data[16:24])
        assert (width, height) == (600, 400)
    assert [p.name for p in plot_metrics(path, tmp_path / "plots", keys=["reward"])] == ["reward.png"]
    with pytest.raises(ValueError, match="entropy"):
        plot_metrics(path, tmp_path / "plots", keys=["entropy"])


def _draws(device):
    draws = [random.random(), float(np.random.rand()), torch.rand(3).tolist()]
    if device.type == "cuda":
        draws.append(torch.rand(3, device=device).tolist())
    return draws


def test_rng_state_round_trip_through_checkpoint(tmp_path, device):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    _draws(device)
    atomic_torch_save({"rng": get_rng_state()}, tmp_path / "ckpt.pt")
    expected = _draws(device)
    _draws(device)
    set_rng_state(torch.load(tmp_path / "ckpt.pt", map_location=device, weights_only=True)["rng"])
    assert _draws(device) == expected
    with pytest.raises(ValueError, match="'python'"):
        set_rng_state({"torch": torch.get_rng_state()})
