// Planted for tests/ci/test_nvcc_check.py: a type error (a pointer where a float is expected).
#include <cuda_runtime.h>

__global__ void scale_kernel(float* x, float alpha, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    float y = x;
    if (i < n) x[i] = y * alpha;
}
