"""What the sampler must do the same on every device, and where it must not read the host, checked on CPU.

- The reference's top-p cut must not depend on how the device's float32 cumsum accumulates (torch's
  CPU kernel accumulates in double, CUDA's in float32): it is run here with cumsum replaced by a
  CUDA-like float32 running sum and must give the same result as on CPU.
- During CUDA-graph capture (simulated: host_sync_forbidden() is True) the op's input check, a host
  read, is skipped and invalid rows come back as token -1 instead of raising.
"""
import numpy as np
import pytest
import torch

import rlhf_fast
from rlhf_fast.ops import sample as sample_op
from rlhf_fast.reference import sample as ref


def _float32_running_cumsum(real):
    """Tensor.cumsum as CUDA computes it for float32: the running sum itself is float32."""
    def cumsum(t, dim, *args, **kwargs):
        if t.dtype != torch.float32:
            return real(t, dim, *args, **kwargs)
        out = np.cumsum(t.detach().cpu().numpy(), axis=dim, dtype=np.float32)
        return torch.from_numpy(out).to(t.device)
    return cumsum


def test_float32_running_cumsum_differs_from_torch_cpu():
    """The premise: on a uniform row the two accumulations round the prefix sums differently."""
    probs = torch.softmax(torch.zeros(1, 997), -1)
    fake = _float32_running_cumsum(torch.Tensor.cumsum)
    assert not torch.equal(fake(probs, -1), probs.cumsum(-1))


@pytest.mark.parametrize("V", [10, 97, 1000])
def test_reference_top_p_cut_is_device_independent(V, monkeypatch):
    """Uniform rows put the cut exactly on a prefix sum for round top_p: the reference keeps as many tokens
    whichever way the float32 cumsum accumulates."""
    top_p = torch.tensor([i / 100 for i in range(1, 100)] + [1 / 3, 2 / 3, 0.125, 0.999], dtype=torch.float64)
    logits = torch.zeros(len(top_p), V)
    on_cpu = ref.sample(logits, top_p=top_p, seed=2, return_logprobs=True)
    monkeypatch.setattr(torch.Tensor, "cumsum", _float32_running_cumsum(torch.Tensor.cumsum))
    cuda_like = ref.sample(logits, top_p=top_p, seed=2, return_logprobs=True)
    assert torch.equal(on_cpu[0], cuda_like[0]) and torch.equal(on_cpu[1], cuda_like[1])


@pytest.mark.parametrize("backend", ["reference", "cuda"])
def test_check_is_skipped_while_host_reads_are_forbidden(backend, monkeypatch, device):
    from conftest import need_backend
    need_backend(backend, device)
    logits = torch.randn(3, 50, device=device)
    logits[1, 7] = float("nan")
    with pytest.raises(ValueError, match="logits row 1 contains NaN"):
        rlhf_fast.sample(logits, seed=1, backend=backend)
    monkeypatch.setattr(sample_op, "host_sync_forbidden", lambda: True)
    tokens = rlhf_fast.sample(logits, seed=1, backend=backend)
    assert tokens[1].item() == -1 and (tokens[[0, 2]] >= 0).all()
