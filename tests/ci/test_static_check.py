"""CI layer 2's checker (.ci/static_check.py) passes a clean kernel config and rejects planted bad ones.

The planted configs (tests/ci/planted/static_bad.py) spill registers, use more shared memory than
the arch allows, fail to compile, or lack a PTX instruction they require; each must show as FAIL with
its reason and fail the run.
Compiling needs Triton (its NVIDIA backend and bundled ptxas) but no GPU.
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PLANTED = Path(__file__).resolve().parent / "planted"


def _static_check(*args: str) -> tuple[int, str]:
    if importlib.util.find_spec("triton") is None:
        if os.environ.get("RLHF_FAST_REQUIRE_BACKENDS") == "1":
            pytest.fail("triton is not installed: the static check cannot run")
        pytest.skip("triton is not installed")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(REPO / ".ci" / "static_check.py"), "--jobs", "1", *args],
                          capture_output=True, text=True, env=env, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


def _status(output: str, kernel: str, arch: int) -> str:
    rows = [line for line in output.splitlines()
            if line.startswith(f"| {kernel} ") and f"| sm_{arch} " in line]
    assert len(rows) == 1, f"expected one table row for {kernel} sm_{arch}:\n{output}"
    return rows[0].rstrip(" |").rsplit("|", 1)[-1].strip()


def test_static_check_passes_clean_config():
    rc, out = _static_check("--file", str(PLANTED / "static_good.py"), "--arch", "90")
    assert rc == 0, out
    assert _status(out, "planted_matmul[64x64x64]", 90) == "ok", out


def test_static_check_rejects_planted_configs():
    rc, out = _static_check("--file", str(PLANTED / "static_bad.py"), "--arch", "80")
    assert rc == 1, out
    assert _status(out, "planted_spill", 80).startswith("FAIL: spills"), out
    assert _status(out, "planted_shared", 80).startswith("FAIL: shared memory 229376 B > sm_80 limit 166912 B"), out
    assert _status(out, "planted_compile_error", 80) == \
        "FAIL: CompilationError: arange's range must be a power of 2", out
    assert _status(out, "planted_no_wgmma", 80) == "FAIL: PTX lacks wgmma", out
    assert "0/4 ok, 4 failed" in out, out


def test_static_check_accepts_required_ptx():
    """static_good's matmul compiled for sm_90 does lower tl.dot to wgmma: a spec requiring it passes."""
    rc, out = _static_check("--file", str(PLANTED / "static_good_wgmma.py"), "--arch", "90")
    assert rc == 0 and _status(out, "planted_matmul_wgmma", 90) == "ok", out


def test_known_spill_is_accepted_only_up_to_its_listed_bytes(tmp_path):
    import json

    import triton
    known = tmp_path / "known.json"

    def run(max_bytes: int) -> tuple[int, str]:
        entry = {"triton": triton.__version__, "name": "planted_spill", "arch": 80,
                 "max_spill_stores": max_bytes, "max_spill_loads": max_bytes}
        known.write_text(json.dumps({"entries": [entry]}))
        return _static_check("--file", str(PLANTED / "static_bad.py"), "--arch", "80", "--match", "planted_spill",
                             "--known-spills", str(known))

    rc, out = run(10_000)
    assert rc == 0 and "0/1 ok, 0 failed, 1 known spills" in out, out
    rc, out = run(1)
    assert rc == 1 and "0/1 ok, 1 failed, 0 known spills" in out, out


def test_static_check_rejects_32bit_token_offsets():
    """A stride listed in int64_args that enters an i32 multiply fails the config; widened first, it passes."""
    rc, out = _static_check("--file", str(PLANTED / "static_int64.py"), "--arch", "90")
    assert rc == 1, out
    assert _status(out, "planted_int32_offsets", 90) == "FAIL: 32-bit use of stride_t", out
    assert _status(out, "planted_int64_offsets", 90) == "ok", out


def test_hopper_attention_rule_fails_a_dot_without_wgmma():
    """The rule every sm_90 fp16/bf16 attention config is checked with fires on a tile lowered to mma.sync."""
    rc, out = _static_check("--file", str(PLANTED / "static_hopper_mma.py"), "--arch", "90")
    assert rc == 1, out
    assert _status(out, "planted_hopper_rule_mma", 90) == "FAIL: PTX lacks wgmma", out
    assert _status(out, "planted_hopper_rule_wgmma", 90) == "ok", out
