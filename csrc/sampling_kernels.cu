// Host launchers of the CUDA sampler (declared in rlhf_fast/sampling_launch.h). Torch-free: CI compiles
// this file alone with `nvcc -arch=sm_90` / `sm_80` and warnings as errors.
#include "rlhf_fast/sampling.cuh"
#include "rlhf_fast/sampling_launch.h"

namespace rlhf_fast {

cudaError_t launch_sample(const void* input, InputDtype dtype, const SampleArgs& args, cudaStream_t stream) {
  return visit_input<__half, __nv_bfloat16>(
      input, dtype, [&](const auto* typed) { return cuda::launch_sample_typed(typed, args, stream); });
}

}  // namespace rlhf_fast
