#!/usr/bin/env bash
# The GPU check: one prepared run on a GPU machine without internet access (Python 3.12, torch 2.11
# cu130, Triton 3.6, nvcc 13), from a plain copy of the working tree (PYTHONPATH, no pip install).
#
#   bash benchmarks/gpu_check.sh [--dry-run] [OUTDIR]        (default OUTDIR: ./gpu_check_out)
#
# GPU_CHECK_BUDGET_S sets the whole run's budget (default 360 s: a lent GPU has 15 minutes in all, start-up
# included, and a second try must fit).
# Steps, most important first, each under `timeout` with a cap it can meet (a step left with under 5 s
# is reported SKIP and the run goes on):
#   env        GPU, driver, python/torch/triton/nvcc versions                       30 s -> env.txt
#   preflight  every module the tests, benches and package import, present or not   15 s -> preflight.txt
#   build      JIT build of the csrc extension with its CUDA kernels (~40 s, sm_90)  90 s -> build.log
#   parity     tests/test_<op>.py of every op + the cutoffs exactness tests, CUDA   200 s -> parity.log
#   ceilings   copy GB/s and bf16 matmul TFLOP/s (benchmarks/ceilings.py --quick)    25 s -> ceilings.log
#   tune       every config of every tuning set the benchmark shapes launch, timed, with the winners
#              (benchmarks/tune_check.py --quick; they also warm the autotune cache the benches use)  60 s
#   bench_attention, bench_logprobs, bench_sample: the speed figures that matter most, 60/60/45 s
#   tests      the rest of the suite on CUDA tensors                     what is left -> tests.log
#   bench_*    the other benches (generate, ppo_step), if time is left               45 s each
# pytest runs with --continue-on-collection-errors: a file that fails to import (a missing module: see
# preflight.txt) is reported and skipped while the other files run. RLHF_FAST_REQUIRE_BACKENDS=1, so a
# kernel test cannot pass by skipping. JSON results land in OUTDIR/results (RLHF_FAST_RESULTS_DIR); a
# bench file runs as `python -m benchmarks.bench_<name> [--suite gpu] [--quick]`, each flag passed when
# the file defines it. The last thing printed is a table of steps (status, seconds, figures), also in
# OUTDIR/summary.md. Exit status: 0 when no step failed (skipped steps do not fail it), 1 otherwise.
#
# --dry-run rehearses the whole script on a CPU machine: every step runs its command list without CUDA
# (pytest collects on CPU tensors with --collect-only; each `python -m` module gets --help, which still
# parses the step's flags; the build only lists its sources), so a typo, a missing file or flag, a
# collection error or a budget that does not add up shows before the GPU run.
set -uo pipefail  # not -e: every step runs, failures are collected

dry_run=0
if [ "${1:-}" = "--dry-run" ]; then
    dry_run=1
    shift
fi
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$(mkdir -p "${1:-$repo/gpu_check_out}" && cd "${1:-$repo/gpu_check_out}" && pwd)"
budget="${GPU_CHECK_BUDGET_S:-360}"
t_start=$SECONDS
cd "$repo" || exit 1

export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export RLHF_FAST_REQUIRE_BACKENDS=1
export RLHF_FAST_RESULTS_DIR="$out/results"
export RLHF_FAST_EXT_DIR="${RLHF_FAST_EXT_DIR:-${TMPDIR:-/tmp}/rlhf_fast_gpu_check_ext}"
export RLHF_FAST_BENCH_QUICK=1
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
unset RLHF_FAST_BACKEND
device=cuda
if [ "$dry_run" -eq 1 ]; then
    device=cpu
    export TRITON_INTERPRET=1  # collection imports the kernels, as the CPU suite does
else
    unset TRITON_INTERPRET
fi
export dry_run
# nvcc for the JIT build and tests/ci: the toolkit's usual home when it is not on PATH already.
if ! command -v nvcc >/dev/null 2>&1 && [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; then
    export PATH="${CUDA_HOME:-/usr/local/cuda}/bin:$PATH"
fi
mkdir -p "$RLHF_FAST_RESULTS_DIR"

rows=()
failed=0

# run_cmd CMD...: CMD, or in a dry run the CPU rehearsal of it (see the header).
run_cmd() {
    if [ "$dry_run" -eq 0 ]; then
        "$@"
    elif [[ " $* " == *" pytest "* ]]; then
        "$@" --collect-only
    elif [ "${1:-}" = python ] && [ "${2:-}" = -m ]; then
        "$@" --help
    else
        "$@"
    fi
}
export -f run_cmd

# step NAME CAP_S LOG CMD...: run_cmd CMD under timeout min(CAP_S, time left), output to OUTDIR/LOG.
step() {
    local name=$1 cap=$2 log=$3 left rc=0 t0=$SECONDS status
    shift 3
    left=$((budget - (SECONDS - t_start)))
    [ "$left" -lt "$cap" ] && cap=$left
    if [ "$cap" -lt 5 ]; then
        last_status="SKIP: out of time"
        last_seconds=0
        echo "--- $name: skipped, out of time"
        return 0
    fi
    echo "--- $name (limit ${cap} s) -> $out/$log"
    echo "+ $*" > "$out/$log"
    timeout -k 5 "$cap" bash -c 'run_cmd "$@"' run_cmd "$@" >> "$out/$log" 2>&1 || rc=$?
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

# the preflight is cheap and reads no GPU: a dry run runs it for real, after its --help
step preflight 15 preflight.txt python -m benchmarks.gpu_preflight
[ "$dry_run" -eq 1 ] && python -m benchmarks.gpu_preflight >> "$out/preflight.txt" 2>&1
add_row preflight "$(grep -m1 '^preflight:' "$out/preflight.txt" | cut -c12-)"

# shellcheck disable=SC2329  # run through `bash -c`
build_extension() {
    if [ "$dry_run" -eq 1 ]; then
        python -c 'from rlhf_fast import _extension as e; print("sources", *sorted(p.name for p in e.source_dir().iterdir()))'
        return
    fi
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
step build 90 build.log bash -c build_extension
add_row build "$(grep -m1 -E '^(loaded|sources)' "$out/build.log" | cut -c1-100)"

xdist=()
python -c "import xdist" 2>/dev/null && xdist=(-n 8)  # Triton compiles dominate: spread them over CPUs
pytest_cmd=(python -m pytest -q "${xdist[@]}" -p no:cacheprovider --continue-on-collection-errors
            "--device=$device" --durations=15 -rfEs)
tests_figures() {  # tests_figures LOG: pytest's summary line
    grep -E '^(=+ )?[0-9]+ (passed|failed|errors?|skipped|tests? collected)' "$out/$1" | tail -n 1 | tr -d '='
}

# parity first: the test file of every op (tests/test_<op>.py for rlhf_fast/ops/<op>.py)
parity=()
for f in rlhf_fast/ops/[a-z]*.py; do
    t="tests/test_$(basename "$f")"
    [ -e "$t" ] && parity+=("$t")
done
# the sampler's cutoffs and the filtered logprob/KL kernels on CUDA, and ratio 1 / KL 0 in PPO and GRPO with
# every sampling filter on (issue 13): the same property as on CPU, with the CUDA sampler and Triton kernels;
# and the fused training loss the RL updates run (through the Triton ops)
for t in tests/test_sample_cutoffs.py tests/test_filtered_logprobs.py tests/test_fused_linear_kl_divergence_cutoffs.py \
         tests/rlhf/test_policy_space.py tests/test_fused_loss.py; do
    [ -e "$t" ] && parity+=("$t")
done
step parity 200 parity.log "${pytest_cmd[@]}" --junitxml="$out/parity.xml" "${parity[@]}"
add_row parity "$(tests_figures parity.log)"

step ceilings 25 ceilings.log python -m benchmarks.ceilings --quick --device "$device"
add_row ceilings "$(python - <<'EOF' 2>/dev/null
from benchmarks.ceilings import load_ceilings
c = load_ceilings("cuda")
print(f"copy {c['copy_gbps']:.0f} GB/s, bf16 matmul {c['bf16_tflops']:.0f} TFLOP/s" if c else "no result")
EOF
)"

# tuning sets first: the table of every config's time refreshes kernels/*_configs, and the winners it
# caches spare the benches below their own first-call tuning
step tune 60 tune.log python -m benchmarks.tune_check --quick --budget-s 45
add_row tune "$(grep -m1 -o 'results/[^ ]*\.json' "$out/tune.log" || echo 'no JSON written')"

# bench NAME CAP_S: benchmarks/NAME.py in quick mode, with its GPU suite
bench() {
    local name=$1 cap=$2 f="$repo/benchmarks/$1.py" args=()
    grep -q '"--suite"' "$f" && grep -q '"gpu"' "$f" && args+=(--suite gpu)
    grep -q '"--quick"' "$f" && args+=(--quick)
    step "$name" "$cap" "$name.log" python -m "benchmarks.$name" "${args[@]}"
    add_row "$name" "$(grep -m1 -o 'results/[^ ]*\.json' "$out/$name.log" || echo 'no JSON written')"
}
first_benches=(bench_attention bench_logprobs bench_sample)
first_caps=(60 60 45)
for i in "${!first_benches[@]}"; do
    [ -e "benchmarks/${first_benches[$i]}.py" ] && bench "${first_benches[$i]}" "${first_caps[$i]}"
done

# the rest of the suite gets what is left after the other benches' caps
other_benches=()
for f in benchmarks/bench_*.py; do
    name="$(basename "$f" .py)"
    [[ "$name" == *_cpu ]] && continue  # CPU-only comparisons (bench_logprobs_cpu)
    [[ " ${first_benches[*]} " == *" $name "* ]] || other_benches+=("$name")
done
rest=()
for t in tests/test_*.py tests/*/; do
    [[ " ${parity[*]} " == *" $t "* ]] || rest+=("$t")
done
tests_cap=$((budget - (SECONDS - t_start) - 45 * ${#other_benches[@]}))
step tests "$tests_cap" tests.log "${pytest_cmd[@]}" --junitxml="$out/junit.xml" "${rest[@]}"
add_row tests "$(tests_figures tests.log)"

for name in "${other_benches[@]}"; do
    bench "$name" 45
done

{
    echo "GPU check$([ "$dry_run" -eq 1 ] && echo ' (DRY RUN on CPU)'), $(date -u +%Y-%m-%dT%H:%M:%SZ)," \
         "$(grep -m1 '^device:' "$out/env.txt" | cut -c9-), total $((SECONDS - t_start)) s"
    echo
    echo "| step | status | s | figures |"
    echo "|---|---|---|---|"
    printf '%s\n' "${rows[@]}"
} > "$out/summary.md"
echo
cat "$out/summary.md"
exit "$failed"
