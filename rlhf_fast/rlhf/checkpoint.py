"""Stage checkpoints as one safetensors file: loading a run never unpickles anything.

Every tensor of the state (model weights, optimizer moments, RNG states) is a safetensors entry, named by
its path in the state (``policy/weights/lm_head.weight``); the rest of the state (steps, the optimizer's
hyperparameters, the Python RNG state, the model config) is JSON in the file's ``__metadata__``, with each
tensor replaced by a reference to its entry. One file, written atomically (``run_io``), so a kill during a
write leaves the previous checkpoint.

Checkpoints of rlhf_fast before this format (``checkpoint.pt``, a pickle) are read with
``torch.load(weights_only=True)``, which only rebuilds tensors and plain Python values; one that needs more
is refused, saying why.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from .run_io import atomic_write_bytes

FORMAT = "rlhf_fast.checkpoint/2"
NAME = "checkpoint.safetensors"
LEGACY_NAME = "checkpoint.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: missing, truncated, corrupt or of an unsafe older format."""


def _encode(obj, path: str, tensors: dict, seen: set):
    """`obj` as JSON-able data, its tensors moved into `tensors` under their path."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        t = t.cpu().contiguous()
        if t.untyped_storage().data_ptr() in seen and t.numel():  # safetensors refuses shared storage
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        tensors[path] = t
        return {"__tensor__": path}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, f"{path}/{k}", tensors, seen) for k, v in obj.items()}
        return {"__items__": [[k, _encode(v, f"{path}/{k}", tensors, seen)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{path}/{i}", tensors, seen) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{path}/{i}", tensors, seen) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return obj.item()
    raise TypeError(f"checkpoint state at {path!r}: cannot store a {type(obj).__name__}")


def _decode(obj, tensors: dict):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {k: _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def save(state: dict, path) -> Path:
    """Write `state` (nested dicts, lists, tuples of tensors and plain values) to `path` atomically."""
    from safetensors.torch import save as to_bytes
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(state, "", tensors, set())
    data = to_bytes(tensors, metadata={"format": FORMAT, "state": json.dumps(skeleton)})
    return atomic_write_bytes(data, path)


def _header(data: bytes, path: Path) -> dict:
    if len(data) < 8:
        raise CheckpointError(f"checkpoint {str(path)!r} is truncated ({len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if 8 + n > len(data):
        raise CheckpointError(f"checkpoint {str(path)!r} is truncated ({len(data)} bytes, header says more)")
    try:
        return json.loads(data[8:8 + n])
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt (unreadable header)") from None


def read_meta(path) -> dict:
    """The checkpoint's state without its tensors (cheap: reads the header only), or CheckpointError."""
    path = Path(path)
    if path.suffix == ".pt":
        return load(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        data = head + f.read(n)
    header = _header(data, path)
    size = 8 + n + max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if path.stat().st_size != size:
        raise CheckpointError(f"checkpoint {str(path)!r} is truncated or corrupt ({path.stat().st_size} bytes, "
                              f"its header describes {size}); no earlier checkpoint is kept: start the stage "
                              "again with --overwrite, or into a new --out")
    meta = header.get("__metadata__") or {}
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not an rlhf_fast checkpoint (format {meta.get('format')!r})")
    return _decode(json.loads(meta["state"]), _AnyTensor())


class _AnyTensor(dict):
    def __missing__(self, key):
        return None


def load(path) -> dict:
    """The state saved by `save` (tensors on CPU). A missing, truncated or corrupt file, or an older pickle
    checkpoint that holds more than tensors and plain values, raises CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".pt":
        return _load_legacy(path)
    from safetensors.torch import load as from_bytes
    data = path.read_bytes()
    header = _header(data, path)
    meta = header.get("__metadata__") or {}
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not an rlhf_fast checkpoint (format {meta.get('format')!r})")
    try:
        tensors = from_bytes(data)
        skeleton = json.loads(meta["state"])
    except Exception as exc:  # safetensors raises its own error type for any malformed file
        raise CheckpointError(f"checkpoint {str(path)!r} is truncated or corrupt ({exc}); no earlier checkpoint "
                              "is kept: start the stage again with --overwrite, or into a new --out") from None
    return _decode(skeleton, tensors)


def _load_legacy(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {str(path)!r} cannot be read safely: it is an older rlhf_fast pickle that "
            f"torch.load(weights_only=True) refuses or cannot parse ({str(exc).splitlines()[0]}); "
            "start the stage again (--overwrite) or into a new --out") from None


def stage_checkpoint(stage_dir) -> Path:
    """The checkpoint of a stage folder: the safetensors file, or an older run's checkpoint.pt when only
    that exists (it is still read, with weights_only=True)."""
    stage_dir = Path(stage_dir)
    path = stage_dir / NAME
    legacy = stage_dir / LEGACY_NAME
    return legacy if legacy.is_file() and not path.exists() else path
