"""benchmarks/gpu_check.sh and its preflight, rehearsed cheaply on CPU.

The full rehearsal is `bash benchmarks/gpu_check.sh --dry-run OUTDIR` (about a minute on an idle
2-core machine: it collects the whole suite); here the script must parse, and the preflight must find
every third-party import of the tree and name a missing one with the file that needs it.
"""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_script_parses():
    proc = subprocess.run(["bash", "-n", str(REPO / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_preflight_names_missing_modules_and_their_users(tmp_path):
    (tmp_path / "tests" / "rlhf").mkdir(parents=True)
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "tests" / "rlhf" / "test_x.py").write_text(
        "import os\nimport torch\nfrom helper_mod import thing\n\ndef f():\n    import not_installed_pkg_w17.sub\n")
    (tmp_path / "tests" / "helper_mod.py").write_text("import numpy as np\n")
    (tmp_path / "benchmarks" / "bench_y.py").write_text("from . import common\nimport torch.nn\n")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_preflight", "--root", str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith("ok") and " torch " in line for line in lines), proc.stdout
    assert "MISSING  not_installed_pkg_w17 imported by tests/rlhf/test_x.py" in lines, proc.stdout
    assert not any(" os " in line or "helper_mod" in line for line in lines), proc.stdout  # stdlib, local
    assert lines[-1].startswith("preflight: ") and "1 missing (not_installed_pkg_w17)" in lines[-1], proc.stdout


def test_tune_check_table_reads_every_config_and_marks_the_winner(tmp_path):
    """benchmarks/tune_check.py builds its table from the autotune cache files: one row per timed config,
    the rate from the kernel's work, the winner marked."""
    from benchmarks.tune_check import rows_from_cache
    from rlhf_fast.ops import _autotune

    key = _autotune.cache_key({"gpu": "test"}, "attn_fwd", "sm90,D=128,bf16",
                              [(128, 64, 8, 3, None), (128, 128, 8, 3, None)])
    _autotune.write_winner(tmp_path / "attn_fwd-x.json", key, (128, 128, 8, 3, None),
                           {"128,64,8,3,null": 2.0, "128,128,8,3,null": 1.0})
    rows = rows_from_cache("w", tmp_path, {"attn_fwd": ("TFLOP/s", 4e12)})
    assert sorted((r["config"], r["rate"], r["winner"]) for r in rows) == [("128,128,8,3,null", 4000.0, "*"),
                                                                         ("128,64,8,3,null", 2000.0, "")]
