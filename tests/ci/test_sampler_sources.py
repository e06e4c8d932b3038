"""The CUDA sampler and its C++ port must draw the same tokens by construction: every exp they take is
the one in csrc/include/rlhf_fast/sampling_common.h (exp_nonpositive, with unfused float operations on
the device). A libm or CUDA exp (expf: up to 2 ulp, and differently rounded) in either would let a mass,
hence a cut or a draw, differ between CPU and GPU. A source check: it needs no compiler."""
import re
from pathlib import Path

INCLUDE = Path(__file__).resolve().parents[2] / "csrc" / "include" / "rlhf_fast"
OTHER_EXP = re.compile(r"\b(?:std::)?(?:__)?(?:expf?|exp2f?|expm1f?|exp10f?)\s*\(")


def _code(name: str) -> str:
    """The file without comments."""
    text = (INCLUDE / name).read_text()
    return re.sub(r"//[^\n]*|/\*.*?\*/", "", text, flags=re.S)


def test_both_samplers_take_every_exp_from_the_shared_header():
    for name in ("sampling.cuh", "sampling_cpu.h"):
        code = _code(name)
        assert not OTHER_EXP.search(code), f"{name}: {OTHER_EXP.search(code).group(0)} besides exp_nonpositive"
        assert "exp_nonpositive(" in code, name
    common = _code("sampling_common.h")
    assert "float exp_nonpositive(float x)" in common
    body = common.split("float exp_nonpositive(float x)", 1)[1].split("\n}\n", 1)[0]
    # on the device, y * r + c would be fused into an FMA (nvcc -fmad=true) and round unlike the host:
    # every float operation goes through the unfused helpers (the one `+` left is integer, on the exponent)
    assert body.count("mul_rn(") == 11 and body.count("add_rn(") == 8 and body.count("sub_rn(") == 3, body
    assert len(re.findall(r"[*+]", body)) == 1, body


def test_the_check_sees_a_planted_expf():
    assert OTHER_EXP.search("const float e = expf(x - x_max);")
    assert OTHER_EXP.search("w = __expf(x);") and OTHER_EXP.search("std::exp(z)")
    assert not OTHER_EXP.search("const float e = exp_nonpositive(x - x_max);")
