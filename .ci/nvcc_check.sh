#!/usr/bin/env bash
# CI layer 3: compile every .cu in csrc/ for sm_90 and sm_80 with all warnings as errors.
#
#   .ci/nvcc_check.sh [FILE.cu ...]     (default: every csrc/**/*.cu)
#
# Each file is compiled once with both -gencode targets (the host pass, the slow part when a binding
# includes torch headers, then runs once), include path csrc/include. torch's and Python's headers
# come in as -isystem so that bindings compile and warnings in third-party headers are not ours.
# Env: NVCC (default: nvcc on PATH), NVCC_ARCHS (default "90 80"), JOBS (parallel files, default 2).
# Exit status: 0 all files compile cleanly, 1 any file fails, 2 nvcc missing or nothing to compile.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
nvcc="${NVCC:-nvcc}"
archs="${NVCC_ARCHS:-90 80}"
jobs="${JOBS:-2}"

if ! command -v "$nvcc" >/dev/null 2>&1; then
    echo "nvcc_check: nvcc not found (NVCC=$nvcc): install the CUDA toolkit (>= 12) or set NVCC" >&2
    exit 2
fi

if [ "$#" -gt 0 ]; then
    files=("$@")
else
    mapfile -t files < <(find "$repo/csrc" -name '*.cu' | sort)
fi
if [ "${#files[@]}" -eq 0 ]; then
    echo "nvcc_check: no .cu files under $repo/csrc: nothing to compile" >&2
    exit 2
fi

gencode=()
for a in $archs; do gencode+=(-gencode "arch=compute_$a,code=sm_$a"); done
sys_includes=()
if py_includes="$(python -c 'import sysconfig; from torch.utils.cpp_extension import include_paths
print("\n".join(include_paths() + [sysconfig.get_paths()["include"]]))' 2>/dev/null)"; then
    while IFS= read -r d; do sys_includes+=(-isystem "$d"); done <<< "$py_includes"
else
    echo "nvcc_check: torch not importable: compiling without torch headers" >&2
fi

# shellcheck disable=SC2054  # -Wall,-Werror is one host-compiler argument list, not two elements
flags=(-c -std=c++17 -O3 --expt-relaxed-constexpr -DRLHF_FAST_WITH_CUDA=1 "${gencode[@]}"
       -Werror all-warnings -Xcompiler -Wall,-Werror -I "$repo/csrc/include" "${sys_includes[@]}")
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "nvcc_check: $("$nvcc" --version | tail -n 1), archs: $archs, ${#files[@]} file(s), $jobs job(s)"
compile() {  # compile FILE INDEX: writes $tmp/INDEX.log and $tmp/INDEX.rc
    local start=$SECONDS rc=0
    "$nvcc" "${flags[@]}" "$1" -o "$tmp/$2.o" > "$tmp/$2.log" 2>&1 || rc=$?
    echo "$rc $((SECONDS - start))" > "$tmp/$2.rc"
}
for i in "${!files[@]}"; do
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n || true; done
    compile "${files[$i]}" "$i" &
done
wait

failed=0
for i in "${!files[@]}"; do
    read -r rc secs < "$tmp/$i.rc"
    name="${files[$i]#"$repo"/}"
    if [ "$rc" -eq 0 ]; then
        echo "  ok    $name (${secs} s)"
    else
        failed=$((failed + 1))
        echo "  FAIL  $name (${secs} s, nvcc exit $rc):"
        sed 's/^/        /' "$tmp/$i.log"
    fi
done
echo "nvcc_check: $(( ${#files[@]} - failed ))/${#files[@]} ok"
[ "$failed" -eq 0 ]
