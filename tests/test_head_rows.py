"""Only the positions a head reads go through the last block's output projection and MLP (model/head_rows.py).

Each case runs the same weights twice: through the skipping path, and through a full pass that reads every
position (logits for the lm head, an unrestricted value head; test_model.py holds those against
transformers). Outputs and every parameter's gradient must agree. Subsets of rows change no reduction
inside a row but the matmuls' blocking, so the bound is 1e-5 (relative to the largest gradient entry).
A spy checks that the last block's MLP saw only the read rows, and the earlier blocks every row.
"""
import copy

import pytest
import torch
from gpt_helpers import CONFIGS, V, sharpen

from rlhf_fast.model import GPT


def _batch(device, lengths=(13, 1, 20, 7), T=20):
    """idx, mask (B, T): rows 0 and 2 left-padded, rows 1 and 3 shifted to the middle (pads on both sides)."""
    idx = torch.randint(1, V, (len(lengths), T), device=device)
    mask = torch.zeros_like(idx)
    for b, n in enumerate(lengths):
        mask[b, T - n:] = 1
    for b, shift in ((1, 4), (3, 6)):
        mask[b] = mask[b].roll(-shift)
    return idx, mask


def _mlp_rows(model):
    """Rows each block's MLP receives, per call, filled in by forward hooks."""
    seen = [[] for _ in model.transformer.h]
    for i, block in enumerate(model.transformer.h):
        block.mlp.register_forward_hook(lambda m, args, out, i=i: seen[i].append(args[0].reshape(-1, args[0].shape[-1]).shape[0]))
    return seen


def _assert_same_grads(a, b):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            bound = 1e-5 * q.grad.abs().max().item() + 1e-12
            assert (p.grad - q.grad).abs().max().item() <= bound, name


@pytest.mark.parametrize("name,remat", [("gpt2", False), ("modern", False), ("modern", True)],
                         ids=["gpt2", "modern", "modern-checkpointing"])
def test_lm_targets(device, name, remat):
    model = sharpen(GPT(CONFIGS[name](gradient_checkpointing=remat))).to(device).train()
    full = copy.deepcopy(model)
    idx, mask = _batch(device)
    targets = torch.randint(0, V, idx.shape, device=device)
    targets[:, :12] = -100  # a rollout's prompt part: not read
    read = (targets != -100) & mask.bool()
    w = torch.randn(idx.shape, device=device)
    seen = _mlp_rows(model)

    logprobs, entropy = model(idx, targets, attention_mask=mask, temperature=0.7)
    ((logprobs * w).sum() + entropy.sum()).backward()

    lsm = (full(idx, attention_mask=mask).double() / 0.7).log_softmax(-1)
    ref_lp = lsm.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * read
    ref_ent = -(lsm.exp() * lsm).sum(-1) * read
    ((ref_lp * w).sum() + ref_ent.sum()).float().backward()
    assert (logprobs - ref_lp).abs().max().item() < 1e-5 and (entropy - ref_ent).abs().max().item() < 1e-5
    # (checkpointing may run a block's forward again in the backward: the first call is the forward's)
    assert seen[-1][0] == int(read.sum()) and all(rows[0] == idx.numel() for rows in seen[:-1])
    assert all(len(set(rows)) == 1 for rows in seen)
    _assert_same_grads(model, full)


def test_value_outputs_at_padded_and_packed(device):
    critic = sharpen(GPT(CONFIGS["modern"]())).to(device).with_head("value").train()
    full = copy.deepcopy(critic)
    idx, mask = _batch(device)
    read = torch.zeros_like(mask, dtype=torch.bool)
    read[:, 9:16] = True
    w = torch.randn(idx.shape, device=device)
    seen = _mlp_rows(critic)

    values = critic(idx, attention_mask=mask, outputs_at=read)
    want = read & mask.bool()
    assert (values[~want] == 0).all()
    (values * w).sum().backward()
    ref = full(idx, attention_mask=mask) * want
    (ref * w).sum().backward()
    assert (values - ref).abs().max().item() < 1e-5
    assert seen[-1] == [int(want.sum())]
    _assert_same_grads(critic, full)

    cu = torch.tensor([0, 5, 6, 23, 32], dtype=torch.int32, device=device)  # packed: (N,) positions
    flat = torch.randint(0, V, (32,), device=device)
    read = torch.rand(32, device=device) < 0.5
    with torch.no_grad():
        values = critic(flat, cu_seqlens=cu, max_seqlen=17, outputs_at=read)
        ref = full(flat, cu_seqlens=cu, max_seqlen=17)
    assert (values[read] - ref[read]).abs().max().item() < 1e-5 and (values[~read] == 0).all()
    assert seen[-1][-1] == int(read.sum())


def test_reward_reads_the_last_token_only(device):
    rm = sharpen(GPT(CONFIGS["gpt2"]())).to(device).with_head("reward").train()
    critic = rm.with_head("value")  # the same backbone, a full pass: the value at the last token is the reward
    critic.score.load_state_dict(rm.score.state_dict())
    idx, mask = _batch(device)
    seen = _mlp_rows(rm)
    rewards = rm(idx, attention_mask=mask)
    rewards.sum().backward()
    last = mask.shape[1] - 1 - mask.flip(1).argmax(1)  # each row's last real token
    ref = critic(idx, attention_mask=mask)[torch.arange(4, device=device), last]
    ref.sum().backward()
    assert (rewards - ref).abs().max().item() < 1e-5
    assert seen[-1] == [4]
    _assert_same_grads(rm, critic)

    cu = torch.tensor([0, 5, 6, 23, 32], dtype=torch.int32, device=device)  # packed: each sequence's last token
    flat = torch.randint(0, V, (32,), device=device)
    with torch.no_grad():
        rewards = rm(flat, cu_seqlens=cu, max_seqlen=17)
        ref = critic(flat, cu_seqlens=cu, max_seqlen=17)[cu[1:].long() - 1]
    assert (rewards - ref).abs().max().item() < 1e-5 and seen[-1][-1] == 4


def test_outputs_at_needs_a_value_head_and_idx_shape(device):
    model = GPT(CONFIGS["gpt2"]()).to(device)
    idx = torch.randint(0, V, (2, 5), device=device)
    with pytest.raises(ValueError, match="outputs_at"):
        model(idx, outputs_at=torch.ones_like(idx, dtype=torch.bool))
    critic = model.with_head("value")
    with pytest.raises(ValueError, match="outputs_at"):
        critic(idx, outputs_at=torch.ones(2, 4, dtype=torch.bool, device=device))
    with pytest.raises(ValueError, match="outputs_at"):
        critic(idx, outputs_at=torch.ones_like(idx))
