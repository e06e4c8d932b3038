// What the CPU (sampling_cpu.h) and CUDA (sampling.cuh) samplers share: the call's arguments and input
// types, a row's parameters and when it can be sampled, the order-preserving float key the radix
// threshold search runs on, the top-p cut's float32 rounding, and the row's uniform and logprob.
//
// The algorithm, per row (no sort):
//   1. x = logits / T in float32 (log(probs) / T for sample_from_probs); max, argmax, NaN / +inf flags.
//   2. top-k: the k-th largest key by a 3-digit (11/11/10-bit) radix select over counts: the smallest
//      key t with #{key <= t} > V - k. Every token with key >= t stays (ties with the k-th value stay).
//   3. top-p: the same select over masses e = exp(x - max) of the tokens top-k kept (exp_nonpositive
//      below, in both samplers): the smallest key t with mass{key <= t} > bound * mass{kept},
//      bound = 1 - top_p as transformers' float32 compare sees it (top_p_remove_bound). This is its "remove the ascending prefix whose cumulative
//      probability is <= 1 - top_p" up to the c tokens tied at t: its sort (taken as stable) puts them
//      in index order, so with S = mass{key < t} / mass{kept} and p the probability of one, the first
//      r = #{j in 1..c : S + j * p <= bound} of them in index order go too (tie_tokens_removed;
//      r < c: the cut lies inside or below the tie, so one always stays).
//   4. min-p: keep e >= min_p (p >= min_p * p_max, as e_max = 1).
//   5. Z = sum of kept e; the token is the first index whose cumulative kept e exceeds u * Z, with u the
//      row's Philox uniform; logprob = (x - max) - log Z.
//   6. Only when the caller asks (SampleArgs::cutoffs): the row's kept set as a cutoff (t, i), token v
//      kept <=> x_v > t or (x_v == t and v >= i). Each filter keeps an upper set in (x, index) order,
//      so the kept set is one; t lies in its gap, between the highest removed and the lowest kept x
//      (a min and a max over the keys), i = 0; when top-p's r > 0 removed part of a tie, t is the
//      tied value and i the index of tied token r + 1 (gap_cutoff). Nothing removed: (-inf, 0);
//      greedy rows (x_max, argmax).
// A row whose input or parameters are invalid gets token -1, logprob NaN and cutoff (NaN, 0).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "rlhf_fast/philox.h"

namespace rlhf_fast {

// One call of the sampler. Per-row parameters are arrays of `rows` elements; seed and offset point to
// one int64 each (device memory for the CUDA kernels, so a CUDA graph can replay the call).
struct SampleArgs {
  int64_t rows = 0;
  int64_t vocab = 0;
  int64_t row_stride = 0;        // elements between rows of the input; the inner stride is 1
  bool from_probs = false;       // the input holds probabilities: x = log(p) / T
  const float* temperature = nullptr;  // 0 = greedy
  const int64_t* top_k = nullptr;      // 0 = off
  const double* top_p = nullptr;       // 1 = off
  const float* min_p = nullptr;        // 0 = off
  const int64_t* seed = nullptr;
  const int64_t* offset = nullptr;
  int64_t* tokens = nullptr;           // (rows,) output
  float* logprobs = nullptr;           // (rows,) output
  double* cutoffs = nullptr;           // (rows, 2) output (t, i) of step 6; nullptr: not computed
};

// One row's parameters (meanings and "off" values as in SampleArgs).
struct RowParams {
  float temperature;
  int64_t top_k;
  double top_p;
  float min_p;

  RLHF_FAST_HOST_DEVICE bool greedy() const { return temperature == 0.0f; }
  // What step 1 divides by: greedy rows take the argmax of the raw input.
  RLHF_FAST_HOST_DEVICE float divisor() const { return greedy() ? 1.0f : temperature; }
  // Whether the row gets a token: parameters in range, and tempered input without NaN whose maximum
  // x_max is finite (a row of -inf or with +inf has no distribution).
  RLHF_FAST_HOST_DEVICE bool can_sample(float x_max, bool any_nan) const {
    return !any_nan && x_max > -INFINITY && x_max < INFINITY && temperature >= 0.0f && top_k >= 0 &&
           top_p > 0.0 && top_p <= 1.0 && min_p >= 0.0f && min_p < 1.0f;
  }
};

RLHF_FAST_HOST_DEVICE RowParams row_params(const SampleArgs& args, int64_t row) {
  return RowParams{args.temperature[row], args.top_k[row], args.top_p[row], args.min_p[row]};
}

// The row's uniform in [0, 1) for the draw (step 5).
RLHF_FAST_HOST_DEVICE float row_uniform(const SampleArgs& args, int64_t row) {
  return philox_row_uniform(static_cast<uint64_t>(*args.seed), static_cast<uint64_t>(*args.offset),
                            static_cast<uint64_t>(row));
}

// logprob of the drawn token (step 5): (x - x_max) - log z, rounded to float32 once.
RLHF_FAST_HOST_DEVICE float drawn_logprob(float x, float x_max, double z) {
  return static_cast<float>(static_cast<double>(x - x_max) - std::log(z));
}

// Step 6: writes the row's cutoff (value, index) when the caller asked for cutoffs.
RLHF_FAST_HOST_DEVICE void write_cutoff(const SampleArgs& args, int64_t row, float value, int64_t index) {
  if (args.cutoffs == nullptr) return;
  args.cutoffs[2 * row] = static_cast<double>(value);
  args.cutoffs[2 * row + 1] = static_cast<double>(index);
}

// The input's element type. The CPU and CUDA paths store 16-bit floats in their own types, named by
// visit_input's Half and BFloat16.
enum class InputDtype { kFloat32, kFloat16, kBFloat16 };

// f(input as const T*) for T the storage type of `dtype`; returns what f returns.
template <typename Half, typename BFloat16, typename F>
auto visit_input(const void* input, InputDtype dtype, F&& f) {
  switch (dtype) {
    case InputDtype::kFloat16:
      return f(static_cast<const Half*>(input));
    case InputDtype::kBFloat16:
      return f(static_cast<const BFloat16*>(input));
    case InputDtype::kFloat32:
      break;
  }
  return f(static_cast<const float*>(input));
}

constexpr int kRadixDigits = 3;
constexpr int kRadixBins = 2048;  // the widest digit (11 bits)

RLHF_FAST_HOST_DEVICE int radix_shift(int digit) { return digit == 0 ? 21 : (digit == 1 ? 10 : 0); }
RLHF_FAST_HOST_DEVICE uint32_t radix_mask(int digit) { return digit == 2 ? 0x3FFu : 0x7FFu; }

// The bits of `from` read as a To (C++20's std::bit_cast), host and device: a memcpy of a local, which
// compilers (nvcc too) turn into a register move.
template <typename To, typename From>
RLHF_FAST_HOST_DEVICE To bit_cast(From from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast needs types of the same size");
  To to;
  std::memcpy(&to, &from, sizeof(to));
  return to;
}

// Unsigned key with the order of the float (-inf lowest); -0 and +0 get the same key, as they compare equal.
RLHF_FAST_HOST_DEVICE uint32_t order_key(float f) {
  const uint32_t bits = bit_cast<uint32_t>(f + 0.0f);
  const uint32_t flip = static_cast<uint32_t>(static_cast<int32_t>(bits) >> 31) | 0x80000000u;
  return bits ^ flip;  // negative: all bits flipped; positive: sign bit set
}

// The float whose order_key is `key` (+0 for the key of zero).
RLHF_FAST_HOST_DEVICE float key_to_float(uint32_t key) {
  return bit_cast<float>((key & 0x80000000u) ? (key ^ 0x80000000u) : ~key);
}

// Step 6's cutoff of a sampled row from the keys of its highest removed token (0: none removed) and
// its lowest kept one: t in the gap between them, their midpoint rounded to float32 (lo when that
// rounds down to hi), so logits recomputed within half the gap keep the same set; i = 0. When the
// two are equal (the top-p cut split a tie), t = that value and i = tie_index, the first tied token
// kept. Nothing removed but -inf: (-inf, 0), every token.
struct Cutoff {
  float value;
  int64_t index;
};
RLHF_FAST_HOST_DEVICE Cutoff gap_cutoff(uint32_t highest_removed_key, uint32_t lowest_kept_key, int64_t tie_index) {
  const float hi = highest_removed_key == 0u ? -INFINITY : key_to_float(highest_removed_key);
  if (hi == -INFINITY) return Cutoff{-INFINITY, 0};
  const float lo = key_to_float(lowest_kept_key);
  if (highest_removed_key == lowest_kept_key) return Cutoff{lo, tie_index};
  const float mid = static_cast<float>((static_cast<double>(hi) + static_cast<double>(lo)) * 0.5);
  return Cutoff{mid > hi ? mid : lo, 0};
}

// Float multiply, add and subtract each rounded on its own, never fused into an FMA: nvcc fuses a * b + c
// by default (-fmad=true), which would round exp_nonpositive differently on the device than on the host
// (x86-64 builds without -mfma never fuse; a host compiler that may fuse needs -ffp-contract=off).
RLHF_FAST_HOST_DEVICE float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
RLHF_FAST_HOST_DEVICE float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
RLHF_FAST_HOST_DEVICE float sub_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

// exp(x) for x <= 0 with ~1 ulp error (Cephes expf), the one exp of both samplers (steps 3-5): the CPU
// port and the CUDA kernel compute every mass with it, bit for bit the same, so they draw the same
// tokens by construction (CUDA's expf differs from it by up to 2 ulp). x < -87 gives 0 (exp < 1.7e-38).
// The range checks are integer compares on the float's bits: GCC will not if-convert float compares
// (they may trap), and the CPU loop must vectorize.
RLHF_FAST_HOST_DEVICE float exp_nonpositive(float x) {
  constexpr uint32_t kMinus87 = 0xC2AE0000u;  // bits of -87.0f; larger bits = more negative
  const uint32_t bits = bit_cast<uint32_t>(x);
  const uint32_t in_range = 0u - static_cast<uint32_t>(bits <= kMinus87);  // all ones unless x < -87
  const uint32_t clamped_bits = bits <= kMinus87 ? bits : kMinus87;
  const float xc = bit_cast<float>(clamped_bits);
  const float n = sub_rn(add_rn(mul_rn(xc, 1.44269504088896341f), 12582912.0f), 12582912.0f);  // round to nearest
  float r = sub_rn(xc, mul_rn(n, 0.693359375f));
  r = sub_rn(r, mul_rn(n, -2.12194440e-4f));
  float y = 1.9875691500e-4f;
  y = add_rn(mul_rn(y, r), 1.3981999507e-3f);
  y = add_rn(mul_rn(y, r), 8.3334519073e-3f);
  y = add_rn(mul_rn(y, r), 4.1665795894e-2f);
  y = add_rn(mul_rn(y, r), 1.6666665459e-1f);
  y = add_rn(mul_rn(y, r), 5.0000001201e-1f);
  y = add_rn(add_rn(mul_rn(y, mul_rn(r, r)), r), 1.0f);
  const float scale = bit_cast<float>(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
  return bit_cast<float>(bit_cast<uint32_t>(mul_rn(y, scale)) & in_range);
}

// How many of the `ties` tokens tied at the top-p threshold go (step 3): #{j in 1..ties : S + j * p
// <= bound}, at most ties - 1, with S = below / total and p = float32(each / total): one tied token's
// probability rounded as transformers' float32 softmax rounds it, which decides the cut when the sums
// meet the bound exactly (a uniform row and a round top_p). below: kept mass under the tie; each: the
// mass of one tied token (> 0); total: the kept mass; bound: top_p_remove_bound.
RLHF_FAST_HOST_DEVICE int64_t tie_tokens_removed(double below, double each, double total, double bound,
                                                 int64_t ties) {
  const double p = static_cast<double>(static_cast<float>(each / total));
  const double s = below / total;
  if (ties <= 1 || !(s + p <= bound)) return 0;
  const double guess = (bound - s) / p;
  int64_t r = guess >= static_cast<double>(ties - 1) ? ties - 1 : static_cast<int64_t>(guess);
  // The division rounds: settle r on the sums the definition compares.
  while (r > 0 && s + static_cast<double>(r) * p > bound) --r;
  while (r < ties - 1 && s + static_cast<double>(r + 1) * p <= bound) ++r;
  return r;
}

// The top-p cut in the float32 arithmetic of transformers: float32 cumulative_probs <= R = float32(1 -
// top_p), where torch's CPU cumsum rounds each exact (double-accumulated) prefix sum to float32. A sum c
// rounds to at most R exactly when c <= R + ulp(R) / 2 (the midpoint goes to the even neighbour), so
// this returns that bound on the cumulative probability; 0 when R is 0 (top_p = 1: nothing goes).
RLHF_FAST_HOST_DEVICE double top_p_remove_bound(double top_p) {
  const float r = static_cast<float>(1.0 - top_p);
  if (!(r > 0.0f)) return 0.0;
  const uint32_t bits = bit_cast<uint32_t>(r);
  const float up = bit_cast<float>(bits + 1);
  const double mid = 0.5 * (static_cast<double>(r) + static_cast<double>(up));  // exact: 25 significant bits
  // R even: the midpoint rounds down to R, so it counts; R odd: it rounds up, so take the double below.
  return (bits & 1u) == 0 ? mid : bit_cast<double>(bit_cast<uint64_t>(mid) - 1);
}

}  // namespace rlhf_fast
