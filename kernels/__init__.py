"""Triton kernels, installed as ``rlhf_fast.kernels``.

@triton.jit code only: no autograd, no side effects at import. Each kernel module exposes
``static_configs()`` returning the ``KernelSpec`` list of every (kernel, config) its launcher can use;
the CI static check (.ci/static_check.py) compiles each for sm_90 and sm_80 and fails on spills or
shared memory over the limit. Launchers must pick their configs from the same table, so what is
checked is what runs.

Importing this package does not import Triton; the submodules do.
"""
