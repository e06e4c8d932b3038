// Host launchers of the CUDA sampler, defined in csrc/sampling_kernels.cu (torch-free; nvcc only).
// The torch binding (csrc/sampling.cpp) includes this header from plain C++.
#pragma once

#include <cuda_runtime_api.h>

#include "rlhf_fast/sampling_common.h"

namespace rlhf_fast {

// Launch one block per row of `input` ((args.rows, args.row_stride), inner stride 1, device memory) on
// `stream`. All pointers in `args` are device pointers. Returns the launch error, if any.
cudaError_t launch_sample(const void* input, InputDtype dtype, const SampleArgs& args, cudaStream_t stream);

}  // namespace rlhf_fast
