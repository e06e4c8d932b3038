"""CI layer 3's checker (.ci/nvcc_check.sh) passes a clean .cu and rejects planted bad ones.

Planted (tests/ci/planted/): an unused variable in device code (an nvcc front-end warning), a
signed/unsigned comparison in host code (a host-compiler -Wall warning) and a type error; each must
fail the check, with the compiler's message, while the clean file passes.
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PLANTED = Path(__file__).resolve().parent / "planted"


def _status_lines(output: str) -> dict[str, str]:
    """{file name: "ok" | "FAIL"} from nvcc_check's per-file lines."""
    out = {}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in ("ok", "FAIL") and parts[1].endswith(".cu"):
            out[Path(parts[1]).name] = parts[0]
    return out


def test_nvcc_check_rejects_planted_files():
    nvcc = os.environ.get("NVCC", "nvcc")
    if shutil.which(nvcc) is None:
        if os.environ.get("RLHF_FAST_REQUIRE_BACKENDS") == "1":
            pytest.fail(f"{nvcc} not found: the nvcc check cannot run")
        pytest.skip(f"{nvcc} not found")
    names = ["nvcc_clean.cu", "nvcc_warning_device.cu", "nvcc_warning_host.cu", "nvcc_error.cu"]
    # One arch is enough to show the checker's verdicts (the host pass, where host warnings live, runs
    # once either way); CI's own run compiles for both.
    proc = subprocess.run(["bash", str(REPO / ".ci" / "nvcc_check.sh"), *(str(PLANTED / n) for n in names)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "NVCC_ARCHS": "90"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert _status_lines(out) == {"nvcc_clean.cu": "ok", "nvcc_warning_device.cu": "FAIL",
                                  "nvcc_warning_host.cu": "FAIL", "nvcc_error.cu": "FAIL"}, out
    assert 'variable "unused" was declared but never referenced' in out, out
    assert "-Werror=sign-compare" in out, out
    assert "cannot be used to initialize" in out, out
    assert "nvcc_check: 1/4 ok" in out, out


def test_nvcc_check_fails_clearly_without_nvcc():
    proc = subprocess.run(["bash", str(REPO / ".ci" / "nvcc_check.sh")], capture_output=True, text=True,
                          env={**os.environ, "NVCC": "/nonexistent/nvcc"}, timeout=60)
    assert proc.returncode == 2
    assert "nvcc not found" in proc.stderr
