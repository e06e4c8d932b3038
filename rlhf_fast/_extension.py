"""Load the csrc extension (`rlhf_fast._C`): prebuilt if setup.py built it, else JIT with ninja.

The JIT build compiles every csrc/*.cpp, plus csrc/*.cu when torch has CUDA and nvcc is found, in a
cache folder keyed by everything that changes the binary: RLHF_FAST_EXT_DIR (default
~/.cache/rlhf_fast) / <hash of the sources, torch and CUDA versions, compiler, flags and arch list>.
The sources are copied into that folder and compiled from there, so a source checkout and an
installed copy of the same code share one build (and different code never shares one): neither
rebuilds the other. The build runs under a file lock (concurrent processes build once) and says on
stderr, once, what it builds and where. Failures are remembered and reported by `extension_info()`,
which never starts a build; ops asked for backend="cuda" raise with that message.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

import torch

_NAME = "rlhf_fast_C"
_SOURCE_SUFFIXES = (".cpp", ".cu", ".h", ".cuh")
_state: dict = {}  # after the first load(): "module" or "error"


def source_dir() -> Path:
    """csrc/ in a source checkout, or rlhf_fast/_csrc in an installed package."""
    here = Path(__file__).resolve().parent
    for cand in (here / "_csrc", here.parent / "csrc"):
        if (cand / "include").is_dir():
            return cand
    raise FileNotFoundError(f"csrc sources not found next to {here}")


def _want_cuda() -> tuple[bool, str]:
    if torch.version.cuda is None:
        return False, "torch is a CPU build"
    from torch.utils.cpp_extension import CUDA_HOME
    if CUDA_HOME is None:
        return False, "CUDA_HOME / nvcc not found"
    return True, ""


def build_flags(with_cuda: bool) -> dict:
    """The arguments of the JIT build that change the binary (part of the cache key)."""
    cflags = ["-O3", "-std=c++17", "-fopenmp"] + (["-DRLHF_FAST_WITH_CUDA=1"] if with_cuda else [])
    return {"with_cuda": with_cuda, "extra_cflags": cflags,
            "extra_cuda_cflags": ["-O3", "-std=c++17", "-DRLHF_FAST_WITH_CUDA=1"], "extra_ldflags": ["-fopenmp"]}


def source_digest(src: Path) -> str:
    """"h" + 16 hex digits of the source tree's files (relative paths and bytes). setup.py compiles it
    into the ahead-of-time build (RLHF_FAST_SOURCE_DIGEST) so that a stale build is recognised."""
    digest = hashlib.sha256()
    for f in sorted(p for p in src.rglob("*") if p.is_file() and p.suffix in _SOURCE_SUFFIXES):
        digest.update(f.relative_to(src).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return "h" + digest.hexdigest()[:16]


def cache_key(src: Path, flags: dict, torch_version: str | None = None) -> str:
    """Hash of the source tree's files (relative paths and bytes), the torch and CUDA versions, the
    compiler, the flags and TORCH_CUDA_ARCH_LIST: equal keys build equal binaries."""
    digest = hashlib.sha256(source_digest(src).encode())
    env = [torch_version or torch.__version__, str(torch.version.cuda), os.environ.get("CXX", "c++"),
           os.environ.get("TORCH_CUDA_ARCH_LIST", ""), repr(sorted(flags.items()))]
    digest.update("\0".join(env).encode())
    return digest.hexdigest()[:16]


def build_dir(with_cuda: bool | None = None) -> Path:
    """The cache folder of this source tree's build (computed, not created)."""
    with_cuda = _want_cuda()[0] if with_cuda is None else with_cuda
    root = Path(os.environ.get("RLHF_FAST_EXT_DIR", Path.home() / ".cache" / "rlhf_fast"))
    return root / cache_key(source_dir(), build_flags(with_cuda))


def _stage_sources(src: Path, dest: Path) -> None:
    """Copy the source tree into dest (only files whose bytes differ, so ninja sees no change)."""
    for f in src.rglob("*"):
        if f.is_file() and f.suffix in _SOURCE_SUFFIXES:
            out = dest / f.relative_to(src)
            if not out.is_file() or out.read_bytes() != f.read_bytes():
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, out)


def _prebuilt():
    """The extension setup.py built ahead of time, or None (also when it was built from other sources
    than the csrc/ next to the package: an editable install after a `git pull` holds a stale binary
    whose functions may take other arguments; the JIT build is used then, and that is said once)."""
    try:
        from . import _C  # type: ignore[attr-defined]
    except ImportError:
        return None
    built = getattr(_C, "source_digest", "")
    try:
        current = source_digest(source_dir())
    except FileNotFoundError:
        return _C
    if built == current:
        return _C
    if not _state.get("stale_said"):
        _state["stale_said"] = True
        print(f"rlhf_fast: ignoring the prebuilt csrc extension {Path(_C.__file__).name}: it was built from other "
              f"sources ({built or 'unrecorded'}) than {source_dir()} holds ({current}); rebuild with "
              "`pip install -e .`, a JIT build is used meanwhile", file=sys.stderr, flush=True)
    return None


def _jit_build():
    """JIT-build (or reuse) the extension in build_dir(); raise RuntimeError saying why it can't."""
    if os.environ.get("RLHF_FAST_NO_JIT") == "1":
        raise RuntimeError("the csrc extension was not built ahead of time and RLHF_FAST_NO_JIT=1")
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler ({cxx!r} not on PATH): cannot JIT-build the csrc extension")
    if importlib_missing("ninja"):
        raise RuntimeError("ninja is not installed (pip install ninja): cannot JIT-build the csrc extension")
    with_cuda, _ = _want_cuda()
    flags = build_flags(with_cuda)
    build = build_dir(with_cuda)
    src = build / "src"
    build.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock
    from torch.utils.cpp_extension import load as jit_load
    with FileLock(str(build / "build.lock")):
        _stage_sources(source_dir(), src)
        sources = sorted(src.glob("*.cpp")) + (sorted(src.glob("*.cu")) if with_cuda else [])
        if not sources:
            raise RuntimeError(f"no C++ sources in {source_dir()}")
        if not (build / f"{_NAME}.so").is_file():
            print(f"rlhf_fast: compiling the csrc extension ({'C++ and CUDA' if with_cuda else 'C++'}, "
                  f"first use only, ~20-60 s) in {build}", file=sys.stderr, flush=True)
        try:
            return jit_load(name=_NAME, sources=[str(s) for s in sources], build_directory=str(build),
                            extra_include_paths=[str(src / "include")],
                            verbose=os.environ.get("RLHF_FAST_VERBOSE_BUILD") == "1", **flags)
        except Exception as exc:
            raise RuntimeError(f"JIT build of the csrc extension failed in {build}: {exc}") from exc


def load():
    """Return the extension module; raise RuntimeError with the reason when it can't be had.

    The first call imports the prebuilt module or JIT-builds it; later calls return (or re-raise) that."""
    if "module" not in _state and "error" not in _state:
        try:
            _state["module"] = _prebuilt() or _jit_build()
        except RuntimeError as exc:
            _state["error"] = str(exc)
    if "error" in _state:
        raise RuntimeError(_state["error"])
    return _state["module"]


def importlib_missing(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is None


def _load_error() -> str | None:
    try:
        load()
    except RuntimeError as exc:
        return str(exc)
    return None


def status() -> tuple[bool, str]:
    """(available, detail) for extension_info(), without starting a build: what the first load() gave,
    else whether a prebuilt or cached JIT build is there to load."""
    if "module" in _state:
        return True, "with CUDA kernels" if getattr(_state["module"], "has_cuda", lambda: False)() \
            else "C++ CPU kernels only"
    if "error" in _state:
        return False, _state["error"]
    if _prebuilt() is not None:
        return True, "built ahead of time (not loaded yet)"
    try:
        build = build_dir()
    except FileNotFoundError as exc:
        return False, str(exc)
    if (build / f"{_NAME}.so").is_file():
        return True, f"JIT-built in {build} (not loaded yet)"
    return False, f"not built yet: compiles on first use (~20-60 s) in {build}"


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
