// Planted for tests/ci/test_nvcc_check.py: a signed/unsigned comparison in host code, which only the
// host compiler warns about (-Wall), so -Xcompiler -Wall,-Werror must turn it into a failure.
#include <cuda_runtime.h>

int count_below(const float* x, int n, unsigned limit) {
    int count = 0;
    for (int i = 0; i < n; ++i) {
        if (i < limit && x[i] < 0.0f) ++count;
    }
    return count;
}
