"""Load the csrc extension (`rlhf_fast._C`): prebuilt if setup.py built it, else JIT with ninja.

The JIT build compiles every csrc/*.cpp, plus csrc/*.cu when torch has CUDA and nvcc is found, into
a cache folder (RLHF_FAST_EXT_DIR, default ~/.cache/rlhf_fast/<torch version>/<source hash>) under a
file lock, so concurrent processes build once. Failures are remembered and reported by
`extension_info()`; ops asked for backend="cuda" raise with that message.
"""
from __future__ import annotations

import functools
import hashlib
import os
import shutil
from pathlib import Path

import torch

_NAME = "rlhf_fast_C"


def source_dir() -> Path:
    """csrc/ in a source checkout, or rlhf_fast/_csrc in an installed package."""
    here = Path(__file__).resolve().parent
    for cand in (here / "_csrc", here.parent / "csrc"):
        if (cand / "include").is_dir():
            return cand
    raise FileNotFoundError(f"csrc sources not found next to {here}")


def _sources(with_cuda: bool) -> list[Path]:
    src = source_dir()
    files = sorted(src.glob("*.cpp"))
    if with_cuda:
        files += sorted(src.glob("*.cu"))
    return files


def _want_cuda() -> tuple[bool, str]:
    if torch.version.cuda is None:
        return False, "torch is a CPU build"
    from torch.utils.cpp_extension import CUDA_HOME
    if CUDA_HOME is None:
        return False, "CUDA_HOME / nvcc not found"
    return True, ""


@functools.lru_cache(maxsize=None)
def load():
    """Return the extension module; raise RuntimeError with the reason when it can't be had."""
    try:
        from . import _C  # type: ignore[attr-defined]  # built ahead of time by setup.py
        return _C
    except ImportError:
        pass
    if os.environ.get("RLHF_FAST_NO_JIT") == "1":
        raise RuntimeError("the csrc extension was not built ahead of time and RLHF_FAST_NO_JIT=1")
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler ({cxx!r} not on PATH): cannot JIT-build the csrc extension")
    if importlib_missing("ninja"):
        raise RuntimeError("ninja is not installed (pip install ninja): cannot JIT-build the csrc extension")
    with_cuda, _ = _want_cuda()
    sources = _sources(with_cuda)
    if not sources:
        raise RuntimeError(f"no C++ sources in {source_dir()}")
    digest = hashlib.sha256()
    for f in sorted(source_dir().rglob("*")):
        if f.is_file() and f.suffix in (".cpp", ".cu", ".h", ".cuh"):
            digest.update(f.name.encode())
            digest.update(f.read_bytes())
    root = Path(os.environ.get("RLHF_FAST_EXT_DIR", Path.home() / ".cache" / "rlhf_fast"))
    build = root / f"torch{torch.__version__}{'-cuda' if with_cuda else ''}" / digest.hexdigest()[:16]
    build.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock
    from torch.utils.cpp_extension import load as jit_load
    cflags = ["-O3", "-std=c++17", "-fopenmp"]
    if with_cuda:
        cflags.append("-DRLHF_FAST_WITH_CUDA=1")
    with FileLock(str(build / "build.lock")):
        try:
            return jit_load(
                name=_NAME, sources=[str(s) for s in sources], build_directory=str(build),
                extra_include_paths=[str(source_dir() / "include")], extra_cflags=cflags,
                extra_cuda_cflags=["-O3", "-std=c++17", "-DRLHF_FAST_WITH_CUDA=1"],
                extra_ldflags=["-fopenmp"], with_cuda=with_cuda,
                verbose=os.environ.get("RLHF_FAST_VERBOSE_BUILD") == "1")
        except Exception as exc:
            raise RuntimeError(f"JIT build of the csrc extension failed in {build}: {exc}") from exc


def importlib_missing(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is None


@functools.lru_cache(maxsize=None)
def _load_error() -> str | None:
    try:
        load()
    except RuntimeError as exc:
        return str(exc)
    return None


def reason_unavailable(device: torch.device) -> str | None:
    """None when the extension can run on tensors of `device`, else why not."""
    err = _load_error()
    if err is not None:
        return err
    if device.type == "cuda" and not getattr(load(), "has_cuda", lambda: False)():
        return "the csrc extension was built without CUDA kernels (" + (_want_cuda()[1] or "see build log") + ")"
    if device.type not in ("cpu", "cuda"):
        return f"the csrc extension has no kernels for {device.type} tensors"
    return None
