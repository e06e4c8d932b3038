"""run.report_to: tensorboard and wandb receive what metrics.jsonl holds, once per step, across a stop and
a resume (wandb is a fake module here: the contract is its init/log/finish calls)."""
import sys
import types

import pytest

from rlhf_fast.rlhf import pipeline
from rlhf_fast.rlhf.config import build_config
from rlhf_fast.rlhf.run_io import read_metrics

from .stop_after import Stop, stop_after
from .test_pipeline import tiny

SFT = {"sft.steps": 4, "sft.ckpt_every": 2}


def _stopped_and_resumed(out, device, report_to):
    with pytest.raises(Stop):
        pipeline.run_sft(tiny(out, device, **SFT, **{"run.report_to": report_to}), on_step=stop_after(3))
    pipeline.run_sft(tiny(out, device, **SFT, **{"run.report_to": report_to}), resume=True)
    return read_metrics(out / "sft" / "metrics.jsonl")


def test_tensorboard_holds_each_step_once_with_the_logged_values(tmp_path, device):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    rows = _stopped_and_resumed(tmp_path / "run", device, "tensorboard")
    events = EventAccumulator(str(tmp_path / "run" / "sft" / "tensorboard")).Reload()
    for key in ("loss", "grad_norm", "lr"):
        got = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in got] == [1, 2, 3, 4], key  # step 3 of the stopped run purged, logged again
        assert [v for _, v in got] == pytest.approx([r[key] for r in rows], rel=1e-6), key  # tensorboard: fp32


class FakeWandb(types.ModuleType):
    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged, self.finished = [], [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        run = types.SimpleNamespace(id=kwargs.get("id") or "run-1")
        run.log = lambda data, step: self.logged.append((step, data))
        run.finish = lambda: setattr(self, "finished", self.finished + 1)
        return run


def test_wandb_gets_every_step_once_and_resumes_its_run(tmp_path, device, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    rows = _stopped_and_resumed(tmp_path / "run", device, "wandb")
    assert [s for s, _ in fake.logged] == [1, 2, 3, 4]  # step 3 is not sent again after the resume
    for (step, data), row in zip(fake.logged, rows):
        assert data == {k: v for k, v in row.items() if k != "step"}, step
    first, second = fake.inits
    assert first["id"] is None and second["id"] == "run-1" and second["resume"] == "allow"
    assert "mode" not in first  # WANDB_MODE (offline) is wandb's own setting
    assert first["config"]["run"]["report_to"] == "wandb" and fake.finished == 1


def test_report_to_is_validated_and_a_missing_package_is_named(tmp_path, device, monkeypatch):
    with pytest.raises(ValueError, match="run.report_to must be '' or comma-separated names"):
        build_config(None, {"run.report_to": "tensorboard,mlflow"})
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(ValueError, match=r"needs the wandb package .*pip install 'rlhf_fast\[wandb\]'"):
        pipeline.run_sft(tiny(tmp_path / "x", device, **{"run.report_to": "wandb"}))
    assert not (tmp_path / "x").exists()
