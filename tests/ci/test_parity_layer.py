"""CI layer 1's checker: the parity rule (tests/parity.py) passes a right kernel, rejects one off by a bit.

The kernels (tests/ci/planted/parity_kernels.py) run where the suite's kernels run: in Triton's
interpreter on CPU tensors (TRITON_INTERPRET=1), compiled on CUDA tensors (--device=cuda).
"""
import sys
from pathlib import Path

import pytest
import torch

from conftest import need_backend
from parity import assert_close_to_reference

sys.path.insert(0, str(Path(__file__).resolve().parent / "planted"))
from parity_kernels import softmax  # noqa: E402

SHAPES = [(1, 17), (3, 300)]


def _inputs(shape, dtype, device):
    x64 = torch.randn(shape, dtype=torch.float64, device=device)
    x = x64.to(dtype)
    return x, torch.softmax(x.double(), -1), torch.softmax(x, -1)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_parity_rule_accepts_right_kernel(shape, dtype, device):
    need_backend("triton", device)
    x, ref64, same = _inputs(shape, dtype, device)
    assert_close_to_reference(softmax(x), ref64, same, name="softmax")


@pytest.mark.parametrize("shape", SHAPES)
def test_parity_rule_rejects_planted_kernel(shape, device):
    need_backend("triton", device)
    x, ref64, same = _inputs(shape, torch.float32, device)
    out = softmax(x, planted=True)
    # Off by a bit: a loose test would pass it...
    assert torch.allclose(out.double(), ref64, atol=1e-2, rtol=1e-2)
    # ...the parity rule does not.
    with pytest.raises(AssertionError, match=r"max\|ours - ref64\|"):
        assert_close_to_reference(out, ref64, same, name="softmax")


def test_parity_rule_checks_non_finite_positions():
    ref64 = torch.tensor([0.5, -float("inf"), 1.25], dtype=torch.float64)
    same = ref64.float()
    assert_close_to_reference(same.clone(), ref64, same)
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close_to_reference(torch.tensor([0.5, -1e30, 1.25]), ref64, same)
    with pytest.raises(AssertionError, match="shapes differ"):
        assert_close_to_reference(same[:2], ref64, same)
