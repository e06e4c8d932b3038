"""Every Triton launch in rlhf_fast/ops runs on its tensors' GPU (rlhf_fast/ops/_launch.py).

Triton launches on the *current* CUDA device: without the guard, a model on cuda:1 would run its kernels
on GPU 0 with GPU 1 pointers. Checked two ways on CPU: in the source, each launch (`<kernel>[grid](...)`)
sits in a function decorated with `on_first_tensor_device` or inside `with on_device(...)`; at run time
(Triton's interpreter), each logprob op enters the guard with its input's device, forward and backward.
"""
import ast
import contextlib
from pathlib import Path

import pytest
import torch

import rlhf_fast
from conftest import need_backend
from rlhf_fast.ops import _launch

OPS = Path(rlhf_fast.__file__).resolve().parent / "ops"


def _launches(node) -> list[ast.Call]:
    return [n for n in ast.walk(node) if isinstance(n, ast.Call) and isinstance(n.func, ast.Subscript)
            and isinstance(n.func.value, ast.Attribute) and n.func.value.attr.endswith("_kernel")]


def _guarded_by_with(fn: ast.FunctionDef) -> set[int]:
    ids = set()
    for w in ast.walk(fn):
        if isinstance(w, ast.With) and any(isinstance(i.context_expr, ast.Call)
                                           and getattr(i.context_expr.func, "id", None) == "on_device"
                                           for i in w.items):
            ids |= {id(c) for c in _launches(w)}
    return ids


def test_every_kernel_launch_in_ops_is_guarded():
    unguarded, seen = [], 0
    for path in sorted(OPS.glob("*.py")):
        tree = ast.parse(path.read_text())
        for fn in tree.body:
            if not isinstance(fn, ast.FunctionDef):
                continue
            calls = _launches(fn)
            seen += len(calls)
            decorated = any(getattr(d, "id", None) == "on_first_tensor_device" for d in fn.decorator_list)
            inside = _guarded_by_with(fn)
            unguarded += [f"{path.name}:{c.lineno}" for c in calls if not decorated and id(c) not in inside]
    assert seen >= 10 and not unguarded, unguarded


def test_the_source_check_sees_an_unguarded_launch():
    fn = ast.parse("def f(x):\n    k._fwd_kernel[(1,)](x)\n    with on_device(x):\n        k._bwd_kernel[(1,)](x)\n").body[0]
    assert len(_launches(fn)) == 2 and len(_guarded_by_with(fn)) == 1


@pytest.mark.parametrize("op", ["token_logprobs", "kl_divergence", "fused_linear_logprobs",
                                "fused_linear_kl_divergence"])
def test_logprob_ops_enter_the_guard_forward_and_backward(op, device, monkeypatch):
    need_backend("triton", device)
    entered = []

    @contextlib.contextmanager
    def spy(t):
        entered.append(t.device)
        yield

    monkeypatch.setattr(_launch, "on_device", spy)
    n, h, v = 5, 16, 37
    logits = torch.randn(n, v, device=device, requires_grad=True)
    targets = torch.randint(0, v, (n,), device=device)
    hidden = torch.randn(n, h, device=device, requires_grad=True)
    weight = torch.randn(v, h, device=device)
    if op == "token_logprobs":
        out = rlhf_fast.token_logprobs(logits, targets, backend="triton")
    elif op == "kl_divergence":
        out = rlhf_fast.kl_divergence(logits, torch.randn(n, v, device=device), backend="triton")
    elif op == "fused_linear_logprobs":
        out = rlhf_fast.fused_linear_logprobs(hidden, weight, targets, backend="triton")
    else:
        out = rlhf_fast.fused_linear_kl_divergence(hidden, weight, torch.randn(n, h, device=device), weight,
                                                   backend="triton")
    out = out[0] if isinstance(out, tuple) else out
    out.sum().backward()
    assert entered == [device, device], entered
