"""The attention kernels' Hopper rule (kernels/_attention_specs.hopper_ptx: an sm_90 fp16/bf16 config must
lower its dots to wgmma) applied to static_good's matmul, for tests/ci/test_static_check.py.

- planted_hopper_rule_mma: 16-row tiles. A warpgroup MMA covers 64 rows, so Triton lowers this dot to
  mma.sync on sm_90: the rule must fail it, as it would fail an attention tile too small for wgmma.
- planted_hopper_rule_wgmma: 64-row tiles, lowered to wgmma: the rule passes it.
"""
import dataclasses

from rlhf_fast.kernels._attention_specs import hopper_ptx
from static_good import static_configs as _good


def static_configs():
    good = _good()[0]
    rule = hopper_ptx(90, "bf16")
    return [dataclasses.replace(good, name="planted_hopper_rule_mma", archs=(90,), ptx_contains=rule,
                                constexprs={**good.constexprs, "BLOCK_M": 16}),
            dataclasses.replace(good, name="planted_hopper_rule_wgmma", archs=(90,), ptx_contains=rule)]
