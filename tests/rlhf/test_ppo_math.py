"""PPO math against values computed by hand (written out below) and an independent float64 GAE loop.

Inputs are float64 where a value is checked exactly: the only error left is float64 rounding of a
few operations, so 1e-12 is a tight but safe tolerance.
"""
import math

import pytest
import torch

from rlhf_fast.rlhf.ppo_loss import policy_loss
from rlhf_fast.rlhf.ppo_math import (
    AdaptiveKLController, FixedKLController, compute_gae, explained_variance, masked_mean,
    masked_var, masked_whiten, per_token_rewards, value_loss,
)

F64 = dict(atol=1e-12, rtol=0)


def t64(data, device):
    return torch.tensor(data, dtype=torch.float64, device=device)


def test_gae_1x3_by_hand(device):
    # gamma=0.9, lam=0.8, gamma*lam=0.72, V after the last token = 0
    # A2 = 2 - 0.6                          = 1.4
    # A1 = 0.5 + 0.9*0.6 - 0.4 + 0.72*1.4    = 0.64 + 1.008   = 1.648
    # A0 = 1 + 0.9*0.4 - 0.2 + 0.72*1.648    = 1.16 + 1.18656 = 2.34656
    rewards = t64([[1.0, 0.5, 2.0]], device)
    values = t64([[0.2, 0.4, 0.6]], device)
    adv, ret = compute_gae(rewards, values, torch.ones(1, 3, device=device), gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, t64([[2.34656, 1.648, 1.4]], device), **F64)
    torch.testing.assert_close(ret, t64([[2.54656, 2.048, 2.0]], device), **F64)


def test_gae_2x4_right_padded_by_hand(device):
    # Row 0 has 2 valid tokens; its padding holds junk that must be ignored.
    #   A1 = 1.0 - 0.3 = 0.7 (bootstrap 0);  A0 = 0.5 + 0.9*0.3 - 0.1 + 0.72*0.7 = 0.67 + 0.504 = 1.174
    # Row 1 is full:
    #   A3 = 1.0 - 0.8 = 0.2
    #   A2 = -0.5 + 0.9*0.8 - 0.4 + 0.72*0.2       = -0.18 + 0.144       = -0.036
    #   A1 = 0 + 0.9*0.4 + 0.2 + 0.72*(-0.036)     = 0.56 - 0.02592      = 0.53408
    #   A0 = 0 + 0.9*(-0.2) - 0.5 + 0.72*0.53408   = -0.68 + 0.3845376   = -0.2954624
    rewards = t64([[0.5, 1.0, 7.0, 3.0], [0.0, 0.0, -0.5, 1.0]], device)
    values = t64([[0.1, 0.3, 5.0, -2.0], [0.5, -0.2, 0.4, 0.8]], device)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool, device=device)
    adv, ret = compute_gae(rewards, values, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, t64([[1.174, 0.7, 0, 0], [-0.2954624, 0.53408, -0.036, 0.2]], device), **F64)
    torch.testing.assert_close(ret, t64([[1.274, 1.0, 0, 0], [0.2045376, 0.33408, 0.364, 1.0]], device), **F64)


def _gae_reverse_loop(rewards, values, starts, ends, gamma, lam):
    """Textbook GAE, one row at a time in Python floats, episode = [start, end)."""
    B, T = len(rewards), len(rewards[0])
    adv = [[0.0] * T for _ in range(B)]
    for b in range(B):
        last = 0.0
        for t in reversed(range(starts[b], ends[b])):
            next_v = values[b][t + 1] if t + 1 < ends[b] else 0.0
            last = rewards[b][t] + gamma * next_v - values[b][t] + gamma * lam * last
            adv[b][t] = last
    ret = [[adv[b][t] + values[b][t] if starts[b] <= t < ends[b] else 0.0 for t in range(T)] for b in range(B)]
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(0.9, 0.8), (1.0, 0.95), (0.0, 1.0), (0.99, 0.0)])
def test_gae_matches_reverse_loop_random(device, gamma, lam):
    B, T = 5, 17
    g = torch.Generator().manual_seed(7)
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    # a prompt prefix of zeros, the response, right padding; lengths include 1 and the full row
    starts, ends = [0, 0, 3, 5, 16], [17, 1, 11, 6, 17]
    mask = torch.zeros(B, T)
    for b in range(B):
        mask[b, starts[b]:ends[b]] = 1.0
    ref_adv, ref_ret = _gae_reverse_loop(rewards.tolist(), values.tolist(), starts, ends, gamma, lam)
    adv, ret = compute_gae(rewards.to(device), values.to(device), mask.to(device), gamma, lam)
    torch.testing.assert_close(adv.cpu(), torch.tensor(ref_adv, dtype=torch.float64), **F64)
    torch.testing.assert_close(ret.cpu(), torch.tensor(ref_ret, dtype=torch.float64), **F64)


def test_gae_bfloat16_inputs_accumulate_in_float32(device):
    g = torch.Generator().manual_seed(3)
    rewards = torch.randn(3, 300, generator=g).to(torch.bfloat16)
    values = torch.randn(3, 300, generator=g).to(torch.bfloat16)
    mask = torch.ones(3, 300)
    adv, ret = compute_gae(rewards.to(device), values.to(device), mask.to(device), 0.99, 0.95)
    ref_adv, _ = compute_gae(rewards.double(), values.double(), mask.double(), 0.99, 0.95)
    assert adv.dtype == ret.dtype == torch.float32
    # float32 accumulation over 300 steps with |A| ~ 10: rounding ~ 300 * 6e-8 * 10 relative
    torch.testing.assert_close(adv.cpu().double(), ref_adv, atol=1e-4, rtol=1e-5)


def test_masked_mean_var_whiten_by_hand(device):
    x = t64([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]], device)
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]], device=device)
    # valid entries 1, 2, 3, 4: mean 2.5, squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5
    torch.testing.assert_close(masked_mean(x, mask), t64(2.5, device), **F64)
    torch.testing.assert_close(masked_mean(x, mask, dim=1), t64([1.5, 3.5], device), **F64)
    torch.testing.assert_close(masked_var(x, mask, unbiased=False), t64(5 / 4, device), **F64)
    torch.testing.assert_close(masked_var(x, mask), t64(5 / 3, device), **F64)
    scale = 1 / math.sqrt(5 / 3 + 1e-8)
    expected = t64([[-1.5, -0.5, 0.0], [0.5, 1.5, 0.0]], device) * scale
    torch.testing.assert_close(masked_whiten(x, mask), expected, **F64)
    kept_mean = t64([[-1.5 * scale + 2.5, -0.5 * scale + 2.5, 0.0], [0.5 * scale + 2.5, 1.5 * scale + 2.5, 0.0]],
                    device)
    torch.testing.assert_close(masked_whiten(x, mask, shift_mean=False), kept_mean, **F64)


def test_masked_mean_weights_and_empty_rows(device):
    x = t64([[1.0, 3.0], [5.0, 7.0]], device)
    weights = t64([[0.25, 0.75], [0.0, 0.0]], device)
    # row 0: (0.25*1 + 0.75*3) / 1 = 2.5; row 1 has no response token -> 0
    torch.testing.assert_close(masked_mean(x, weights, dim=1), t64([2.5, 0.0], device), **F64)
    torch.testing.assert_close(masked_mean(x, weights), t64(2.5, device), **F64)


def test_policy_loss_clips_both_sides_by_hand(device):
    # clip_range 0.2; per token: -A*r, -A*clip(r), the max, clipped?
    #   A=+1, r=1.5: -1.5, -1.2 -> -1.2 clipped  (upper clip)
    #   A=-1, r=0.5:  0.5,  0.8 ->  0.8 clipped  (lower clip)
    #   A=+2, r=0.5: -1.0, -1.6 -> -1.0 not clipped (pessimistic bound keeps the unclipped term)
    #   A=-2, r=1.1:  2.2,  2.2 ->  2.2 not clipped (inside the range)
    #   padding: A=100, r=3, ignored
    # loss = (-1.2 + 0.8 - 1.0 + 2.2) / 4 = 0.2;  clipfrac = 2/4
    ratios = [1.5, 0.5, 0.5, 1.1, 3.0]
    old = t64([[-1.0, -2.0, -0.5, -3.0, -1.0]], device)
    logprobs = (old + t64([[math.log(r) for r in ratios]], device)).requires_grad_()
    adv = t64([[1.0, -1.0, 2.0, -2.0, 100.0]], device)
    mask = t64([[1, 1, 1, 1, 0]], device)
    loss, stats = policy_loss(logprobs, old, adv, mask, clip_range=0.2)
    torch.testing.assert_close(loss, t64(0.2, device), **F64)
    torch.testing.assert_close(stats["clipfrac"], t64(0.5, device), **F64)
    k3 = sum((r - 1) - math.log(r) for r in ratios[:4]) / 4
    torch.testing.assert_close(stats["approx_kl"], t64(k3, device), **F64)
    assert not stats["clipfrac"].requires_grad and not stats["approx_kl"].requires_grad
    loss.backward()
    # d(-A*r)/dlogprob = -A*r where unclipped, 0 where clipped or padded; divided by 4 tokens
    torch.testing.assert_close(logprobs.grad, t64([[0.0, 0.0, -1.0 / 4, 2.2 / 4, 0.0]], device), **F64)


def test_value_loss_clips_by_hand(device):
    # clip_range 0.2; v_clipped = old + clamp(v - old, -0.2, 0.2)
    #   v=1.0 old=0.5 R=2.0: (1-2)^2=1,     v_c=0.7: 1.69 -> 1.69 clipped
    #   v=0.0 old=0.5 R=0.0: 0,             v_c=0.3: 0.09 -> 0.09 clipped
    #   v=1.0 old=0.5 R=0.0: 1,             v_c=0.7: 0.49 -> 1    not clipped
    #   v=0.6 old=0.5 R=1.0: 0.16,          v_c=0.6: 0.16 -> 0.16 not clipped
    # loss = 0.5 * (1.69 + 0.09 + 1 + 0.16) / 4 = 0.3675;  vf_clipfrac = 2/4
    values = t64([[1.0, 0.0, 1.0, 0.6, 9.0]], device).requires_grad_()
    old = t64([[0.5, 0.5, 0.5, 0.5, 0.0]], device)
    returns = t64([[2.0, 0.0, 0.0, 1.0, -9.0]], device)
    mask = torch.tensor([[True, True, True, True, False]], device=device)
    loss, stats = value_loss(values, old, returns, mask, clip_range=0.2)
    torch.testing.assert_close(loss, t64(0.3675, device), **F64)
    torch.testing.assert_close(stats["vf_clipfrac"], t64(0.5, device), **F64)
    loss.backward()
    # d/dv 0.5*(v-R)^2/4 = (v-R)/4 on the unclipped tokens
    torch.testing.assert_close(values.grad, t64([[0.0, 0.0, 0.25, -0.1, 0.0]], device), **F64)


def test_padding_with_inf_and_nan_is_never_read(device):
    # logprobs of pad tokens can be -inf; a NaN gradient there would poison the whole update
    g = torch.Generator().manual_seed(5)
    B, T = 3, 17
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, :17], mask[1, :1], mask[2, :9] = True, True, True
    mask = mask.to(device)
    pad = torch.tensor([-math.inf, math.inf, math.nan], dtype=torch.float64, device=device)

    def padded(x):
        junk = pad[torch.arange(B * T, device=device) % 3].view(B, T)
        return torch.where(mask, x.to(device), junk)

    clean = [torch.randn(B, T, generator=g, dtype=torch.float64) for _ in range(3)]
    for fn in (policy_loss, value_loss):
        ref_in = clean[0].to(device).clone().requires_grad_()
        ref_loss, _ = fn(ref_in, clean[1].to(device), clean[2].to(device), mask, 0.2)
        ref_loss.backward()
        dirty_in = padded(clean[0]).detach().requires_grad_()
        loss, stats = fn(dirty_in, padded(clean[1]), padded(clean[2]), mask, 0.2)
        loss.backward()
        torch.testing.assert_close(loss, ref_loss, **F64)
        torch.testing.assert_close(dirty_in.grad, torch.where(mask, ref_in.grad, 0.0), **F64)
        assert all(torch.isfinite(v) for v in stats.values())
    torch.testing.assert_close(masked_whiten(padded(clean[0]), mask),
                               masked_whiten(clean[0].to(device), mask), **F64)
    torch.testing.assert_close(explained_variance(padded(clean[0]), padded(clean[1]), mask),
                               explained_variance(clean[0].to(device), clean[1].to(device), mask), **F64)


def test_half_precision_losses_upcast_to_float32(device):
    g = torch.Generator().manual_seed(9)
    logprobs, old, adv = (torch.randn(4, 33, generator=g).to(torch.bfloat16) for _ in range(3))
    mask = torch.ones(4, 33, device=device)
    loss, stats = policy_loss(logprobs.to(device), old.to(device), adv.to(device), mask, 0.2)
    ref, ref_stats = policy_loss(logprobs.float().to(device), old.float().to(device), adv.float().to(device),
                                 mask, 0.2)
    assert loss.dtype == stats["approx_kl"].dtype == torch.float32
    # the same float32 arithmetic on the same (bf16-representable) values
    torch.testing.assert_close(loss, ref, atol=0, rtol=0)
    torch.testing.assert_close(stats["approx_kl"], ref_stats["approx_kl"], atol=0, rtol=0)


def test_explained_variance_by_hand(device):
    # returns [1,2,4]: mean 7/3, var 14/9; residual [0,0,1]: var 2/9; EV = 1 - 1/7
    values = t64([[1.0, 2.0, 3.0, 50.0]], device)
    mask = t64([[1, 1, 1, 0]], device)
    ev = explained_variance(values, t64([[1.0, 2.0, 4.0, -7.0]], device), mask)
    torch.testing.assert_close(ev, t64(6 / 7, device), **F64)
    assert torch.isnan(explained_variance(values, t64([[2.0, 2.0, 2.0, 0.0]], device), mask))


def test_per_token_rewards_by_hand(device):
    # -0.5 * kl on response tokens, score added at the last one
    kl = t64([[0.1, 0.2, 0.3], [0.5, -0.1, 0.4]], device)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], device=device)
    rewards = per_token_rewards(t64([1.0, -2.0], device), kl, 0.5, mask)
    torch.testing.assert_close(rewards, t64([[-0.05, 0.9, 0.0], [-0.25, 0.05, -2.2]], device), **F64)


def test_kl_controllers_by_hand():
    fixed = FixedKLController(0.1)
    fixed.update(100.0, 256)
    assert fixed.value == 0.1
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(torch.tensor(12.0), 256)  # error clip(12/6 - 1) = +0.2
    assert ctl.value == pytest.approx(0.2 * (1 + 0.2 * 256 / 10000), rel=1e-15)
    ctl.update(3.0, 512)                  # error clip(3/6 - 1) = -0.2
    assert ctl.value == pytest.approx(0.2 * 1.00512 * 0.98976, rel=1e-15)
    before = ctl.value
    ctl.update(6.6, 100)                  # error 0.1, inside the clip
    assert ctl.value == pytest.approx(before * (1 + 0.1 * 100 / 10000), rel=1e-12)
    restored = AdaptiveKLController(1.0, 1.0, 1.0)
    restored.load_state_dict(ctl.state_dict())
    assert restored.state_dict() == ctl.state_dict()


def _bad_inputs():
    r, v, m = torch.randn(2, 3), torch.randn(2, 3), torch.ones(2, 3)
    nan = torch.tensor([[0.0, math.nan, 0.0], [0.0, 0.0, 0.0]])
    inf = torch.tensor([[0.0, math.inf, 0.0], [0.0, 0.0, 0.0]])
    s = torch.randn(2)
    return [
        ("values", lambda: compute_gae(r, torch.randn(2, 4), m, 0.9, 0.8)),
        ("mask", lambda: compute_gae(r, v, torch.ones(2, 4), 0.9, 0.8)),
        ("rewards", lambda: compute_gae(torch.randn(6), torch.randn(6), torch.ones(6), 0.9, 0.8)),
        ("gamma", lambda: compute_gae(r, v, m, 1.1, 0.8)),
        ("lam", lambda: compute_gae(r, v, m, 0.9, -0.1)),
        ("rewards", lambda: compute_gae(nan, v, m, 0.9, 0.8)),
        ("values", lambda: compute_gae(r, inf, m, 0.9, 0.8)),
        ("rewards", lambda: compute_gae(r.tolist(), v, m, 0.9, 0.8)),
        ("clip_range", lambda: policy_loss(r, r, v, m, 0.0)),
        ("clip_range", lambda: value_loss(r, r, v, m, -0.2)),
        ("advantages", lambda: policy_loss(r, r, torch.randn(3, 2), m, 0.2)),
        ("mask", lambda: policy_loss(r, r, v, torch.ones(3, 2), 0.2)),
        ("returns", lambda: value_loss(r, r, torch.randn(2, 4), m, 0.2)),
        ("mask", lambda: masked_mean(r, torch.zeros(2, 3))),
        ("mask", lambda: masked_var(r, torch.tensor([[1, 0, 0], [0, 0, 0]]))),
        ("mask", lambda: masked_whiten(r, torch.ones(3, 2))),
        ("x", lambda: masked_mean(torch.ones(2, 3, dtype=torch.long), m)),
        ("score", lambda: per_token_rewards(torch.randn(3), r, 0.1, m)),
        ("kl_coef", lambda: per_token_rewards(s, r, -0.1, m)),
        ("mask row 1", lambda: per_token_rewards(s, r, 0.1, torch.tensor([[1, 0, 0], [0, 0, 0]]))),
        ("kl_coef", lambda: FixedKLController(-1.0)),
        ("target", lambda: AdaptiveKLController(0.1, 0.0, 100)),
        ("horizon", lambda: AdaptiveKLController(0.1, 6.0, 0)),
        ("current_kl", lambda: AdaptiveKLController(0.1, 6.0, 100).update(math.nan, 1)),
        ("current_kl", lambda: FixedKLController(0.1).update(torch.ones(2), 1)),
        ("init_kl_coef", lambda: AdaptiveKLController("0.1", 6.0, 100)),
        ("n_steps", lambda: AdaptiveKLController(0.1, 6.0, 100).update(1.0, -1)),
        ("n_steps", lambda: AdaptiveKLController(0.1, 6.0, 100).update(1.0, 2.5)),
    ]


@pytest.mark.parametrize("name,call", _bad_inputs(), ids=[f"{i}-{n}" for i, (n, _) in enumerate(_bad_inputs())])
def test_bad_input_raises_naming_argument(name, call):
    with pytest.raises(ValueError, match=name):
        call()
