// Host launchers of the CUDA sampler (declared in rlhf_fast/sampling_launch.h). Torch-free: CI compiles
// this file alone with `nvcc -arch=sm_90` / `sm_80` and warnings as errors.
#include "rlhf_fast/sampling.cuh"
#include "rlhf_fast/sampling_launch.h"

namespace rlhf_fast {

cudaError_t launch_sample(const void* input, InputDtype dtype, const SampleArgs& args, cudaStream_t stream) {
  switch (dtype) {
    case InputDtype::kFloat32:
      return cuda::launch_sample_typed(static_cast<const float*>(input), args, stream);
    case InputDtype::kFloat16:
      return cuda::launch_sample_typed(static_cast<const __half*>(input), args, stream);
    case InputDtype::kBFloat16:
      return cuda::launch_sample_typed(static_cast<const __nv_bfloat16*>(input), args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace rlhf_fast
