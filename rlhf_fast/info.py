"""`extension_info()`: which backends can run here, and why not."""
from __future__ import annotations

import torch

from . import _backend, _extension


def extension_info() -> dict:
    """Report the backends available in this process.

    Returns a dict with keys ``torch``, ``cuda`` (device availability), ``triton`` and ``extension``
    (each ``{"available": bool, "detail": str}``: version or reason), ``interpret`` (TRITON_INTERPRET
    is on) and ``chosen`` (op -> what ``backend="auto"`` last resolved to, with the reason when it
    had to use the reference path).
    """
    t_ok, t_detail = _backend.triton_status()
    ext_err = _extension._load_error()
    cuda_ok = torch.cuda.is_available()
    return {
        "torch": torch.__version__,
        "cuda": {"available": cuda_ok,
                 "detail": torch.cuda.get_device_name() if cuda_ok else
                 ("torch is a CPU build" if torch.version.cuda is None else "no CUDA device visible")},
        "triton": {"available": t_ok, "detail": t_detail},
        "extension": {"available": ext_err is None,
                      "detail": ext_err or ("with CUDA kernels" if getattr(_extension.load(), "has_cuda", lambda: False)()
                                            else "C++ CPU kernels only")},
        "interpret": _backend.interpret_mode(),
        "chosen": _backend.chosen(),
    }
