"""Attention never hides a NaN (issue 14.5): a NaN in q, k or v reaches every output row that depends on
it, in every backend, forward and backward (a NaN in v only reaches its own feature column); the (batch, head) slices that cannot see it stay exact.

What "depends" means, per causal attention: out[b, h, i] reads q[b, h, i] and k/v[b, g(h), j] for j <= i.
So a NaN at q row i makes out row i NaN; a NaN at k or v row j makes every out row i >= j NaN. Rows
i < j of a NaN in v may be NaN as well: softmax(...) @ v multiplies their zero weight by the NaN
(0 * NaN = NaN in IEEE arithmetic); the reference does so over the whole head and the kernels over the
tile that holds row j. Spreading further is allowed, hiding is not.
"""
import math

import pytest
import torch

from attention_helpers import assert_attention_close, attention_math, fwd_bwd
from conftest import need_backend
from rlhf_fast import causal_attention
from rlhf_fast.reference.causal_attention import causal_attention as reference

B, HQ, HKV, T, D = 2, 4, 2, 37, 16
ROW = 21          # the poisoned row; the head it sits in is (batch 1, kv head 0): q heads 0 and 1
GROUP = HQ // HKV


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_nan_reaches_every_dependent_row_and_nothing_else(where, backend, device):
    need_backend(backend, device)
    q, k, v = (torch.randn(B, h, T, D, device=device) for h in (HQ, HKV, HKV))
    clean = (q.clone(), k.clone(), v.clone())
    poisoned = dict(q=q, k=k, v=v)[where]
    poisoned[1, 0, ROW, 3] = math.nan
    do = torch.randn(B, HQ, T, D, device=device)
    out, dq, dk, dv = fwd_bwd(causal_attention, q, k, v, do, backend=backend)

    heads = [0] if where == "q" else list(range(GROUP))       # q heads that read the poisoned row
    rows = slice(ROW, ROW + 1) if where == "q" else slice(ROW, T)
    for h in heads:
        assert torch.isnan(out[1, h, rows]).any(dim=-1).all(), f"{backend}: out[1, {h}] rows {rows} hide the NaN"
    if where != "v":  # rows before the NaN never read it (k: masked scores are -inf, not NaN)
        for h in heads:
            assert torch.isfinite(out[1, h, :ROW]).all(), f"{backend}: out[1, {h}] rows < {ROW} became NaN"
    # the gradients of the poisoned (batch, head) carry the NaN too, so a training step's NaN guard fires
    # (not dv for a NaN in v: out is linear in v, dv = P^T dO never reads v; dq = dS k does, via dO v^T)
    grad = dict(q="dq", k="dk", v="dq")[where]
    assert torch.isnan(dict(dq=dq, dk=dk)[grad][1, 0]).any(), f"{backend}: {grad} hides the NaN"

    # every other (batch, head) is what float64 math gives on the clean inputs
    ref64 = fwd_bwd(reference, *(t.double() for t in clean), do.double())
    same = fwd_bwd(attention_math, *clean, do)
    safe_q = [(0, h) for h in range(HQ)] + [(1, h) for h in range(GROUP, HQ)]
    safe_kv = [(0, g) for g in range(HKV)] + [(1, g) for g in range(1, HKV)]
    for name, got, r, s in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), ref64, same):
        for b, h in (safe_q if name in ("out", "dq") else safe_kv):
            assert_attention_close(got[b, h], r[b, h], s[b, h], f"{backend} {name}[{b}, {h}]")
