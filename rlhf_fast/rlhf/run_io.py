"""Run-directory I/O that survives a kill: atomic writes, a resumable metrics log, plots, RNG state.

A file written here is either the old version or the complete new one, never half of either: the
bytes go to a temporary file in the same directory, are flushed and fsynced, then ``os.replace``
swaps it in (atomic on POSIX and Windows within one filesystem).
"""
from __future__ import annotations

import io
import json
import operator
import os
import random
import re
import tempfile
from pathlib import Path

import torch

__all__ = [
    "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_torch_save",
    "remove_stale_temps", "MetricsLogger", "read_metrics", "plot_metrics", "get_rng_state", "set_rng_state",
]


def _fsync_dir(directory: Path) -> None:
    """Persist the rename itself; directories cannot be opened for fsync on Windows."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


TMP_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def remove_stale_temps(directory) -> list[Path]:
    """Delete the temp files ``.<name>.*.tmp`` that a kill during an atomic write left in `directory`
    (not recursive). Only for a directory no other process is writing to. Returns what was removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = [p for p in directory.glob(f".*{TMP_SUFFIX}") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def _atomic_write(path, write) -> Path:
    """Call ``write(binary_file)`` on a temp file next to ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        if hasattr(os, "fchmod"):  # mkstemp makes 0600; give the file the mode open() would give it
            os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(data: bytes, path) -> Path:
    """Write ``data`` to ``path`` atomically (parent directories are created)."""
    return _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(text: str, path, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically."""
    return atomic_write_bytes(text.encode(encoding), path)


def _to_jsonable(obj):
    """json.dumps ``default``: scalar tensors and numpy scalars become numbers, Paths strings."""
    if isinstance(obj, torch.Tensor):
        if obj.numel() != 1:
            raise ValueError(f"only scalar tensors can be written as JSON, got shape {tuple(obj.shape)}")
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return obj.item()
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serializable")


def atomic_write_json(obj, path, indent: int = 2) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically. Serialized first, so a bad object writes nothing."""
    text = json.dumps(obj, indent=indent, default=_to_jsonable) + "\n"
    return atomic_write_text(text, path)


def atomic_torch_save(obj, path) -> Path:
    """``torch.save(obj, path)``, atomically: a kill mid-save leaves the previous checkpoint intact."""
    return _atomic_write(path, lambda f: torch.save(obj, f))


def _metric_value(name: str, value):
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"metric {name!r} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        return value.item()
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    raise ValueError(f"metric {name!r} must be a number, string or scalar tensor, got {type(value).__name__}")


def _as_step(step) -> int:
    """Python, numpy and integer-tensor ints are accepted; bools and floats are not."""
    if not isinstance(step, bool):
        try:
            return operator.index(step)
        except TypeError:
            pass
    raise ValueError(f"step must be an int, got {step!r}")


def read_metrics(path) -> list[dict]:
    """Records of a metrics.jsonl file, in order. A torn last line (a kill mid-write) is skipped;
    any other unreadable line raises ValueError with the file and line number."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1 and not line.endswith("\n"):
                break
            raise ValueError(f"{path}:{i + 1}: not a JSON line ({e.msg})") from e
        if not isinstance(record, dict) or "step" not in record:
            raise ValueError(f"{path}:{i + 1}: expected a JSON object with a 'step' field")
        records.append(record)
    return records


class MetricsLogger:
    """Appends one JSON line ``{"step": step, **metrics}`` per ``log`` call to ``path``, flushed at once.

    ``resume_step=None`` appends to whatever the file holds (creating it). ``resume_step=N``, for a
    run resumed from the checkpoint of step N, first drops every line with step > N (logged after
    that checkpoint, and about to be logged again), rewriting the file atomically, so a resumed run's
    log matches an uninterrupted one. Either way a torn last line (a kill mid-write) is dropped
    first, so the next line never lands on its tail. Use it as a context manager or call ``close()``.
    Single-writer: in a distributed run only the main rank should open it.
    """

    def __init__(self, path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self.truncate_after(_as_step(resume_step))
        elif self.path.exists() and self.path.stat().st_size and not self.path.read_bytes().endswith(b"\n"):
            self._rewrite(read_metrics(self.path))
        self._file = open(self.path, "a", encoding="utf-8")

    def truncate_after(self, step: int) -> None:
        """Keep only the records with ``record["step"] <= step`` (also drops a torn last line)."""
        if not self.path.exists():
            return
        self._rewrite([r for r in read_metrics(self.path) if r["step"] <= step])

    def _rewrite(self, records: list[dict]) -> None:
        atomic_write_text("".join(json.dumps(r) + "\n" for r in records), self.path)

    def log(self, step: int, **metrics) -> dict:
        """Append ``{"step": step, **metrics}``; tensors and numpy scalars become Python numbers."""
        step = _as_step(step)
        if "step" in metrics:
            raise ValueError("metrics must not contain 'step': it is the first argument")
        record = {"step": step}
        record.update({k: _metric_value(k, v) for k, v in metrics.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        return record

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def plot_metrics(metrics_jsonl_path, out_dir, keys=None) -> list[Path]:
    """One PNG line plot per metric (value against step) from a metrics.jsonl file.

    keys: the metrics to plot; None plots every key with a numeric value (except ``step``). A
    requested key absent from every record raises ValueError. Files are ``out_dir/<key>.png``
    (characters outside ``[A-Za-z0-9_.-]`` become ``_``), written atomically. Needs matplotlib,
    imported here and used through the Agg canvas directly, so pyplot's global backend is untouched.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("plot_metrics needs matplotlib: pip install matplotlib") from e
    records = read_metrics(metrics_jsonl_path)

    def is_number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if keys is None:
        keys = sorted({k for r in records for k, v in r.items() if k != "step" and is_number(v)})
    else:
        keys = list(keys)
        present = {k for r in records for k in r}
        missing = [k for k in keys if k not in present]
        if missing:
            raise ValueError(f"keys {missing} are not in {metrics_jsonl_path} (it has {sorted(present)})")
    out_dir = Path(out_dir)
    paths = []
    for key in keys:
        points = [(r["step"], r[key]) for r in records if is_number(r.get(key))]
        fig = Figure(figsize=(6, 4), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.plot([s for s, _ in points], [v for _, v in points], marker="." if len(points) < 50 else None)
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        paths.append(atomic_write_bytes(buf.getvalue(), out_dir / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', key)}.png"))
    return paths


def get_rng_state() -> dict:
    """RNG states of Python ``random``, numpy's global generator, torch CPU and (when available)
    every CUDA device. Holds only Python values and tensors, so ``torch.load(weights_only=True)``
    reads it back."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np
    except ImportError:
        np = None
    if np is not None:
        np_state = np.random.get_state(legacy=True)
        state["numpy"] = {"bit_generator": np_state[0], "key": torch.from_numpy(np_state[1].astype("int64")),
                          "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                          "cached_gaussian": float(np_state[4])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``get_rng_state`` returned (its tensors may have been loaded to any device).
    CUDA states are restored only when CUDA is available (a GPU checkpoint resumed on CPU has no
    CUDA generator to set), for the first ``torch.cuda.device_count()`` devices; a numpy state
    needs numpy."""
    for key in ("python", "torch"):
        if key not in state:
            raise ValueError(f"state must have a {key!r} entry (from get_rng_state), got keys {sorted(state)}")
    python_state = state["python"]
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    torch.set_rng_state(state["torch"].cpu())
    if "numpy" in state:
        import numpy as np
        s = state["numpy"]
        np.random.set_state((s["bit_generator"], s["key"].cpu().numpy().astype("uint32"), s["pos"],
                             s["has_gauss"], s["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        # a checkpoint from a machine with more GPUs restores the devices this one has
        for index, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu(), index)
