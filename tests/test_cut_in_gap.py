"""cut_in_gap: the sampler's kept sets, re-described by a cut in the middle of the gap below each set.

The same set on the sampler's own logits (ties at the cut included), and the same set again after the
logits move by less than half the gap, where the sampler's cut (the x of the lowest kept token) loses
that token to a 1-ulp drop.
"""
import torch

import rlhf_fast
from rlhf_fast.model.cut_in_gap import cut_in_gap

FILTERS = dict(top_k=20, top_p=0.9, min_p=0.05)


def kept(x, cutoffs):
    t, i = cutoffs[:, 0].float()[:, None], cutoffs[:, 1][:, None]
    v = torch.arange(x.shape[1], device=x.device, dtype=torch.float64)
    return (x > t) | ((x == t) & (v >= i))


def logits_with_ties(device, B=17, V=1000):
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(B, V, generator=g) * 3).to(device)
    z[:4, 100:130] = z[:4, :30].amax(1, keepdim=True)  # rows with a block of ties straddling the top-k cut
    z[4, :] = 1.5  # a flat row: everything tied
    return z


def test_same_kept_set_on_the_samplers_logits(device):
    z = logits_with_ties(device)
    T = torch.full((z.shape[0],), 0.7, device=device)
    T[5] = 0.0  # a greedy row stays (x_max, argmax)
    x = z.float() / T.clamp_min(1e-30)[:, None]
    x[5] = z[5]
    _, cut = rlhf_fast.sample(z, temperature=T, seed=1, return_cutoffs=True, backend="reference", **FILTERS)
    moved = cut_in_gap(z, T, cut)
    assert torch.equal(kept(x, moved), kept(x, cut))
    assert torch.equal(moved[5], cut[5])
    gap_rows = moved[:, 1] == 0
    assert int(gap_rows.sum()) >= 10  # most rows got a gap cut, the tied ones kept theirs
    assert torch.equal(moved[~gap_rows], cut[~gap_rows])


def test_a_recomputation_within_half_the_gap_keeps_the_set(device):
    z = logits_with_ties(device)[5:]  # no ties at the cut
    T = torch.full((z.shape[0],), 0.7, device=device)
    x = z.float() / T[:, None]
    _, cut = rlhf_fast.sample(z, temperature=T, seed=1, return_cutoffs=True, backend="reference", **FILTERS)
    moved = cut_in_gap(z, T, cut)
    lowest = torch.where(kept(x, cut), x, float("inf")).amin(1, keepdim=True)
    highest_out = torch.where(kept(x, cut), float("-inf"), x).amax(1, keepdim=True)
    quarter_gap = (lowest - highest_out) / 4
    g = torch.Generator().manual_seed(1)
    noise = (torch.rand(x.shape, generator=g).to(device) * 2 - 1) * quarter_gap
    assert torch.equal(kept(x + noise, moved), kept(x, cut))
    one_ulp_down = torch.where(x == lowest, torch.nextafter(x, torch.full_like(x, float("-inf"))), x)
    assert not torch.equal(kept(one_ulp_down, cut), kept(x, cut))  # the sampler's own cut loses the token
    assert torch.equal(kept(one_ulp_down, moved), kept(x, cut))
