"""Critic-free math (GRPO, Dr. GRPO, RLOO, REINFORCE++, DAPO's clip-higher, dual clip) against values
computed by hand and by-definition loops over Python floats (float64), on random inputs of odd sizes."""
import math
import random
import statistics

import pytest
import torch

from rlhf_fast.rlhf import (aggregate_loss, aggregate_weights, discounted_returns, group_advantages, policy_loss,
                            reinforce_pp_advantages)
from rlhf_fast.rlhf.ppo_math import masked_whiten

F64 = dict(atol=1e-12, rtol=0)
# group_advantages returns float32: one float32 rounding of a float64 value
F32 = dict(atol=1e-6, rtol=2e-7)


def t64(data, device):
    return torch.tensor(data, dtype=torch.float64, device=device)


def test_group_advantages_by_hand(device):
    # one group of 3: rewards [1, 2, 6], mean 3, unbiased std sqrt(((-2)^2 + 1 + 9) / 2) = sqrt(7)
    r = t64([1.0, 2.0, 6.0], device)
    s7 = math.sqrt(7.0)
    torch.testing.assert_close(group_advantages(r, 3, eps=0.0),
                               torch.tensor([-2 / s7, -1 / s7, 3 / s7], device=device), **F32)
    torch.testing.assert_close(group_advantages(r, 3, scale="none"),
                               torch.tensor([-2.0, -1.0, 3.0], device=device), **F32)
    # RLOO: baseline of each = mean of the other two: [4, 3.5, 1.5]
    torch.testing.assert_close(group_advantages(r, 3, scale="none", leave_one_out=True),
                               torch.tensor([-3.0, -1.5, 4.5], device=device), **F32)
    # eps is added to the std, not the variance
    torch.testing.assert_close(group_advantages(r, 3, eps=0.5),
                               torch.tensor([-2, -1, 3], device=device) / (s7 + 0.5), **F32)


def _by_definition(rewards, valid, G, scale, loo, eps):
    """Advantages written out one sample at a time with Python floats and `statistics`."""
    out = []
    ok_all = [r for r, v in zip(rewards, valid) if v]
    batch_std = statistics.stdev(ok_all) if len(ok_all) > 1 else 0.0
    for g in range(len(rewards) // G):
        idx = range(g * G, g * G + G)
        ok = [rewards[i] for i in idx if valid[i]]
        std = statistics.stdev(ok) if len(ok) > 1 else 0.0
        for i in idx:
            if not valid[i] or len(ok) < 2:
                out.append(0.0)
                continue
            others = list(ok)
            others.remove(rewards[i])
            base = sum(others) / len(others) if loo else sum(ok) / len(ok)
            a = rewards[i] - base
            if scale == "group":
                a = a / (std + eps) if std + eps > 0 else 0.0
            elif scale == "batch":
                a = a / (batch_std + eps) if batch_std + eps > 0 else 0.0
            out.append(a)
    return out


@pytest.mark.parametrize("G", [1, 2, 7])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("loo", [False, True])
def test_group_advantages_match_definition(device, G, scale, loo):
    rng = random.Random(G * 31 + len(scale) + loo)
    prompts = 5
    rewards = [rng.gauss(0.0, 2.0) for _ in range(prompts * G)]
    rewards[:G] = [0.5] * G                                  # one group with no learning signal
    valid = [rng.random() > 0.2 for _ in rewards]
    for i, v in enumerate(valid):
        if not v:
            rewards[i] = math.nan                            # unscorable: never read
    got = group_advantages(t64(rewards, device), G, scale=scale, leave_one_out=loo, eps=1e-4,
                           valid=torch.tensor(valid, device=device))
    assert got.dtype == torch.float32 and got.shape == (prompts * G,)
    want = _by_definition(rewards, valid, G, scale, loo, 1e-4)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32, device=device), atol=2e-6, rtol=2e-6)


def test_group_advantages_refuse_bad_input(device):
    r = torch.randn(6, device=device)
    for kwargs, word in [(dict(group_size=4), "multiple of group_size"), (dict(group_size=0), "group_size"),
                         (dict(group_size=3, scale="std"), "scale"), (dict(group_size=3, eps=-1.0), "eps"),
                         (dict(group_size=3, valid=torch.ones(6, device=device)), "valid")]:
        with pytest.raises(ValueError, match=word):
            group_advantages(r, **kwargs)
    with pytest.raises(ValueError, match=r"rewards must have shape \(B,\)"):
        group_advantages(r.view(2, 3), 3)
    with pytest.raises(ValueError, match="NaN or inf"):
        group_advantages(torch.tensor([1.0, math.nan, 2.0], device=device), 3)


def test_aggregate_loss_by_hand(device):
    # row 0: tokens [1, 2, 3] (mean 2, sum 6); row 1: token [4]; row 2: empty (padding holds NaN/inf)
    loss = t64([[1.0, 2.0, 3.0, 9.0], [4.0, math.nan, 7.0, 7.0], [math.inf, math.nan, 1.0, 1.0]], device)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], device=device)
    torch.testing.assert_close(aggregate_loss(loss, mask, "seq_mean_token_mean"), t64((2 + 4 + 0) / 3, device), **F64)
    torch.testing.assert_close(aggregate_loss(loss, mask, "token_mean"), t64(10 / 4, device), **F64)
    torch.testing.assert_close(aggregate_loss(loss, mask, "seq_mean_token_sum_norm"), t64(10 / 12, device), **F64)
    torch.testing.assert_close(aggregate_loss(loss, mask, "seq_mean_token_sum_norm", max_len=10),
                               t64(10 / 30, device), **F64)
    empty = torch.zeros_like(mask)
    for mode in ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"):
        assert aggregate_loss(loss, empty, mode).item() == 0.0


def test_aggregate_loss_gradient_weights(device):
    # d loss / d token: 1/(B * n_b) (GRPO), 1/N (DAPO), 1/(B * max_len) (Dr. GRPO)
    g = torch.Generator().manual_seed(3)
    mask = (torch.rand(5, 17, generator=g) > 0.4).to(device)
    n_b = mask.sum(1, keepdim=True).to(torch.float64)
    want = {"seq_mean_token_mean": 1.0 / (5 * n_b.clamp(min=1)), "token_mean": 1.0 / mask.sum().double(),
            "seq_mean_token_sum_norm": torch.tensor(1.0 / (5 * 17), dtype=torch.float64)}
    for mode, w in want.items():
        x = torch.randn(5, 17, generator=g, dtype=torch.float64).to(device).requires_grad_()
        aggregate_loss(x, mask, mode).backward()
        torch.testing.assert_close(x.grad, torch.where(mask, w.to(device).expand(5, 17), 0.0), **F64)


def test_aggregate_loss_refuses_bad_input(device):
    x = torch.randn(2, 3, device=device)
    with pytest.raises(ValueError, match="mode must be one of"):
        aggregate_loss(x, torch.ones_like(x), "sum")
    with pytest.raises(ValueError, match="max_len"):
        aggregate_loss(x, torch.ones_like(x), "seq_mean_token_sum_norm", max_len=2)
    with pytest.raises(ValueError, match="mask must have the shape"):
        aggregate_loss(x, torch.ones(2, 4, device=device), "token_mean")


def test_reinforce_pp_advantages_match_definition(device):
    rng = random.Random(11)
    B, T = 4, 9
    lengths = [9, 1, 5, 3]
    rewards = [[rng.gauss(0, 1) for _ in range(T)] for _ in range(B)]
    mask = torch.tensor([[t < n for t in range(T)] for n in lengths], device=device)
    returns = [[0.0] * T for _ in range(B)]
    for b in range(B):
        run = 0.0
        for t in reversed(range(lengths[b])):
            run = rewards[b][t] + 0.97 * run
            returns[b][t] = run
    torch.testing.assert_close(discounted_returns(t64(rewards, device), mask, 0.97), t64(returns, device), **F64)
    flat = [returns[b][t] for b in range(B) for t in range(lengths[b])]
    mean, std = statistics.fmean(flat), statistics.stdev(flat)
    want = [[(returns[b][t] - mean) / math.sqrt(std ** 2 + 1e-8) if t < lengths[b] else 0.0 for t in range(T)]
            for b in range(B)]
    got = reinforce_pp_advantages(t64(rewards, device), mask, gamma=0.97)
    torch.testing.assert_close(got, t64(want, device), atol=1e-10, rtol=0)
    torch.testing.assert_close(got, masked_whiten(discounted_returns(t64(rewards, device), mask, 0.97), mask), **F64)


def test_policy_loss_clip_higher_and_dual_clip_by_hand(device):
    # clip_range 0.2, clip_range_high 0.3, dual_clip 3; per token -A*r, -A*clip(r, 0.8, 1.3), max, dual bound
    #   A=+1, r=1.5: -1.5, -1.3 -> -1.3 clipped high
    #   A=+1, r=1.25: -1.25, -1.25 -> -1.25 (inside [0.8, 1.3]; clip_range 0.2 alone would clip at 1.2)
    #   A=-1, r=0.5:  0.5, 0.8 -> 0.8 clipped low
    #   A=-1, r=5.0:  5.0, 1.3 -> 5.0, dual-clipped to 3 * 1 = 3
    #   A=-2, r=1.1:  2.2, 2.2 -> 2.2 (below the dual bound 6)
    # loss = (-1.3 - 1.25 + 0.8 + 3 + 2.2) / 5 = 0.69
    ratios = [1.5, 1.25, 0.5, 5.0, 1.1]
    old = t64([[-1.0, -2.0, -0.5, -3.0, -1.0]], device)
    logprobs = (old + t64([[math.log(r) for r in ratios]], device)).requires_grad_()
    adv = t64([[1.0, 1.0, -1.0, -1.0, -2.0]], device)
    mask = torch.ones(1, 5, device=device)
    loss, stats = policy_loss(logprobs, old, adv, mask, 0.2, clip_range_high=0.3, dual_clip=3.0)
    torch.testing.assert_close(loss, t64(0.69, device), **F64)
    torch.testing.assert_close(stats["clipfrac_high"], t64(0.2, device), **F64)
    torch.testing.assert_close(stats["clipfrac_low"], t64(0.2, device), **F64)
    torch.testing.assert_close(stats["dual_clipfrac"], t64(0.2, device), **F64)
    loss.backward()
    # gradient only where the unclipped term is active: r=1.25 (A=1) and r=1.1 (A=-2), / 5 tokens
    torch.testing.assert_close(logprobs.grad, t64([[0.0, -1.25 / 5, 0.0, 0.0, 2.2 / 5]], device), **F64)


def test_policy_loss_unchanged_when_new_options_are_off(device):
    g = torch.Generator().manual_seed(4)
    lp, old, adv = (torch.randn(3, 17, generator=g, dtype=torch.float64).to(device) for _ in range(3))
    mask = (torch.rand(3, 17, generator=g) > 0.3).to(device)
    base, base_stats = policy_loss(lp, old, adv, mask, 0.2)
    same, same_stats = policy_loss(lp, old, adv, mask, 0.2, clip_range_high=0.2, dual_clip=None)
    assert torch.equal(base, same) and torch.equal(base_stats["clipfrac"], same_stats["clipfrac"])
    # low + high clip fractions partition clipfrac
    torch.testing.assert_close(base_stats["clipfrac_low"] + base_stats["clipfrac_high"], base_stats["clipfrac"], **F64)
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(lp, old, adv, mask, 0.2, dual_clip=1.0)
    with pytest.raises(ValueError, match="clip_range_high"):
        policy_loss(lp, old, adv, mask, 0.2, clip_range_high=0.0)


@pytest.mark.parametrize("mode", ["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"])
def test_policy_loss_aggregation_by_definition(device, mode):
    """policy_loss(loss_agg=...) against a float64 loop over the per-token clipped losses."""
    B, T, max_len, lo, hi = 5, 13, 16, 0.2, 0.28
    g = torch.Generator().manual_seed(11)
    lp, old, adv = (torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3 for _ in range(3))
    mask = torch.rand(B, T, generator=g) > 0.4
    mask[:, 0] = True
    per_row = []
    for b in range(B):
        losses = []
        for t in range(T):
            if mask[b, t]:
                r, a = math.exp(lp[b, t] - old[b, t]), float(adv[b, t])
                losses.append(max(-a * r, -a * min(max(r, 1 - lo), 1 + hi)))
        per_row.append(losses)
    if mode == "seq_mean_token_mean":
        want = statistics.fmean(sum(row) / len(row) for row in per_row)
    elif mode == "token_mean":
        want = sum(map(sum, per_row)) / sum(map(len, per_row))
    else:
        want = sum(map(sum, per_row)) / (B * max_len)
    got, stats = policy_loss(lp.to(device), old.to(device), adv.to(device), mask.to(device), lo, clip_range_high=hi,
                             loss_agg=mode, max_len=max_len)
    torch.testing.assert_close(got, t64(want, device), **F64)
    _, base_stats = policy_loss(lp.to(device), old.to(device), adv.to(device), mask.to(device), lo, clip_range_high=hi)
    assert torch.equal(stats["clipfrac"], base_stats["clipfrac"])  # the stats stay token means


@pytest.mark.parametrize("mode", ["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"])
def test_aggregate_weights_give_aggregate_loss(mode):
    """The per-token weights a fused token loss uses reproduce aggregate_loss (float64, an empty row and inf
    on the padding included: the weights are 0 there and the padding is never read)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 17, generator=gen, dtype=torch.float64)
    mask = (torch.rand(5, 17, generator=gen) < 0.7).long()
    mask[2] = 0
    want = aggregate_loss(x.masked_fill(mask == 0, float("inf")), mask, mode, max_len=20)
    weights = aggregate_weights(mask, mode, max_len=20)
    assert weights.dtype == torch.float32 and (weights[mask == 0] == 0).all()
    torch.testing.assert_close((weights.double() * x).sum(), want, rtol=1e-6, atol=0)
