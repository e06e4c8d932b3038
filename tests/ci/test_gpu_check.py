"""benchmarks/gpu_check.sh and its preflight, rehearsed cheaply on CPU.

The full rehearsal is `bash benchmarks/gpu_check.sh --dry-run OUTDIR` (about a minute on an idle
2-core machine: it collects the whole suite); here the script must parse, and the preflight must find
every third-party import of the tree and name a missing one with the file that needs it; the tune step's
table (benchmarks/tune_check.py) must price every kernel its workloads tune, under the names the ops give them.
"""
import json
import os
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


# Every workload kind of benchmarks/tune_check.py at a toy shape on CPU tensors (Triton's interpreter), run
# through its own tune(). Two stand-ins let the ops reach their autotune call there: _autotune.choose gets
# a GPU description and a timer that launches nothing (so each tuning set of more than one config is
# written to the cache under the kernel's own name, the table pick winning), and the fused-linear launcher
# is told it is not in the interpreter (which otherwise takes its own tile and skips tuning), so it
# launches the GPU tiles, whose interpreter results are meaningless here.
_TOY_TUNE = """
import json, types
import benchmarks.tune_check as tc
from rlhf_fast.ops import _autotune, _fused_linear_launch

real_choose = _autotune.choose
_autotune.choose = lambda *a, **kw: real_choose(*a, timer=lambda fn: 1.0, env={"gpu": "interpreter"}, **kw)
_fused_linear_launch._backend = types.SimpleNamespace(interpret_mode=lambda: False)
toy = [tc.attention_workload(1, 2, 1, 128, 64, False, "cpu"), tc.attention_workload(1, 2, 1, 128, 64, True, "cpu"),
       tc.varlen_workload(2, 2, 1, 64, 64, False, "cpu"), tc.decode_workload(1, 2, 1, 128, 64, "cpu"),
       tc.token_logprobs_workload(4, 2048, "cpu"), tc.kl_divergence_workload(4, 2048, "cpu"),
       tc.fused_linear_logprobs_workload(16, 32, 256, "cpu"), tc.fused_linear_kl_workload(16, 32, 256, "cpu")]
rows, incomplete = tc.tune(toy, budget_s=600)
_, no_budget = tc.tune(toy[-1:], budget_s=0)
kind = lambda load: load[1].__qualname__.split(".")[0]  # the workload function that built it
full = tc.workloads(quick=False)
print(json.dumps({"rows": rows, "incomplete": incomplete, "no_budget": no_budget,
                  "toy_kinds": sorted({kind(w) for w in toy}), "kinds": sorted({kind(w) for w in full}),
                  "work": {w[0]: sorted(w[2]) for w in full}}))
"""


def test_tune_check_workloads_name_the_kernels_their_ops_tune(tmp_path):
    """Each workload's `work` names exactly the kernels its ops tune, as they name their cache files: a kernel
    timed without a work entry (a row with no rate), or a work entry no op tunes (a renamed kernel), fails."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "RLHF_FAST_AUTOTUNE_DIR": str(tmp_path / "user_cache"),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-W", "ignore::RuntimeWarning", "-c", _TOY_TUNE], capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["incomplete"] == {}, out["incomplete"]
    assert list(out["no_budget"].values()) == ["skipped: budget spent"]
    assert out["kinds"] == out["toy_kinds"], "a workload kind of tune_check.workloads() is not run here"
    unpriced = sorted({(r["workload"], r["kernel"]) for r in out["rows"] if r["rate"] is None})
    assert not unpriced, f"kernels timed with no work entry: {unpriced}"
    tuned = {r["kernel"] for r in out["rows"]}
    stale = {name: sorted(set(work) - tuned) for name, work in out["work"].items() if set(work) - tuned}
    assert not stale, f"work entries that no op tunes: {stale}"
    assert {"token_logprobs_fwd", "token_logprobs_bwd", "kl_fwd", "kl_bwd", "fused_linear_logprobs_fwd",
            "fused_linear_logprobs_bwd", "fused_linear_logprobs_bwd_reduce", "fused_linear_kl_fwd",
            "fused_linear_kl_bwd", "fused_linear_kl_bwd_reduce", "decode_split"} <= tuned, sorted(tuned)
    winners = [r for r in out["rows"] if r["winner"]]
    assert len(winners) == len({(r["workload"], r["kernel"], r["regime"]) for r in out["rows"]})
