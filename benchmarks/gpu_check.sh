#!/usr/bin/env bash
# The GPU check: one prepared run on a GPU machine without internet access (Python 3.12, torch 2.11
# cu130, Triton 3.6, nvcc 13), from a plain copy of the working tree (PYTHONPATH, no pip install).
#
#   bash benchmarks/gpu_check.sh [OUTDIR]        (default OUTDIR: ./gpu_check_out)
#
# GPU_CHECK_TESTS narrows the test step to some paths (default: tests); GPU_CHECK_BUDGET_S sets the budget.
#
# Steps, each under `timeout`, the whole under 6 minutes (GPU_CHECK_BUDGET_S, default 345 s):
#   env       GPU, driver, python/torch/triton/nvcc versions                       -> env.txt
#   build     JIT build of the csrc extension with its CUDA kernels; extension_info() -> build.log
#   ceilings  copy GB/s and bf16 matmul TFLOP/s (benchmarks/ceilings.py --quick)      -> ceilings.log
#   tests     the whole suite on CUDA tensors, RLHF_FAST_REQUIRE_BACKENDS=1          -> tests.log, junit.xml
#   bench_*   every benchmarks/bench_*.py GPU suite in quick mode                     -> bench_<name>.log
# JSON results land in OUTDIR/results (RLHF_FAST_RESULTS_DIR). A bench file is run as
# `python -m benchmarks.bench_<name> [--suite gpu] [--quick]`, each flag passed when the file defines it.
# The last thing printed is a table of steps (status, seconds, figures), also in OUTDIR/summary.md.
# Exit status: 0 when every step passed, 1 otherwise.
set -uo pipefail  # not -e: every step runs, failures are collected

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$(mkdir -p "${1:-$repo/gpu_check_out}" && cd "${1:-$repo/gpu_check_out}" && pwd)"
budget="${GPU_CHECK_BUDGET_S:-345}"
t_start=$SECONDS
cd "$repo" || exit 1

export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export RLHF_FAST_REQUIRE_BACKENDS=1
export RLHF_FAST_RESULTS_DIR="$out/results"
export RLHF_FAST_EXT_DIR="${RLHF_FAST_EXT_DIR:-${TMPDIR:-/tmp}/rlhf_fast_gpu_check_ext}"
export RLHF_FAST_BENCH_QUICK=1
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
unset TRITON_INTERPRET RLHF_FAST_BACKEND
# nvcc for the JIT build and tests/ci: the toolkit's usual home when it is not on PATH already.
if ! command -v nvcc >/dev/null 2>&1 && [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; then
    export PATH="${CUDA_HOME:-/usr/local/cuda}/bin:$PATH"
fi
mkdir -p "$RLHF_FAST_RESULTS_DIR"

rows=()
failed=0

# step NAME CAP_S LOG CMD...: run CMD with timeout min(CAP_S, time left), output to OUTDIR/LOG.
step() {
    local name=$1 cap=$2 log=$3 left rc=0 t0=$SECONDS status
    shift 3
    left=$((budget - (SECONDS - t_start)))
    [ "$left" -lt "$cap" ] && cap=$left
    if [ "$cap" -lt 5 ]; then
        last_status="FAIL: skipped, out of time"
        last_seconds=0
        failed=1
        echo "--- $name: skipped, out of time"
        return 0
    fi
    echo "--- $name (limit ${cap} s) -> $out/$log"
    timeout -k 5 "$cap" "$@" > "$out/$log" 2>&1 || rc=$?
    if [ "$rc" -eq 0 ]; then
        status=ok
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        status="FAIL: timeout ${cap} s"
        failed=1
    else
        status="FAIL: exit $rc"
        failed=1
    fi
    last_status=$status
    last_seconds=$((SECONDS - t0))
    echo "    $status (${last_seconds} s)"
    [ "$rc" -eq 0 ] || tail -n 15 "$out/$log" | sed 's/^/    | /'
}

add_row() {  # add_row NAME FIGURES
    rows+=("| $1 | $last_status | $last_seconds | $2 |")
}

# shellcheck disable=SC2329  # run through `bash -c` (timeout cannot run a function)
env_info() {
    nvidia-smi || true
    nvcc --version || true
    python - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except ImportError as exc:
    print("triton missing:", exc)
print("cuda available:", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device:", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
EOF
}
export -f env_info
step env 30 env.txt bash -c env_info
add_row env "$(grep -m1 '^device:' "$out/env.txt" | cut -c9-)"

# shellcheck disable=SC2329  # run through `bash -c`
build_extension() {
    RLHF_FAST_VERBOSE_BUILD=1 python - <<'EOF'
import json
import rlhf_fast
from rlhf_fast import _extension
module = _extension.load()
print("loaded", module.__file__, "has_cuda:", getattr(module, "has_cuda", lambda: None)())
print(json.dumps(rlhf_fast.extension_info(), indent=2, default=str))
EOF
}
export -f build_extension
step build 150 build.log bash -c build_extension
add_row build "$(grep -m1 '^loaded' "$out/build.log")"

step ceilings 45 ceilings.log python -m benchmarks.ceilings --quick --device cuda
add_row ceilings "$(python - <<'EOF' 2>/dev/null
from benchmarks.ceilings import load_ceilings
c = load_ceilings("cuda")
print(f"copy {c['copy_gbps']:.0f} GB/s, bf16 matmul {c['bf16_tflops']:.0f} TFLOP/s" if c else "no result")
EOF
)"

bench_files=("$repo"/benchmarks/bench_*.py)
[ -e "${bench_files[0]}" ] || bench_files=()
tests_cap=$((budget - (SECONDS - t_start) - 25 * ${#bench_files[@]}))
[ "$tests_cap" -lt 120 ] && tests_cap=120
read -r -a test_paths <<< "${GPU_CHECK_TESTS:-tests}"
xdist=()
python -c "import xdist" 2>/dev/null && xdist=(-n 8)  # Triton compiles dominate: spread them over CPUs
step tests "$tests_cap" tests.log python -m pytest -q "${xdist[@]}" -p no:cacheprovider --device=cuda \
    --junitxml="$out/junit.xml" --durations=15 -rfEs "${test_paths[@]}"
add_row tests "$(grep -E '^(=+ )?[0-9]+ (passed|failed|error)' "$out/tests.log" | tail -n 1 | tr -d '=')"

for f in "${bench_files[@]}"; do
    name="$(basename "$f" .py)"
    args=()
    grep -q '"--suite"' "$f" && grep -q '"gpu"' "$f" && args+=(--suite gpu)
    grep -q '"--quick"' "$f" && args+=(--quick)
    step "$name" 60 "$name.log" python -m "benchmarks.$name" "${args[@]}"
    add_row "$name" "$(grep -m1 -o 'results/[^ ]*\.json' "$out/$name.log" || echo 'no JSON written')"
done

{
    echo "GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(grep -m1 '^device:' "$out/env.txt" | cut -c9-), total $((SECONDS - t_start)) s"
    echo
    echo "| step | status | s | figures |"
    echo "|---|---|---|---|"
    printf '%s\n' "${rows[@]}"
} > "$out/summary.md"
echo
cat "$out/summary.md"
exit "$failed"
