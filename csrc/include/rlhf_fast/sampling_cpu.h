// CPU port of the sort-free sampler (algorithm in sampling_common.h): rows in parallel with OpenMP,
// one row per thread. The row is tempered once into a float buffer with its masses next to it; the
// radix threshold searches then scan only the candidates that survive each digit.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "rlhf_fast/sampling_common.h"

namespace rlhf_fast {
namespace cpu {

// 16-bit storage types, read as raw bits (the binding passes at::Half / at::BFloat16 data as these).
struct Half16 {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

RLHF_FAST_HOST_DEVICE float to_float(float v) { return v; }
RLHF_FAST_HOST_DEVICE float to_float(BFloat16 v) { return bit_cast<float>(static_cast<uint32_t>(v.bits) << 16); }
RLHF_FAST_HOST_DEVICE float to_float(Half16 v) {
  const uint32_t sign = (static_cast<uint32_t>(v.bits) & 0x8000u) << 16;
  const uint32_t exponent = (v.bits >> 10) & 0x1Fu;
  const uint32_t mantissa = v.bits & 0x3FFu;
  if (exponent == 0x1F) return bit_cast<float>(sign | 0x7F800000u | (mantissa << 13));
  if (exponent == 0) {
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;  // 2^-24
    return sign ? -magnitude : magnitude;
  }
  return bit_cast<float>(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

// Sum of n <= 64 floats in float (vectorized); callers accumulate these partial sums in double.
RLHF_FAST_HOST_DEVICE double block_sum(const float* v, int64_t n) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += v[i];
  return static_cast<double>(sum);
}

// Per-thread scratch for one row.
struct RowScratch {
  std::vector<float> x;          // tempered logits
  std::vector<float> mass;       // exp(x - max)
  std::vector<uint32_t> key;     // order_key(x)
  std::vector<int32_t> cand;     // candidate indices of the radix select
  std::vector<double> hist;      // kHistCopies interleaved histograms of the first digit
  explicit RowScratch(int64_t vocab)
      : x(vocab), mass(vocab), key(vocab), cand(vocab), hist(static_cast<size_t>(kHistCopies) * kRadixBins) {}
  static constexpr int kHistCopies = 4;
};

// What a threshold search found: the key t, and what step 3 needs to cut a tie at t.
struct Threshold {
  uint32_t key;
  double below;   // weight of the tokens with floor_key <= key < t
  double total;   // weight of the tokens with key >= floor_key
  int64_t ties;   // tokens with key t; their indices, ascending, are RowScratch::cand[0, ties)
};

// Smallest key t among tokens with key >= floor_key such that the weight of those with key <= t
// exceeds target_scale * total + target_shift (total = their whole weight). Weight: 1 per token when
// kCount, else its mass. Each digit histograms the surviving candidates, then keeps only its bin.
template <bool kCount>
Threshold radix_threshold(RowScratch& s, int64_t vocab, uint32_t floor_key, double target_scale,
                         double target_shift) {
  double* hist = s.hist.data();
  double below = 0.0, total = 0.0, target = 0.0;
  uint32_t prefix = 0;
  int64_t n = 0;
  for (int digit = 0; digit < kRadixDigits; ++digit) {
    const int shift = radix_shift(digit);
    const uint32_t mask = radix_mask(digit);
    if (digit == 0) {
      // Neighbouring tokens often share a first digit: RowScratch::kHistCopies histograms, token i
      // adding to copy i % kHistCopies, keep the adds to one bin from forming a serial chain.
      constexpr int kCopies = RowScratch::kHistCopies;
      std::fill(hist, hist + kCopies * kRadixBins, 0.0);
      for (int64_t i = 0; i < vocab; ++i) {
        const double w = s.key[i] >= floor_key ? (kCount ? 1.0 : static_cast<double>(s.mass[i])) : 0.0;
        hist[(i % kCopies) * kRadixBins + ((s.key[i] >> shift) & mask)] += w;
      }
      for (uint32_t b = 0; b <= mask; ++b) {
        for (int c = 1; c < kCopies; ++c) hist[b] += hist[c * kRadixBins + b];
        total += hist[b];
      }
      target = target_scale * total + target_shift;
    } else {
      std::fill(hist, hist + mask + 1, 0.0);
      for (int64_t c = 0; c < n; ++c) {
        const int32_t i = s.cand[c];
        hist[(s.key[i] >> shift) & mask] += kCount ? 1.0 : s.mass[i];
      }
    }
    uint32_t chosen = mask + 1, last_nonempty = 0;
    double acc = below;
    for (uint32_t b = 0; b <= mask; ++b) {
      if (hist[b] > 0.0) last_nonempty = b;
      if (chosen > mask && acc + hist[b] > target) {
        chosen = b;
        below = acc;
      }
      acc += hist[b];
    }
    if (chosen > mask) {  // rounding left the target past the total: take the top bin
      chosen = last_nonempty;
      below = acc - hist[chosen];
    }
    prefix |= chosen << shift;
    const uint32_t high_mask = ~((1u << shift) - 1u);  // bits fixed so far
    int64_t kept = 0;
    // Branch-free compaction: always write, advance only on a match (matches are unpredictable).
    if (digit == 0) {
      for (int64_t i = 0; i < vocab; ++i) {
        s.cand[kept] = static_cast<int32_t>(i);
        kept += (s.key[i] >= floor_key) & ((s.key[i] & high_mask) == prefix);
      }
    } else {
      for (int64_t c = 0; c < n; ++c) {
        const int32_t i = s.cand[c];
        s.cand[kept] = i;
        kept += (s.key[i] & high_mask) == prefix;
      }
    }
    n = kept;
  }
  return Threshold{prefix, below, total, n};
}

template <typename T>
void sample_row(const T* in, int64_t row, const SampleArgs& a, RowScratch& s) {
  const int64_t V = a.vocab;
  const RowParams p = row_params(a, row);
  const float t = p.divisor();
  float* x = s.x.data();
  if (a.from_probs) {
    for (int64_t i = 0; i < V; ++i) x[i] = std::log(to_float(in[i])) / t;
  } else {
#pragma omp simd
    for (int64_t i = 0; i < V; ++i) x[i] = to_float(in[i]) / t;
  }
  float x_max = -INFINITY;
  int nans = 0;
#pragma omp simd reduction(max : x_max) reduction(+ : nans)
  for (int64_t i = 0; i < V; ++i) {
    const float v = x[i];
    x_max = v > x_max ? v : x_max;  // NaN never wins
    nans += v != v;
  }
  if (!p.can_sample(x_max, nans > 0)) {
    a.tokens[row] = -1;
    a.logprobs[row] = std::numeric_limits<float>::quiet_NaN();
    write_cutoff(a, row, std::numeric_limits<float>::quiet_NaN(), 0);
    return;
  }
  if (p.greedy()) {
    a.tokens[row] = std::find(x, x + V, x_max) - x;
    a.logprobs[row] = 0.0f;
    write_cutoff(a, row, x_max, a.tokens[row]);
    return;
  }
  float* mass = s.mass.data();
  uint32_t* key = s.key.data();
#pragma omp simd
  for (int64_t i = 0; i < V; ++i) {
    mass[i] = exp_nonpositive(x[i] - x_max);
    key[i] = order_key(x[i]);
  }
  uint32_t threshold = 0;
  if (p.top_k > 0 && p.top_k < V) {
    threshold = radix_threshold<true>(s, V, 0, 1.0, -static_cast<double>(p.top_k)).key;
  }
  const double remove_bound = top_p_remove_bound(p.top_p);
  int64_t tie_removed = 0;  // the first tie_removed tokens of s.cand (tied at the top-p threshold) go
  if (remove_bound > 0.0) {
    const Threshold cut = radix_threshold<false>(s, V, threshold, remove_bound, 0.0);
    threshold = cut.key;
    tie_removed = tie_tokens_removed(cut.below, static_cast<double>(mass[s.cand[0]]), cut.total, remove_bound,
                                     cut.ties);
  }
  // mass >= min_p compares the bits: both are >= 0, where the bit order is the value order, and integer
  // selects vectorize where float compares (which may trap) do not.
  const uint32_t min_p_bits = bit_cast<uint32_t>(p.min_p);
  uint32_t* mass_bits = reinterpret_cast<uint32_t*>(mass);
  if (a.cutoffs == nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < V; ++i) {
      mass_bits[i] &= 0u - static_cast<uint32_t>((key[i] >= threshold) & (mass_bits[i] >= min_p_bits));
    }
  } else {
    // the same mask, and step 6's lowest kept and highest removed keys in the same pass (the tied
    // tokens top-p removes, key == threshold, are still in: counted below)
    uint32_t lowest_kept = 0xFFFFFFFFu, highest_removed = 0u;
#pragma omp simd reduction(min : lowest_kept) reduction(max : highest_removed)
    for (int64_t i = 0; i < V; ++i) {
      const uint32_t kept = static_cast<uint32_t>((key[i] >= threshold) & (mass_bits[i] >= min_p_bits));
      mass_bits[i] &= 0u - kept;
      lowest_kept = std::min(lowest_kept, kept ? key[i] : 0xFFFFFFFFu);
      highest_removed = std::max(highest_removed, kept ? 0u : key[i]);
    }
    if (tie_removed > 0) highest_removed = std::max(highest_removed, threshold);
    const Cutoff cut = gap_cutoff(highest_removed, lowest_kept, tie_removed > 0 ? s.cand[tie_removed] : 0);
    write_cutoff(a, row, cut.value, cut.index);
  }
  for (int64_t c = 0; c < tie_removed; ++c) mass[s.cand[c]] = 0.0f;
  // Z and the running CDF: float sums of 64-token blocks (vectorized), accumulated in double. A float
  // running sum over 10^5 tokens drifts by ~1e-5, which would show in the returned logprob.
  constexpr int64_t kBlock = 64;
  double z = 0.0;
  for (int64_t start = 0; start < V; start += kBlock) z += block_sum(mass + start, std::min(kBlock, V - start));
  // Inverse CDF in index order: skip whole blocks, then scan inside the crossing block.
  const double target = static_cast<double>(row_uniform(a, row)) * z;
  int64_t token = -1, last_positive = 0;
  double running = 0.0;
  for (int64_t start = 0; start < V && token < 0; start += kBlock) {
    const int64_t end = std::min(start + kBlock, V);
    const double block = block_sum(mass + start, end - start);
    if (running + block <= target) {
      running += block;
      for (int64_t i = end - 1; i >= start; --i) {
        if (mass[i] > 0.0f) {
          last_positive = i;
          break;
        }
      }
      continue;
    }
    for (int64_t i = start; i < end; ++i) {
      running += static_cast<double>(mass[i]);
      if (mass[i] > 0.0f) last_positive = i;
      if (running > target) {
        token = i;
        break;
      }
    }
  }
  if (token < 0) token = last_positive;
  a.tokens[row] = token;
  a.logprobs[row] = drawn_logprob(x[token], x_max, z);
}

// Sample every row of `input` ((rows, row_stride) with inner stride 1). Rows run in parallel.
template <typename T>
void sample_rows_typed(const T* input, const SampleArgs& args) {
#pragma omp parallel
  {
    RowScratch scratch(args.vocab);
#pragma omp for schedule(dynamic, 1)
    for (int64_t row = 0; row < args.rows; ++row) {
      sample_row(input + row * args.row_stride, row, args, scratch);
    }
  }
}

// sample_rows_typed for an input of element type `dtype` (host memory).
inline void sample_rows(const void* input, InputDtype dtype, const SampleArgs& args) {
  visit_input<Half16, BFloat16>(input, dtype, [&](const auto* typed) { sample_rows_typed(typed, args); });
}

}  // namespace cpu
}  // namespace rlhf_fast
