// Torch binding of the sampler: validate tensors, dispatch on dtype, run the C++ port on CPU tensors or
// the CUDA kernels (csrc/sampling_kernels.cu) on the current stream. Semantics live in
// rlhf_fast/ops/sample.py (Python-side argument checks) and csrc/include/rlhf_fast/sampling_common.h.
#include <torch/extension.h>

#include <tuple>

#include "rlhf_fast/sampling_cpu.h"

#ifdef RLHF_FAST_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "rlhf_fast/sampling_launch.h"
#endif

namespace {

void check_rows(const torch::Tensor& t, const char* name, torch::ScalarType dtype, int64_t rows,
                const torch::Tensor& input) {
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == rows, name, " must have shape (", rows, ",), got ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == input.device(), name, " is on ", t.device(), " but the input is on ",
                    input.device());
}

void check_counter(const torch::Tensor& t, const char* name, const torch::Tensor& input) {
  TORCH_CHECK_VALUE(t.scalar_type() == torch::kInt64 && t.numel() == 1, name,
                    " must be an int64 tensor with one element, got ", t.scalar_type(), " ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == input.device(), name, " is on ", t.device(), " but the input is on ",
                    input.device());
}

rlhf_fast::SampleArgs make_args(const torch::Tensor& x, const torch::Tensor& temperature,
                                const torch::Tensor& top_k, const torch::Tensor& top_p, const torch::Tensor& min_p,
                                const torch::Tensor& seed, const torch::Tensor& offset, bool from_probs,
                                torch::Tensor& tokens, torch::Tensor& logprobs, torch::Tensor& cutoffs) {
  rlhf_fast::SampleArgs args;
  args.rows = x.size(0);
  args.vocab = x.size(1);
  args.row_stride = x.stride(0);
  args.from_probs = from_probs;
  args.temperature = temperature.data_ptr<float>();
  args.top_k = top_k.data_ptr<int64_t>();
  args.top_p = top_p.data_ptr<double>();
  args.min_p = min_p.data_ptr<float>();
  args.seed = seed.data_ptr<int64_t>();
  args.offset = offset.data_ptr<int64_t>();
  args.tokens = tokens.data_ptr<int64_t>();
  args.logprobs = logprobs.data_ptr<float>();
  args.cutoffs = cutoffs.numel() > 0 ? cutoffs.data_ptr<double>() : nullptr;
  return args;
}

rlhf_fast::InputDtype input_dtype(const torch::Tensor& x) {
  switch (x.scalar_type()) {
    case torch::kFloat:
      return rlhf_fast::InputDtype::kFloat32;
    case torch::kHalf:
      return rlhf_fast::InputDtype::kFloat16;
    case torch::kBFloat16:
      return rlhf_fast::InputDtype::kBFloat16;
    default:
      TORCH_CHECK_VALUE(false, "input must be float32, float16 or bfloat16, got ", x.scalar_type());
  }
}

#ifdef RLHF_FAST_WITH_CUDA
void run_cuda(const torch::Tensor& x, const rlhf_fast::SampleArgs& args) {
  const c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const cudaError_t err = rlhf_fast::launch_sample(x.data_ptr(), input_dtype(x), args, stream);
  TORCH_CHECK(err == cudaSuccess, "rlhf_fast sample kernel failed: ", cudaGetErrorString(err));
}
#endif

// (tokens (B,) int64, logprobs (B,) float32, cutoffs (B, 2) float64 with want_cutoffs, else (0, 2));
// rows with invalid input get token -1, logprob NaN and cutoff (NaN, 0).
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> sample(torch::Tensor x, const torch::Tensor& temperature,
                                                               const torch::Tensor& top_k, const torch::Tensor& top_p,
                                                               const torch::Tensor& min_p, const torch::Tensor& seed,
                                                               const torch::Tensor& offset, bool from_probs,
                                                               bool want_cutoffs) {
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) > 0, "input must have shape (B, V) with V > 0, got ", x.sizes());
  TORCH_CHECK_VALUE(x.size(1) < (int64_t{1} << 31), "vocabulary size must be < 2^31, got ", x.size(1));
  if (x.stride(1) != 1) x = x.contiguous();
  const int64_t rows = x.size(0);
  check_rows(temperature, "temperature", torch::kFloat, rows, x);
  check_rows(top_k, "top_k", torch::kInt64, rows, x);
  check_rows(top_p, "top_p", torch::kDouble, rows, x);
  check_rows(min_p, "min_p", torch::kFloat, rows, x);
  check_counter(seed, "seed", x);
  check_counter(offset, "offset", x);
  auto tokens = torch::empty({rows}, x.options().dtype(torch::kInt64));
  auto logprobs = torch::empty({rows}, x.options().dtype(torch::kFloat));
  auto cutoffs = torch::empty({want_cutoffs ? rows : 0, 2}, x.options().dtype(torch::kDouble));
  if (rows == 0) return {tokens, logprobs, cutoffs};
  const auto contiguous = [](const torch::Tensor& t) { return t.contiguous(); };
  const auto t = contiguous(temperature), k = contiguous(top_k), p = contiguous(top_p), m = contiguous(min_p);
  const auto args = make_args(x, t, k, p, m, seed, offset, from_probs, tokens, logprobs, cutoffs);
  if (x.is_cuda()) {
#ifdef RLHF_FAST_WITH_CUDA
    run_cuda(x, args);
#else
    TORCH_CHECK(false, "rlhf_fast was built without CUDA kernels; the input is on ", x.device());
#endif
  } else {
    TORCH_CHECK_VALUE(x.is_cpu(), "input must be on CPU or CUDA, got ", x.device());
    rlhf_fast::cpu::sample_rows(x.data_ptr(), input_dtype(x), args);
  }
  return {tokens, logprobs, cutoffs};
}

bool has_cuda() {
#ifdef RLHF_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

// setup.py's ahead-of-time build defines RLHF_FAST_SOURCE_DIGEST (an identifier: "h" + hex digest of the
// csrc sources); the loader compares it with the sources next to the package and ignores a stale build.
#define RLHF_FAST_STR_(x) #x
#define RLHF_FAST_STR(x) RLHF_FAST_STR_(x)
#ifdef RLHF_FAST_SOURCE_DIGEST
static const char* kSourceDigest = RLHF_FAST_STR(RLHF_FAST_SOURCE_DIGEST);
#else
static const char* kSourceDigest = "";
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rlhf_fast csrc extension: sort-free temperature / top-k / top-p / min-p sampling";
  m.def("sample", &sample,
        "sample(input (B,V), temperature f32 (B,), top_k i64 (B,), top_p f64 (B,), min_p f32 (B,), seed i64 (1,), "
        "offset i64 (1,), from_probs, want_cutoffs) -> (tokens i64 (B,), logprobs f32 (B,), cutoffs f64 (B, 2) "
        "or (0, 2) without want_cutoffs); invalid rows give token -1",
        py::arg("input"), py::arg("temperature"), py::arg("top_k"), py::arg("top_p"), py::arg("min_p"),
        py::arg("seed"), py::arg("offset"), py::arg("from_probs"), py::arg("want_cutoffs") = false);
  m.def("has_cuda", &has_cuda, "True when the module was built with the CUDA kernels");
  m.attr("source_digest") = kSourceDigest;
}
