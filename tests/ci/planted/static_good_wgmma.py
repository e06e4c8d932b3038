"""static_good's matmul with a PTX requirement it meets: on sm_90, tl.dot of 64x64 fp16 tiles is wgmma."""
import dataclasses

from static_good import static_configs as _good


def static_configs():
    return [dataclasses.replace(spec, name="planted_matmul_wgmma", archs=(90,), ptx_contains={90: ("wgmma",)})
            for spec in _good()]
