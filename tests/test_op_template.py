"""Every public op follows the one template of rlhf_fast/ops/__init__.py: its custom ops carry `backend`
in their schema (resolved inside), and no op module imports another op module (shared helpers live in
the ops/_*.py and kernels/_*.py modules). Each op also has its three hops on disk."""
import ast
import importlib
from pathlib import Path

import pytest
import torch


ROOT = Path(__file__).resolve().parents[1]
OPS = sorted(p.stem for p in (ROOT / "rlhf_fast" / "ops").glob("*.py") if not p.stem.startswith("_"))
CSRC_OPS = {"sample"}  # kernels in csrc/, not kernels/
REFERENCE_ONLY = {"kl_penalty"}  # elementwise: no kernel, by design (see its docstring)


def _custom_op_names(module: str) -> list[str]:
    tree = ast.parse((ROOT / "rlhf_fast" / "ops" / f"{module}.py").read_text())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "custom_op":
            names.append(node.args[0].value)
    return names


def test_every_op_is_listed():
    assert len(OPS) >= 9, OPS


@pytest.mark.parametrize("module", OPS)
def test_custom_ops_carry_the_backend(module):
    importlib.import_module(f"rlhf_fast.ops.{module}")  # registers its rlhf_fast:: custom ops
    names = _custom_op_names(module)
    assert names, f"ops/{module}.py registers no torch.library custom op"
    for name in names:
        ns, op = name.split("::")
        schema = str(getattr(getattr(torch.ops, ns), op).default._schema)
        assert "str backend" in schema, f"{name}: the schema must carry the backend, got {schema}"


@pytest.mark.parametrize("module", OPS)
def test_no_op_imports_another_op(module):
    tree = ast.parse((ROOT / "rlhf_fast" / "ops" / f"{module}.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            targets = [node.module] if node.module else [a.name for a in node.names]
            for target in targets:
                assert target.split(".")[0].startswith("_"), f"ops/{module}.py imports op module {target}"


@pytest.mark.parametrize("module", OPS)
def test_three_hops_exist(module):
    kernel = None if module in REFERENCE_ONLY else \
        ROOT / ("csrc" if module in CSRC_OPS else "kernels") / ("" if module in CSRC_OPS else f"{module}.py")
    assert kernel is None or kernel.exists(), kernel
    assert (ROOT / "rlhf_fast" / "reference" / f"{module}.py").exists()
    assert (ROOT / "tests" / f"test_{module}.py").exists()
