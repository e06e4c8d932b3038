"""Choose a kernel's launch config among its tuning set by timing them on the GPU at hand, once per machine.

Every Triton launcher asks `choose(kernel, regime, candidates, run, device)`. `candidates` is the kernel
module's tuning set for the call's (arch, dtype class, head-dim or vocab regime), table pick first (the
spill-free config of the static check, also the fallback); `run(cfg)` is one whole launch with `cfg` on the
call's own tensors, repeatable (a kernel that accumulates, like attention's atomic dQ, has its buffer
zeroed inside `run`); the launcher calls `run(choose(...))`, so its outputs are always the winner's.

1. The table pick is returned without timing where tuning is off: CPU tensors (Triton's interpreter),
   `RLHF_FAST_AUTOTUNE=0`, a one-config set.
2. A winner found earlier in the process is returned from memory.
3. Else the cache file `<dir>/<kernel>-<hash>.json` is read (dir: `RLHF_FAST_AUTOTUNE_DIR`, default
   ~/.cache/rlhf_fast/autotune). Its key holds the GPU name, driver, CUDA, Triton, torch and rlhf_fast
   versions, the kernel, the regime and the candidate list, so an upgrade or a new tuning set retunes.
   A file that does not parse, or whose winner is not a candidate, is ignored with a warning.
4. Else, while a host sync is forbidden (CUDA-graph capture, torch.compile tracing) or once this process
   has spent its tuning budget (`RLHF_FAST_AUTOTUNE_BUDGET_S`, default 120 s, compiles included), the
   table pick is returned (and not remembered). Otherwise each candidate is timed
   (`triton.testing.do_bench`, median of a short run), the table pick first; a candidate Triton cannot
   launch (out of shared memory or registers) is skipped. The fastest is written atomically (temporary
   file, then os.replace: a reader never sees half a file; two processes tuning at once both write a
   valid winner) and one line reports the time spent.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch

from ._launch import host_sync_forbidden

ENV_ENABLE = "RLHF_FAST_AUTOTUNE"
ENV_DIR = "RLHF_FAST_AUTOTUNE_DIR"
ENV_BUDGET = "RLHF_FAST_AUTOTUNE_BUDGET_S"
DEFAULT_BUDGET_S = 120.0
# do_bench's warm-up and measuring windows (ms): a few launches of a kernel that takes 0.05-5 ms.
WARMUP_MS = 5
REP_MS = 20

_winners: dict[str, tuple] = {}   # cache file name -> winning config (this process)
_spent_s = 0.0                    # tuning time spent by this process


def switched_on() -> bool:
    """RLHF_FAST_AUTOTUNE: 1 (default) times tuning sets, 0 launches the table picks."""
    value = os.environ.get(ENV_ENABLE, "1")
    if value not in ("0", "1"):
        raise ValueError(f"{ENV_ENABLE} must be 0 or 1 when set, got {value!r}")
    return value == "1"


def on_gpu(device: torch.device) -> bool:
    """Tensors a kernel really runs on (not Triton's CPU interpreter, where timings mean nothing)."""
    return device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1"


def cache_dir() -> Path:
    return Path(os.environ.get(ENV_DIR) or Path.home() / ".cache" / "rlhf_fast" / "autotune")


def budget_s() -> float:
    value = os.environ.get(ENV_BUDGET, str(DEFAULT_BUDGET_S))
    try:
        budget = float(value)
    except ValueError:
        budget = -1.0
    if not budget >= 0:
        raise ValueError(f"{ENV_BUDGET} must be a number of seconds >= 0, got {value!r}")
    return budget


@functools.lru_cache(maxsize=None)
def environment(device_index: int) -> dict:
    """What a timing depends on besides the kernel and its shapes: GPU, driver and software versions."""
    import triton

    import rlhf_fast

    return {"gpu": torch.cuda.get_device_name(device_index), "driver": _driver_version(),
            "cuda": torch.version.cuda, "triton": triton.__version__, "torch": torch.__version__,
            "rlhf_fast": rlhf_fast.__version__}


def _driver_version() -> str:
    get = getattr(torch._C, "_cuda_getDriverVersion", None)
    if get is not None:
        return str(get())
    try:
        return Path("/proc/driver/nvidia/version").read_text().splitlines()[0].strip()
    except (OSError, IndexError):
        return "unknown"


def plain(cfg) -> list:
    """A config as JSON holds it (nested lists): configs may be tuples of tuples (a reduce kernel's
    per-pass tiles)."""
    return json.loads(json.dumps(cfg))


def cache_key(env: dict, kernel: str, regime: str, candidates: Sequence[tuple]) -> dict:
    return {**env, "kernel": kernel, "regime": regime, "candidates": [plain(c) for c in candidates]}


def cache_path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir() / f"{key['kernel']}-{digest}.json"


def read_winner(path: Path, key: dict, candidates: Sequence[tuple]) -> tuple | None:
    """The cached winner for `key`, or None when there is no usable file (a bad one is warned about)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        warnings.warn(f"rlhf_fast autotune: cannot read {path} ({exc}); tuning again", RuntimeWarning, 2)
        return None
    try:
        data = json.loads(text)
        if data["key"] != key:
            raise ValueError("its key is not this call's (hash collision or edited file)")
        winner = data["winner"]
        if winner not in [plain(c) for c in candidates]:
            raise ValueError(f"winner {winner} is not a candidate")
    except (ValueError, KeyError, TypeError) as exc:
        warnings.warn(f"rlhf_fast autotune: ignoring cache file {path}: {exc}", RuntimeWarning, 2)
        return None
    return next(c for c in candidates if plain(c) == winner)


def write_winner(path: Path, key: dict, winner: tuple, timings: dict) -> None:
    """Write atomically: a temporary file in the same directory, then os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = json.dumps({"key": key, "winner": plain(winner), "timings_ms": timings}, indent=1, sort_keys=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(body)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def do_bench_ms(fn: Callable[[], None]) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=WARMUP_MS, rep=REP_MS))


def _launch_failure_types() -> tuple:
    """Errors that mean "this config cannot launch here" (not a bug): Triton's resource errors."""
    from triton.runtime.errors import OutOfResources

    return (OutOfResources,)


def choose(kernel: str, regime: str, candidates: Sequence[tuple], run: Callable[[tuple], None],
           device: torch.device, *, timer: Callable[[Callable[[], None]], float] | None = None,
           env: dict | None = None) -> tuple:
    """The config to launch `kernel` with (see the module docstring). `timer(fn) -> ms` and `env` replace
    do_bench and the GPU/version description (tests use them to run on CPU)."""
    global _spent_s
    if not candidates:
        raise ValueError(f"{kernel}: empty tuning set for {regime}")
    table_pick = candidates[0]
    if len(candidates) == 1 or not switched_on() or not (env is not None or on_gpu(device)):
        return table_pick
    if env is None:
        env = environment(device.index if device.index is not None else torch.cuda.current_device())
    key = cache_key(env, kernel, regime, candidates)
    path = cache_path(key)
    name = str(path)
    if name in _winners:
        return _winners[name]
    winner = read_winner(path, key, candidates)
    if winner is None:
        if host_sync_forbidden() or _spent_s >= budget_s():
            return table_pick  # not remembered: a later call (after capture) may still tune
        t0 = time.perf_counter()
        # do_bench times on the current device: make it the tensors' (a model on cuda:1)
        with torch.cuda.device(device) if on_gpu(device) and torch.cuda.is_available() else contextlib.nullcontext():
            winner, timings = _time_all(kernel, candidates, run, timer or do_bench_ms)
        dt = time.perf_counter() - t0
        _spent_s += dt
        write_winner(path, key, winner, timings)
        print(f"rlhf_fast autotune: {kernel} [{regime}]: {len(timings)} configs in {dt:.2f} s, winner "
              f"{plain(winner)} ({timings[label(winner)]:.4f} ms); cached in {path}", file=sys.stderr)
    _winners[name] = winner
    return winner


def label(cfg: tuple) -> str:
    return json.dumps(plain(cfg))[1:-1].replace(" ", "")


def _time_all(kernel: str, candidates: Sequence[tuple], run, timer) -> tuple[tuple, dict]:
    failures = _launch_failure_types()
    timings = {}
    for cfg in candidates:
        try:
            timings[label(cfg)] = timer(lambda cfg=cfg: run(cfg))
        except failures as exc:
            if cfg is candidates[0]:
                raise  # the table pick is checked by CI: failing to launch it is a bug, not a tuning result
            print(f"rlhf_fast autotune: {kernel}: skipping {plain(cfg)}: {exc}", file=sys.stderr)
    winner = min((c for c in candidates if label(c) in timings), key=lambda c: timings[label(c)])
    return winner, timings


def seqlen_bucket(n: int) -> int:
    """Size class a tuning result is kept for (sequence length, rows): the next power of two, 128 to 16384."""
    return min(max(128, 1 << max(0, n - 1).bit_length()), 16384)


def row_config(kernel: str, k, logits: torch.Tensor, run: Callable) -> tuple:
    """The config of a one-program-per-row kernel (kernels.token_logprobs, kl_divergence): the winner of
    k.tuning_set(V) for this (dtype, V, rows class); the table pick where nothing is timed."""
    n, vocab = logits.shape
    regime = f"{str(logits.dtype).removeprefix('torch.')},V={vocab},N<={seqlen_bucket(n)}"
    return choose(kernel, regime, k.tuning_set(vocab), run, logits.device)


def reset() -> None:
    """Forget this process's winners and spent time (tests)."""
    global _spent_s
    _winners.clear()
    _spent_s = 0.0
