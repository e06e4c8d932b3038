// Planted for tests/ci/test_nvcc_check.py: an unused variable in device code, a warning (nvcc #177-D)
// that -Werror all-warnings must turn into a failure.
#include <cuda_runtime.h>

__global__ void scale_kernel(float* x, float alpha, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    int unused = 2 * i;
    if (i < n) x[i] *= alpha;
}
