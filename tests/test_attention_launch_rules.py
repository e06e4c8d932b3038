"""Rules a real GPU enforces on the attention launchers, checked on CPU without running a kernel.

The launchers run on meta tensors of extreme sizes (no memory), with every Triton kernel replaced by a
recorder: each launch grid must fit CUDA's limits (x < 2^31, y and z <= 65535), and each launch must
happen inside `on_device(tensor)`, which makes the tensors' GPU current (Triton launches on the current
device, so a model on cuda:1 would otherwise run on GPU 0 with GPU 1 pointers).
"""
import contextlib

import pytest
import torch

from conftest import need_backend
from rlhf_fast import causal_attention_varlen
from sync_helpers import HostReads
from rlhf_fast.kernels import causal_attention as causal_kern
from rlhf_fast.kernels import causal_attention_varlen as varlen_kern
from rlhf_fast.kernels import decode_attention as decode_kern
from rlhf_fast.ops import _attention_launch as launch
from rlhf_fast.ops import _launch
from rlhf_fast.ops import decode_attention as decode_op

_CAUSAL = ("_attn_fwd_kernel", "_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel")
KERNELS = {causal_kern: _CAUSAL, varlen_kern: _CAUSAL,
           decode_kern: ("_decode_split_kernel", "_decode_combine_kernel")}


class _Recorder:
    def __init__(self, name, launches, guard):
        self.name, self.launches, self.guard = name, launches, guard

    def __getitem__(self, grid):
        def launch_(*args, **kwargs):
            self.launches.append((self.name, tuple(grid), self.guard[-1] if self.guard else None))
        return launch_


@pytest.fixture
def launches(monkeypatch):
    """Replace every attention kernel by a recorder; yields [(kernel, grid, device guarded or None)]."""
    recorded, guard = [], []

    @contextlib.contextmanager
    def spy_on_device(t):
        guard.append(t.device)
        try:
            yield
        finally:
            guard.pop()

    monkeypatch.setattr(launch, "on_device", spy_on_device)
    monkeypatch.setattr(decode_op, "on_device", spy_on_device)
    for module, names in KERNELS.items():
        for name in names:
            monkeypatch.setattr(module, name, _Recorder(name, recorded, guard))
    return recorded


def _assert_launchable(launches, device, expected):
    assert sorted({name for name, _, _ in launches}) == sorted(expected), launches
    for name, grid, guarded in launches:
        assert 1 <= len(grid) <= 3 and all(n >= 1 for n in grid), (name, grid)
        for n, limit in zip(grid, (2**31 - 1, 65535, 65535)):
            assert n <= limit, f"{name}: grid {grid} passes CUDA's limit {limit}"
        assert guarded == device, f"{name} launched outside on_device(tensor) ({guarded})"


@pytest.fixture(params=[80, 90])
def arch(request, monkeypatch):
    monkeypatch.setattr(launch, "arch_of", lambda _: request.param)
    return request.param


@pytest.mark.parametrize("deterministic", [False, True])
def test_padded_2048_prompts_x_32_heads(launches, arch, deterministic):
    meta = torch.device("meta")
    q = torch.empty(2048, 32, 256, 128, dtype=torch.bfloat16, device=meta)
    k = v = torch.empty(2048, 8, 256, 128, dtype=torch.bfloat16, device=meta)
    out, lse = launch.attention_fwd(q, k, v, None, 256, 0.1)
    launch.attention_bwd(out, q, k, v, out, lse, None, 256, 0.1, deterministic)
    kernels = ["_attn_fwd_kernel", "_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel"]
    _assert_launchable(launches, meta, kernels + ([] if not deterministic else ["_attn_bwd_dq_kernel"]))
    assert ("_attn_fwd_kernel", (2048 * 32, 256 // causal_kern.config("fwd", arch, 128, "bf16").block_m),
            meta) in launches


def test_packed_1024_sequences_x_64_heads(launches, arch):
    meta = torch.device("meta")
    q = k = v = torch.empty(1024 * 100, 64, 64, dtype=torch.float16, device=meta)
    cu = torch.empty(1025, dtype=torch.int32, device=meta)
    out, lse = launch.attention_fwd(q, k, v, cu, 4096, 0.1, packed_end=None)
    launch.attention_bwd(out, q, k, v, out, lse, cu, 4096, 0.1, True)
    _assert_launchable(launches, meta, _CAUSAL)


@pytest.mark.parametrize("b,hq,hkv", [(2048, 32, 32), (4096, 64, 8), (65536, 8, 1)])
def test_decode_large_batch(launches, arch, b, hq, hkv):
    meta = torch.device("meta")
    q = torch.empty(b, hq, 128, dtype=torch.bfloat16, device=meta)
    cache = torch.empty(b, hkv, 4096, 128, dtype=torch.bfloat16, device=meta)
    decode_op.decode_fwd(q, cache, cache, torch.empty(b, dtype=torch.int32, device=meta), 0.1)
    _assert_launchable(launches, meta, KERNELS[decode_kern])


def test_grid_over_cuda_limits_is_refused_by_name():
    with pytest.raises(ValueError, match=r"attn_fwd: grid axis 1 would have 65536 blocks; CUDA allows at most 65535"):
        launch.rows_grid(65536 * 16, 16, 1, 1, "attn_fwd")
    with pytest.raises(ValueError, match="grid axis 0"):
        decode_op.combine_grid(2**20, 2**11)
    assert decode_op.split_grid(2048, 32, 128, 4) == (65536, 128, 4)


def test_on_device_makes_the_tensors_gpu_current():
    """A CUDA tensor's launch enters torch.cuda.device of that tensor's index (built here without a GPU:
    entering it is what would need one); CPU tensors (the interpreter) need no guard."""
    class OnSecondGpu:
        device = torch.device("cuda", 1)

    guard = _launch.on_device(OnSecondGpu())
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(_launch.on_device(torch.zeros(1)), contextlib.nullcontext)


def _packed(device, lengths=(5, 9, 1), extra=3, hq=2, hkv=1, d=16):
    total = sum(lengths) + extra
    q, k, v = (torch.randn(total, h, d, device=device) for h in (hq, hkv, hkv))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return q, k, v, cu, max(lengths)


def test_packed_forward_reads_no_host_data_during_capture(monkeypatch, device):
    """Under CUDA-graph capture (simulated) the cu_seqlens value check, a host read, is skipped; the output
    is the same, rows past cu_seqlens[-1] still 0."""
    need_backend("triton", device)
    q, k, v, cu, max_seqlen = _packed(device)
    expected = causal_attention_varlen(q, k, v, cu, max_seqlen, backend="triton")
    monkeypatch.setattr(launch, "host_sync_forbidden", lambda: True)
    reads = HostReads(monkeypatch)
    out = causal_attention_varlen(q, k, v, cu.clone(), max_seqlen, backend="triton")
    assert reads.calls == []
    assert torch.equal(out, expected) and torch.all(out[int(expected.shape[0]) - 3:] == 0)


def test_packed_forward_traces_as_one_graph(device):
    """torch.compile(fullgraph=True) of the packed op: its checks stay out of the traced graph."""
    need_backend("triton", device)
    q, k, v, cu, max_seqlen = _packed(device)

    def forward(q, k, v, cu):
        return causal_attention_varlen(q, k, v, cu, max_seqlen, backend="triton")

    compiled = torch.compile(forward, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(q, k, v, cu), forward(q, k, v, cu))
