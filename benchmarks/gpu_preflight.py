"""Preflight of benchmarks/gpu_check.sh: every third-party module the tests, benchmarks and package import, and
whether this Python has it, before the one GPU run spends its minutes finding out.

    python -m benchmarks.gpu_preflight [--root DIR]

Imports are read from the source (ast, function-level imports included), so a module used by one test
only still shows. Prints one line per module (present with its version, or MISSING with the files that
import it) and a last line `preflight: N modules, M missing (...)`. Always exits 0: a missing module
skips the files that need it (gpu_check.sh runs pytest with --continue-on-collection-errors), the
preflight only says which ones beforehand.
"""
from __future__ import annotations

import argparse
import ast
import importlib.metadata
import importlib.util
import sys
from pathlib import Path

# import name -> distribution name, where they differ
_DISTRIBUTIONS = {"yaml": "PyYAML", "sklearn": "scikit-learn", "xdist": "pytest-xdist", "google": "protobuf"}


# what gpu_check.sh itself uses: pytest-xdist spreads the Triton compiles, ninja runs the csrc JIT build
_TOOLS = {"xdist": "benchmarks/gpu_check.sh (pytest -n)", "ninja": "rlhf_fast/_extension.py (JIT build)"}


def source_files(root: Path) -> list[Path]:
    """The tests, the benchmarks and the package they import."""
    return sorted([*root.glob("tests/**/*.py"), *root.glob("benchmarks/*.py"), *root.glob("rlhf_fast/**/*.py")])


def local_names(root: Path) -> set[str]:
    """Modules of the repository itself: the package, benchmarks, and the tests' helper modules."""
    names = {"rlhf_fast", "benchmarks", "tests", "conftest"}
    names |= {p.stem for p in root.glob("tests/**/*.py")} | {p.stem for p in root.glob("benchmarks/*.py")}
    return names


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every absolute import in `path`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def third_party(root: Path) -> dict[str, list[str]]:
    """Module -> files (relative to root) importing it, for modules neither stdlib nor local."""
    skip = set(sys.stdlib_module_names) | local_names(root) | {"__future__"}
    users: dict[str, list[str]] = {}
    for path in source_files(root):
        for name in imported_modules(path) - skip:
            users.setdefault(name, []).append(str(path.relative_to(root)))
    for name, user in _TOOLS.items():
        users.setdefault(name, []).append(user)
    return dict(sorted(users.items()))


def version_of(name: str) -> str:
    try:
        return importlib.metadata.version(_DISTRIBUTIONS.get(name, name))
    except importlib.metadata.PackageNotFoundError:
        module = sys.modules.get(name)
        return getattr(module, "__version__", "?")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    args = ap.parse_args(argv)
    print(f"python {sys.version.split()[0]} at {sys.executable}")
    missing = []
    for name, users in third_party(args.root).items():
        if importlib.util.find_spec(name) is None:
            missing.append(name)
            shown = ", ".join(users[:4]) + (f" and {len(users) - 4} more" if len(users) > 4 else "")
            print(f"MISSING  {name:<16} imported by {shown}")
        else:
            print(f"ok       {name:<16} {version_of(name)}")
    total = len(third_party(args.root))
    print(f"preflight: {total} modules, {len(missing)} missing" + (f" ({', '.join(missing)})" if missing else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
