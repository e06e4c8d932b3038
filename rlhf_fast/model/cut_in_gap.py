"""Move each row's cutoff into the gap below its kept set, so that recomputed logits find the same set.

`rlhf_fast.sample(..., return_cutoffs=True)` reports a kept set K as (t, i) with t the x = logit / T of
K's lowest token (see CUTOFFS: v kept <=> x_v > t or (x_v == t and v >= i)). The RL loop scores the
drawn tokens again with the training forward, whose logits differ from the decode step's in the last
float32 bits (another matmul order, another attention path). Against t = x of the lowest kept token,
a 1-ulp drop of that token's x removes it from K, and the drawn token is that token often (at a
small K, about one draw in |K|): its logprob becomes -inf and the renormalization changes.

Described instead by the middle m of the gap between K's lowest x and the largest x left out, K is
{v: x_v > m} on the sampler's own logits (the same set), and a recomputation keeps it as long as no
logit moves by half the gap. Where the gap is 0 (a tie straddling the cut) or one ulp, the sampler's
(t, i) is kept. Rows without a filter (-inf, 0), invalid rows (NaN) and greedy rows (T = 0) are left
as they are. One elementwise pass over the (B, V) logits, no host sync (a CUDA graph can capture it).
"""
from __future__ import annotations

import torch


def cut_in_gap(logits: torch.Tensor, temperature: torch.Tensor, cutoffs: torch.Tensor) -> torch.Tensor:
    """logits (B, V) of one sampling step; temperature (B,) float32 (0 = greedy); cutoffs (B, 2) float64
    from `rlhf_fast.sample` for these logits -> (B, 2) float64 cutoffs of the same kept sets, with
    t = the float32 midpoint of the gap below each set and i = 0 where that gap is wider than one ulp."""
    temperature = temperature.to(torch.float32)
    safe_t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    x = logits.float() / safe_t[:, None]  # exactly the sampler's x (one float32 division)
    t, i = cutoffs[:, 0].float(), cutoffs[:, 1]
    v = torch.arange(x.shape[1], device=x.device, dtype=torch.float64)
    kept = (x > t[:, None]) | ((x == t[:, None]) & (v >= i[:, None]))
    lowest_kept = torch.where(kept, x, float("inf")).amin(1)
    highest_out = torch.where(kept, float("-inf"), x).amax(1)
    middle = lowest_kept / 2 + highest_out / 2  # halves first: no overflow
    movable = ((temperature > 0) & torch.isfinite(t) & (highest_out < middle) & (middle < lowest_kept))
    nothing_out = (temperature > 0) & torch.isfinite(t) & (highest_out == float("-inf"))
    gap_cut = torch.stack((middle.double(), torch.zeros_like(i)), 1)
    no_cut = torch.tensor([float("-inf"), 0.0], dtype=torch.float64, device=cutoffs.device).expand_as(cutoffs)
    out = torch.where(movable[:, None], gap_cut, cutoffs)
    return torch.where(nothing_out[:, None], no_cut, out)
