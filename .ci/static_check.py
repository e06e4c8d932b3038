#!/usr/bin/env python
"""Static GPU build check (CI layer 2): compile every Triton kernel config for sm_90 and sm_80, no GPU needed.

Every module kernels/<name>.py (imported as rlhf_fast.kernels.<name>; modules whose name starts with
"_" are helpers and skipped) exposes `static_configs()`, the list of kernels._spec.KernelSpec its
launcher picks from. For each spec and each arch in spec.archs this script compiles the kernel with
Triton's ahead-of-time API (triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))), reads
registers and spill stores/loads from the log of the ptxas -v that Triton runs (TRITON_DUMP_PTXAS_LOG)
and the dynamic shared memory from the compiled metadata. It fails on a compile error, a spill that
--known-spills does not accept (.ci/known_spills.json: Triton version, spec name, arch, the most bytes
accepted and the reason; a tuning set's public config may spill a little, since it is timed and launched
only if it wins), shared memory over what one block may use on the arch, PTX lacking an instruction the spec names in
`ptx_contains` (e.g. TMA's cp.async.bulk.tensor: a config meant to use a hardware feature must get it),
or an argument named in `int64_args` (the attention kernels' strides) used in the TTIR other than by
`arith.extsi ... : i32 to i64`: offsets built from it in 32 bits wrap past 2^31 elements.

Pointer arguments are compiled as 16-byte aligned (tt.divisibility=16), which is what Triton's
launcher specializes them to for torch tensors at run time; it changes the code (cp.async/TMA
pipelining) and so the shared memory. A spec opts a pointer out with attrs={"arg": ""}; attrs may
also give other arguments a Triton specialization string ({"stride": "D"}) or raw ASTSource attrs
keyed by (index,).

Usage:
  python .ci/static_check.py [--module NAME ...] [--file PATH ...] [--match TEXT ...] [--arch 90 ...] [--jobs N]
Exit status: 0 all configs pass, 1 some config fails, 2 nothing to check or a module is broken.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import inspect
import io
import json
import multiprocessing
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

# @triton.jit must build compilable JITFunctions, not interpreter ones (the pytest layer sets this).
os.environ.pop("TRITON_INTERPRET", None)
# Fusion on is what launchers get by default on Triton 3.6 and 3.9; set it so 3.9 does not warn.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
# Registers and spills come from the ptxas -v that Triton itself runs (its exact flags): Triton prints
# that log when asked, and compiles every time so the log is never skipped by a cache hit.
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
os.environ["TRITON_ALWAYS_COMPILE"] = "1"

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Max shared memory one block may opt in to (CUDA programming guide, compute capabilities table).
SHARED_LIMIT = {80: 166912, 90: 232448}  # sm_80: 163 KiB, sm_90: 227 KiB


@dataclasses.dataclass
class Result:
    source: str
    name: str
    config: str
    arch: int
    regs: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    shared: int | None = None
    error: str | None = None
    missing_ptx: tuple = ()
    narrow_args: tuple = ()
    seconds: float = 0.0

    def problems(self) -> list[str]:
        if self.error is not None:
            lines = [line.strip() for line in self.error.splitlines() if line.strip()]
            return [f"{lines[0].split(':')[0]}: {lines[-1]}"[:120]]
        out = []
        if self.spill_stores or self.spill_loads:
            out.append(f"spills {self.spill_stores} B stores / {self.spill_loads} B loads")
        if self.shared is not None and self.shared > SHARED_LIMIT[self.arch]:
            out.append(f"shared memory {self.shared} B > sm_{self.arch} limit {SHARED_LIMIT[self.arch]} B")
        if self.missing_ptx:
            out.append(f"PTX lacks {', '.join(self.missing_ptx)}")
        if self.narrow_args:
            out.append(f"32-bit use of {', '.join(self.narrow_args)}")
        return out


# ---------------------------------------------------------------------------------------------
# Loading kernel modules (in the main process and again in each worker: specs hold JITFunctions,
# which do not pickle, so workers receive (source, index, arch) and rebuild the spec).

_loaded: dict[str, object] = {}


def discover(names: list[str]) -> list[str]:
    """Sources ("mod:rlhf_fast.kernels.x") for kernels/*.py, optionally filtered by module name."""
    found = sorted(p.stem for p in (REPO / "kernels").glob("*.py") if not p.stem.startswith("_"))
    if not names:
        return [f"mod:rlhf_fast.kernels.{m}" for m in found]
    out = []
    for name in names:
        stem = Path(name).stem if name.endswith(".py") else name.rsplit(".", 1)[-1]
        if stem not in found:
            raise SystemExit(f"--module {name!r}: no kernels/{stem}.py (have: {', '.join(found) or 'none'})")
        out.append(f"mod:rlhf_fast.kernels.{stem}")
    return out


def load_module(source: str):
    if source not in _loaded:
        kind, _, target = source.partition(":")
        if kind == "mod":
            module = importlib.import_module(target)
        else:
            path = Path(target)
            if str(path.parent) not in sys.path:  # like a script: its folder's modules import
                sys.path.insert(0, str(path.parent))
            spec = importlib.util.spec_from_file_location(f"_static_check_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
        _loaded[source] = module
    return _loaded[source]


def load_specs(source: str) -> list:
    module = load_module(source)
    if not hasattr(module, "static_configs"):
        raise RuntimeError(f"{source}: kernel module has no static_configs()")
    specs = list(module.static_configs())
    if not specs:
        raise RuntimeError(f"{source}: static_configs() returned no KernelSpec")
    for spec in specs:
        bad = set(spec.archs) - set(SHARED_LIMIT)
        if bad:
            raise RuntimeError(f"{source}: {spec.name}: archs {sorted(bad)} not in {sorted(SHARED_LIMIT)}")
    return specs


def config_str(spec) -> str:
    parts = [f"{k}={v}" for k, v in spec.constexprs.items()]
    extra = [] if spec.maxnreg is None else [f"maxnreg={spec.maxnreg}"]
    return ",".join(parts + [f"warps={spec.num_warps}", f"stages={spec.num_stages}"] + extra)


# ---------------------------------------------------------------------------------------------
# Compiling one spec for one arch.

def _ast_source(spec):
    from triton.backends.compiler import BaseBackend
    from triton.compiler import ASTSource

    if "constexprs" not in inspect.signature(ASTSource.__init__).parameters:
        import triton
        raise RuntimeError(f"Triton {triton.__version__}: ASTSource has no `constexprs` argument "
                           "(this check supports the Triton >= 3.2 convention, used by 3.6 and 3.9)")
    arg_names = spec.fn.arg_names
    by_name = {n: "D" for n, ty in spec.signature.items() if str(ty).startswith("*")}
    raw = {}
    for key, value in spec.attrs.items():
        if isinstance(key, tuple):
            raw[key] = value
        else:
            by_name[key] = value
    attrs = {}
    for name, value in by_name.items():
        if name not in arg_names:
            raise RuntimeError(f"attrs names {name!r}, not an argument of {spec.fn.__name__}")
        parsed = BaseBackend.parse_attr(value) if isinstance(value, str) else value
        if parsed:
            attrs[(arg_names.index(name),)] = parsed
    attrs.update(raw)
    return ASTSource(spec.fn, dict(spec.signature), dict(spec.constexprs), attrs)


def _parse_ptxas(log: str) -> tuple[int, int, int]:
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spills is None:
        raise RuntimeError(f"could not read registers/spills from ptxas -v output:\n{log}")
    return int(regs.group(1)), int(spills.group(1)), int(spills.group(2))


def _options(spec) -> dict:
    """Compile options as the launcher passes them (maxnreg only where the spec sets one)."""
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    if spec.maxnreg is not None:
        options["maxnreg"] = spec.maxnreg
    return options


def _ttir_params(ttir: str, spec) -> dict:
    """Argument name -> SSA name of its parameter in the kernel's TTIR signature. Triton 3.9 names each
    parameter after its argument and tags it loc("name"); a tensor descriptor argument expands into
    several parameters (K, K.shape.0, ..., K.stride.3). Without loc names, parameters are matched to the
    runtime (non-constexpr) arguments in order, which holds only where none expanded."""
    head = re.search(r"tt\.func public @" + re.escape(spec.fn.__name__) + r"\((.*?)\)\s*attributes", ttir, re.S)
    if head is None:
        raise RuntimeError(f"no tt.func @{spec.fn.__name__} in the TTIR")
    params = list(re.finditer(r"(%[\w.$-]+)\s*:", head.group(1)))
    ends = [m.start() for m in params[1:]] + [len(head.group(1))]
    named = {}
    for m, end in zip(params, ends):
        loc = re.search(r'loc\("([^"]+)"', head.group(1)[m.end():end])
        if loc is not None:
            named[loc.group(1)] = m.group(1)
    if named:
        return named
    runtime = [n for n in spec.fn.arg_names if spec.signature.get(n) != "constexpr" and n not in spec.constexprs]
    if len(runtime) != len(params):
        raise RuntimeError(f"{spec.name}: TTIR has {len(params)} parameters for {len(runtime)} runtime arguments "
                           "and no loc names: cannot tell which is which")
    return {name: m.group(1) for name, m in zip(runtime, params)}


def narrow_uses(ttir: str, spec) -> tuple:
    """Names in spec.int64_args whose TTIR value has a use other than `arith.extsi %x : i32 to i64`."""
    if not spec.int64_args:
        return ()
    params = _ttir_params(ttir, spec)
    body = ttir.split("attributes", 1)[1]
    bad = []
    for name in spec.int64_args:
        if name not in params:
            raise RuntimeError(f"int64_args names {name!r}, not a runtime argument of {spec.fn.__name__}")
        ssa = re.escape(params[name])
        uses = re.findall(r"^.*" + ssa + r"(?![\w.$-]).*$", body, re.M)
        widen = re.compile(r"= arith\.extsi " + ssa + r" : i32 to i64\b")
        if any(not widen.search(line) for line in uses):
            bad.append(name)
    return tuple(bad)


def check_one(source: str, index: int, arch: int) -> Result:
    t0 = time.perf_counter()
    spec = load_specs(source)[index]
    result = Result(source, spec.name, config_str(spec), arch)
    try:
        import triton
        from triton.backends.compiler import GPUTarget

        log = io.StringIO()
        with contextlib.redirect_stdout(log):  # Triton prints its own ptxas -v log here
            kernel = triton.compile(_ast_source(spec), target=GPUTarget("cuda", arch, 32),
                                    options=_options(spec))
        result.shared = int(kernel.metadata.shared)
        ptx = kernel.asm["ptx"]
        result.missing_ptx = tuple(text for text in spec.ptx_contains.get(arch, ()) if text not in ptx)
        result.narrow_args = narrow_uses(kernel.asm["ttir"], spec)
        result.regs, result.spill_stores, result.spill_loads = _parse_ptxas(log.getvalue())
    except Exception as exc:  # any compile failure is a finding, reported in the table
        result.error = f"{type(exc).__name__}: {exc}"
    result.seconds = time.perf_counter() - t0
    return result


# ---------------------------------------------------------------------------------------------

def print_table(results: list[Result]) -> None:
    head = ["kernel", "config", "arch", "regs", "spills (st/ld B)", "shared (B)", "status"]
    rows = []
    for r in results:
        spills = "" if r.spill_stores is None else f"{r.spill_stores}/{r.spill_loads}"
        shared = "" if r.shared is None else f"{r.shared} ({100 * r.shared / SHARED_LIMIT[r.arch]:.0f}%)"
        problems = r.problems()
        rows.append([r.name, r.config, f"sm_{r.arch}", "" if r.regs is None else str(r.regs), spills,
                     shared, "FAIL: " + "; ".join(problems) if problems else "ok"])
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]

    def fmt(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    print(fmt(head))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print(fmt(row))


def run_all(tasks: list[tuple[str, int, int]], jobs: int) -> list[Result]:
    """check_one over every task, `jobs` processes at a time; a progress line as each one ends."""
    done = 0

    def progress(result: Result) -> Result:
        nonlocal done
        done += 1
        status = "; ".join(result.problems()) or "ok"
        print(f"[{done}/{len(tasks)}] {result.name} [{result.config}] sm_{result.arch}: {status} "
              f"({result.seconds:.1f} s)", flush=True)
        return result

    if jobs <= 1 or len(tasks) <= 1:
        return [progress(check_one(*t)) for t in tasks]
    # spawn, not fork: a forked child would inherit the parent's Triton/LLVM state mid-flight.
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(check_one, *t): i for i, t in enumerate(tasks)}
        results: list[Result | None] = [None] * len(tasks)
        for future in as_completed(futures):
            results[futures[future]] = progress(future.result())
    return results


def _known_spills(path: Path | None, version: str) -> dict:
    """(name, arch) -> (max stores, max loads) for this Triton version, from a --known-spills file."""
    if path is None:
        return {}
    from packaging.version import Version
    entries = json.loads(path.read_text())["entries"]
    return {(e["name"], e["arch"]): (e["max_spill_stores"], e["max_spill_loads"])
            for e in entries if Version(e["triton"]) == Version(version)}


def _is_known_spill(r: Result, known: dict) -> bool:
    """True when r's only problem is a listed spill no larger than listed (shared memory still counts)."""
    limit = known.get((r.name, r.arch))
    if limit is None or not (r.spill_stores or r.spill_loads):
        return False
    if (r.shared is not None and r.shared > SHARED_LIMIT[r.arch]) or r.missing_ptx or r.narrow_args:
        return False
    return r.spill_stores <= limit[0] and r.spill_loads <= limit[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--module", action="append", default=[],
                    help="check only kernels/<NAME>.py (repeatable; 'x', 'kernels/x.py' or 'rlhf_fast.kernels.x')")
    ap.add_argument("--file", action="append", default=[], type=Path,
                    help="also check a kernel module outside kernels/ (repeatable; disables discovery)")
    ap.add_argument("--match", action="append", default=[],
                    help="check only specs whose name contains this text (repeatable: any of them)")
    ap.add_argument("--arch", action="append", type=int, choices=sorted(SHARED_LIMIT),
                    help="compile only for these compute capabilities (default: each spec's archs)")
    ap.add_argument("--known-spills", type=Path,
                    help="JSON list of known spills (Triton version, spec name, arch, max bytes) accepted as such")
    ap.add_argument("--jobs", "-j", type=int, default=os.cpu_count() or 1,
                    help="parallel compile processes (default: CPU count)")
    args = ap.parse_args(argv)

    import triton
    sources = [f"file:{p.resolve()}" for p in args.file]
    if args.module or not args.file:
        sources += discover(args.module)
    if not sources:
        print("static_check: no kernel modules under kernels/: nothing to check", file=sys.stderr)
        return 2
    tasks = []
    for source in sources:
        try:
            specs = load_specs(source)
        except Exception as exc:  # a module that cannot even list its configs fails the check
            print(f"static_check: {source}: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 2
        for i, spec in enumerate(specs):
            if args.match and not any(m in spec.name for m in args.match):
                continue
            tasks += [(source, i, a) for a in spec.archs if not args.arch or a in args.arch]
    if not tasks:
        print("static_check: no (kernel config, arch) left after --match/--arch: nothing to check", file=sys.stderr)
        return 2
    print(f"static_check: Triton {triton.__version__}, {len(tasks)} (kernel config, arch) compiles "
          f"from {len(sources)} module(s), {args.jobs} job(s)", flush=True)

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="static_check_cache_") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # fresh per run: nothing is cached across runs
        results = run_all(tasks, args.jobs)
    print_table(results)
    known = _known_spills(args.known_spills, triton.__version__)
    accepted = [r for r in results if r.error is None and _is_known_spill(r, known)]
    for r in accepted:
        print(f"known spill (listed in {args.known_spills}): {r.name} sm_{r.arch}: "
              f"{r.spill_stores} B stores / {r.spill_loads} B loads")
    failed = [r for r in results if r.problems() and r not in accepted]
    for r in failed:
        if r.error:
            print(f"\n--- {r.name} [{r.config}] sm_{r.arch}:\n{r.error[-4000:]}")
    print(f"\nstatic_check: {len(results) - len(failed) - len(accepted)}/{len(results)} ok, "
          f"{len(failed)} failed, {len(accepted)} known spills "
          f"({time.perf_counter() - t0:.1f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
