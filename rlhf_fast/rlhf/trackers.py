"""Experiment trackers (``run.report_to=tensorboard,wandb``): every record a stage logs to metrics.jsonl
goes to them too. metrics.jsonl stays the source of truth; a tracker is a copy that follows a resume:

- tensorboard writes ``<stage>/tensorboard/`` with ``purge_step`` = the checkpoint's step + 1, so the
  events logged after that checkpoint by the killed run are dropped when the resumed run logs again;
- wandb resumes its own run (its id kept in ``<stage>/wandb_run.json`` with the last step it received)
  and is not sent a step again: a resumed run recomputes those steps exactly (the CPU guarantee), and
  wandb's steps only go forward. wandb's own settings apply (WANDB_MODE=offline, WANDB_PROJECT, ...).

Both are optional extras: ``pip install 'rlhf_fast[tensorboard]'`` / ``'rlhf_fast[wandb]'``.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

KINDS = ("tensorboard", "wandb")


def parse_report_to(value: str) -> list[str]:
    """The tracker names of run.report_to ('' = none), or ValueError naming the field."""
    names = [n.strip() for n in value.split(",")] if value.strip() else []
    if any(n not in KINDS for n in names) or len(set(names)) < len(names):
        raise ValueError(f"run.report_to must be '' or comma-separated names from {list(KINDS)}, got {value!r}")
    return names


def check_installed(value: str) -> None:
    """ValueError saying what to install when a tracker of run.report_to cannot be imported."""
    for name in parse_report_to(value):
        module = "torch.utils.tensorboard" if name == "tensorboard" else "wandb"
        try:
            __import__(module)
        except ImportError as exc:
            raise ValueError(f"run.report_to={value!r} needs the {name} package ({exc}): "
                             f"pip install 'rlhf_fast[{name}]'") from None


def _scalars(record: dict) -> dict:
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class TensorBoard:
    def __init__(self, stage_dir: Path, start: int):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=str(stage_dir / "tensorboard"), purge_step=start + 1 if start else None)

    def log(self, step: int, record: dict) -> None:
        for k, v in _scalars(record).items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, stage_dir: Path, stage: str, config: dict, start: int):
        import wandb
        self.state_path = stage_dir / "wandb_run.json"
        state = json.loads(self.state_path.read_text()) if start and self.state_path.is_file() else {}
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "rlhf_fast"), dir=str(stage_dir),
                              name=f"{Path(config['run']['out']).name}/{stage}", config=config,
                              id=state.get("id"), resume="allow" if state.get("id") else None)
        self.last = state.get("last_step", -1)
        self._save()

    def _save(self) -> None:
        from .run_io import atomic_write_json
        atomic_write_json({"id": self.run.id, "last_step": self.last}, self.state_path)

    def log(self, step: int, record: dict) -> None:
        if step <= self.last:  # already sent before the kill, recomputed identically
            return
        self.run.log(_scalars(record), step=step)
        self.last = step
        self._save()

    def close(self) -> None:
        self.run.finish()


def open_trackers(report_to: str, stage_dir: Path, stage: str, config: dict, start: int) -> list:
    """The trackers of run.report_to for a stage starting (or resumed) at step `start`."""
    out = []
    for name in parse_report_to(report_to):
        out.append(TensorBoard(stage_dir, start) if name == "tensorboard" else WandB(stage_dir, stage, config, start))
    return out
