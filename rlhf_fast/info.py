"""`extension_info()`: which backends can run here, and why not."""
from __future__ import annotations

import torch

from . import _backend, _extension


def extension_info() -> dict:
    """Report the backends available in this process.

    Never starts the csrc JIT build: before the first op that needs it, "extension" says whether a
    build is there to load, or where the first use will compile it.

    Returns a dict with keys ``torch``, ``cuda`` (device availability), ``triton`` and ``extension``
    (each ``{"available": bool, "detail": str}``: version or reason), ``interpret`` (TRITON_INTERPRET
    is on) and ``chosen`` (op -> what ``backend="auto"`` last resolved to, with the reason when it
    had to use the reference path).
    """
    t_ok, t_detail = _backend.triton_status()
    ext_ok, ext_detail = _extension.status()
    cuda_ok = torch.cuda.is_available()
    return {
        "torch": torch.__version__,
        "cuda": {"available": cuda_ok,
                 "detail": torch.cuda.get_device_name() if cuda_ok else
                 ("torch is a CPU build" if torch.version.cuda is None else "no CUDA device visible")},
        "triton": {"available": t_ok, "detail": t_detail},
        "extension": {"available": ext_ok, "detail": ext_detail},
        "interpret": _backend.interpret_mode(),
        "chosen": _backend.chosen(),
    }
