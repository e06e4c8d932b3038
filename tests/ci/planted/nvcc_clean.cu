// Compiles cleanly under .ci/nvcc_check.sh's flags: the control for tests/ci/test_nvcc_check.py.
#include <cuda_runtime.h>

__global__ void scale_kernel(float* x, float alpha, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] *= alpha;
}

cudaError_t scale(float* x, float alpha, int n, cudaStream_t stream) {
    const int threads = 256;
    scale_kernel<<<(n + threads - 1) / threads, threads, 0, stream>>>(x, alpha, n);
    return cudaGetLastError();
}
