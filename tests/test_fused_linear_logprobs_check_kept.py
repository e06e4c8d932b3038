"""fused_linear_logprobs(cutoffs=, check_kept=False): a target off its kept set gets -inf instead of a
ValueError (an RL update whose policy moved since the rollout), the other rows are unchanged and the
gradient stays finite once the caller masks the -inf row out (as policy_space.drop_left_kept does)."""
import pytest
import torch

import rlhf_fast
from conftest import need_backend


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_target_off_its_kept_set(backend, device):
    need_backend(backend, device)
    g = torch.Generator().manual_seed(0)
    N, H, V = 17, 16, 37
    hidden = torch.randn(N, H, generator=g).to(device).requires_grad_(True)
    weight = torch.randn(V, H, generator=g).to(device).requires_grad_(True)
    x = (hidden @ weight.T).detach().float() / torch.tensor(0.7)
    t = x.topk(5, -1).values[:, -1]  # keep the 5 largest x of each row
    cutoffs = torch.stack((t.double(), torch.zeros_like(t, dtype=torch.float64)), -1)
    targets = x.argmax(-1)
    targets[3] = x[3].argmin()  # off its row's kept set
    kw = dict(temperature=0.7, cutoffs=cutoffs, return_entropy=True, backend=backend)
    with pytest.raises(ValueError, match="kept set"):
        rlhf_fast.fused_linear_logprobs(hidden, weight, targets, **kw)
    logp, entropy = rlhf_fast.fused_linear_logprobs(hidden, weight, targets, check_kept=False, **kw)
    assert torch.isneginf(logp[3]) and bool(torch.isfinite(logp[torch.arange(N, device=device) != 3]).all())
    fine = targets.clone()
    fine[3] = targets[2] if bool(x[3, targets[2]] >= t[3]) else x[3].argmax()
    ref_logp, ref_entropy = rlhf_fast.fused_linear_logprobs(hidden, weight, fine, **kw)
    keep = torch.arange(N, device=device) != 3
    assert torch.equal(logp[keep], ref_logp[keep]) and torch.equal(entropy, ref_entropy)
    torch.where(keep, logp, 0.0).sum().backward()
    assert bool(torch.isfinite(hidden.grad).all()) and bool(torch.isfinite(weight.grad).all())
