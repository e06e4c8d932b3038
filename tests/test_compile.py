"""torch.compile(fullgraph=True) traces the logprob ops (registered torch.library custom ops) without a
graph break, and the compiled function matches eager in the forward and the backward.

The compiled runs use backend="aot_eager": it runs Dynamo (graph capture, fullgraph) and AOTAutograd
(the ops' register_fake shapes and register_autograd formulas, traced into a joint graph), which is
what the registration must get right, and it executes the captured graphs op by op, so compiled and
eager must agree exactly. Inductor would only re-fuse the surrounding elementwise math (changing its
rounding) at ~30 s of CPU codegen per test.
"""
import pytest
import torch

import rlhf_fast


def ppo_terms(logits, targets, ref_logp):
    """A PPO-style use: logprob and entropy of the sampled tokens, a k3 penalty, reduced to a loss."""
    logp, entropy = rlhf_fast.token_logprobs(logits / 1.0, targets, temperature=0.7, return_entropy=True)
    penalty = rlhf_fast.kl_penalty(logp, ref_logp, "k3")
    return (logp * 0.5 - 0.01 * entropy + 0.1 * penalty).sum(), logp


def fused_terms(hidden, weight, targets, ref_hidden, ref_weight):
    logp = rlhf_fast.fused_linear_logprobs(hidden, weight, targets)
    kl = rlhf_fast.fused_linear_kl_divergence(hidden, weight, ref_hidden, ref_weight)
    return (logp - 0.1 * kl).sum(), logp


def _inputs(device):
    logits = torch.randn(3, 7, 33, device=device)
    targets = torch.randint(0, 33, (3, 7), device=device)
    targets[0, 0] = -100
    return logits, targets, -torch.rand(3, 7, device=device) * 4


def test_token_logprobs_has_no_graph_break(device):
    logits, targets, ref_logp = _inputs(device)
    explanation = torch._dynamo.explain(ppo_terms)(logits, targets, ref_logp)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons


def test_fused_linear_ops_have_no_graph_break(device):
    """The fused logprob and KL ops (whose target check reads data inside the custom op) trace whole."""
    h, w = torch.randn(9, 16, device=device), torch.randn(40, 16, device=device)
    t = torch.randint(0, 40, (9,), device=device)
    explanation = torch._dynamo.explain(fused_terms)(h, w, t, torch.randn(9, 8, device=device),
                                                     torch.randn(40, 8, device=device))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons


@pytest.mark.parametrize("fn, make", [
    (ppo_terms, _inputs),
    (fused_terms, lambda d: (torch.randn(9, 16, device=d), torch.randn(40, 16, device=d) * 0.3,
                             torch.randint(0, 40, (9,), device=d), torch.randn(9, 8, device=d),
                             torch.randn(40, 8, device=d) * 0.3)),
], ids=["token_logprobs", "fused_linear"])
def test_compiled_matches_eager_forward_and_backward(fn, make, device):
    torch._dynamo.reset()
    inputs = make(device)
    grads = []
    results = []
    for f in (fn, torch.compile(fn, fullgraph=True, backend="aot_eager")):
        leaf = inputs[0].clone().requires_grad_()
        loss, logp = f(leaf, *inputs[1:])
        loss.backward()
        results.append((loss.detach(), logp.detach()))
        grads.append(leaf.grad)
    for a, b in zip(results[0], results[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
