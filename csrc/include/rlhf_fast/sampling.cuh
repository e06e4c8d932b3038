// CUDA sampler: one block per row, sort-free (algorithm in sampling_common.h). No torch include.
//
// Passes over the row (16-byte vector loads when the row is aligned): 1 for max / argmax / checks,
// 3 per active threshold search (top-k counts, top-p masses), 1 for the kept mass Z, and the draw,
// which stops at the tile where the cumulative mass crosses u * Z. When top-k keeps at most
// kCandidates tokens, one more pass gathers them (in index order) into shared memory and top-p, Z and
// the draw run there: top-k + top-p reads the row 5 times, top-p alone at most 6. Cutoffs (step 6),
// when asked for, add no pass unless top-p splits a tie: then one ranks the tied tokens again.
// Histograms are 2048 bins in shared memory, accumulated as integers (masses in 2^-40 fixed point) so
// the result never depends on the order of atomics: the same (seed, offset) gives the same tokens on
// every run.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cmath>
#include <cstdint>

#include "rlhf_fast/sampling_common.h"

namespace rlhf_fast {
namespace cuda {

constexpr int kThreads = 512;
constexpr int kUnroll = 4;  // 16-byte loads in flight per thread in the streaming passes
constexpr int kBinsPerThread = kRadixBins / kThreads;
constexpr int kCandidates = 2048;  // shared-memory capacity for the tokens top-k keeps
constexpr float kMassScale = 1099511627776.0f;  // 2^40: fixed-point unit of the mass histograms

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

struct ArgMax {
  float value;
  int64_t index;
};

struct ArgMaxOp {
  __device__ __forceinline__ ArgMax operator()(const ArgMax& a, const ArgMax& b) const {
    if (a.value > b.value || (a.value == b.value && a.index < b.index)) return a;
    return b;
  }
};

struct MaxOp {
  __device__ __forceinline__ int64_t operator()(int64_t a, int64_t b) const { return a > b ? a : b; }
};

struct MinOp {
  __device__ __forceinline__ int64_t operator()(int64_t a, int64_t b) const { return a < b ? a : b; }
};

// The row in global memory. Element i belongs to thread (i / kVec) % kThreads within tile
// i / (kVec * kThreads) (then a scalar tail), each thread's kLanes elements contiguous: tile order,
// then thread order, then lane order is index order. Values are handed out tempered: x = raw / T
// (log(raw) / T for probabilities).
template <typename T, int kVec>
struct RowView {
  static constexpr int kLanes = kVec;
  const T* row;
  int64_t vocab;
  float temperature;
  bool from_probs;

  __device__ __forceinline__ float temper(float raw) const { return (from_probs ? logf(raw) : raw) / temperature; }
  __device__ __forceinline__ int64_t packs() const { return kVec > 1 ? vocab / kVec : 0; }
  __device__ __forceinline__ void load_pack(int64_t q, float* out) const {
    if constexpr (kVec > 1) {
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(row) + q);
      const T* lanes = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int j = 0; j < kVec; ++j) out[j] = to_float(lanes[j]);
    } else {
      out[0] = to_float(row[q]);
    }
  }
  // Calls f(index, x) for every element; each thread sees its own elements in increasing index order.
  template <typename F>
  __device__ __forceinline__ void for_each(F&& f) const {
    const int64_t n_packs = packs();
    int64_t q = threadIdx.x;
    // kUnroll loads in flight per thread before any is used: one block per row must keep enough
    // bytes in flight to approach the SM's share of HBM bandwidth.
    for (; q + (kUnroll - 1) * kThreads < n_packs; q += kUnroll * kThreads) {
      float v[kUnroll][kVec];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) load_pack(q + u * kThreads, v[u]);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
        for (int j = 0; j < kVec; ++j) f((q + u * kThreads) * kVec + j, temper(v[u][j]));
      }
    }
    for (; q < n_packs; q += kThreads) {
      float v[kVec];
      load_pack(q, v);
#pragma unroll
      for (int j = 0; j < kVec; ++j) f(q * kVec + j, temper(v[j]));
    }
    for (int64_t i = n_packs * kVec + threadIdx.x; i < vocab; i += kThreads) f(i, temper(to_float(row[i])));
  }
  __device__ __forceinline__ int64_t tiles() const {
    const int64_t n_packs = packs();
    return (n_packs + kThreads - 1) / kThreads + (vocab - n_packs * kVec + kThreads - 1) / kThreads;
  }
  // This thread's part of tile `tile`: `lanes` (0..kLanes) tempered values from index `first` on.
  __device__ __forceinline__ void load_tile(int64_t tile, float* x, int64_t* first, int* lanes) const {
    const int64_t n_packs = packs();
    const int64_t pack_tiles = (n_packs + kThreads - 1) / kThreads;
    if (tile < pack_tiles) {
      const int64_t q = tile * kThreads + threadIdx.x;
      *first = q * kVec;
      *lanes = q < n_packs ? kVec : 0;
      if (*lanes) load_pack(q, x);
    } else {
      *first = n_packs * kVec + (tile - pack_tiles) * kThreads + threadIdx.x;
      *lanes = *first < vocab ? 1 : 0;
      if (*lanes) x[0] = to_float(row[*first]);
    }
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      if (j < *lanes) x[j] = temper(x[j]);
    }
  }
  __device__ __forceinline__ float x_at(int64_t position) const { return temper(to_float(row[position])); }
  __device__ __forceinline__ int64_t token_at(int64_t position) const { return position; }
};

// The tokens top-k kept, gathered into shared memory in index order: tempered values and token ids.
struct CandidateView {
  static constexpr int kLanes = 1;
  const float* x;
  const int32_t* index;
  int64_t count;

  template <typename F>
  __device__ __forceinline__ void for_each(F&& f) const {
    for (int64_t p = threadIdx.x; p < count; p += kThreads) f(p, x[p]);
  }
  __device__ __forceinline__ int64_t tiles() const { return (count + kThreads - 1) / kThreads; }
  __device__ __forceinline__ void load_tile(int64_t tile, float* out, int64_t* first, int* lanes) const {
    *first = tile * kThreads + threadIdx.x;
    *lanes = *first < count ? 1 : 0;
    if (*lanes) out[0] = x[*first];
  }
  __device__ __forceinline__ float x_at(int64_t position) const { return x[position]; }
  __device__ __forceinline__ int64_t token_at(int64_t position) const { return index[position]; }
};

struct SharedState {
  union {
    typename cub::BlockReduce<ArgMax, kThreads>::TempStorage argmax;
    typename cub::BlockReduce<double, kThreads>::TempStorage sum;
    typename cub::BlockReduce<int64_t, kThreads>::TempStorage index;
    typename cub::BlockScan<unsigned long long, kThreads>::TempStorage scan_u64;
    typename cub::BlockScan<double, kThreads>::TempStorage scan_f64;
    typename cub::BlockScan<int, kThreads>::TempStorage scan_i32;
  } cub;
  unsigned long long hist[kRadixBins];
  float candidate_x[kCandidates];
  int32_t candidate_index[kCandidates];
  float x_max;
  double z;
  int64_t argmax;
  int64_t position;
  int64_t last_positive;
  int64_t tie_index;  // step 6: the first token top-p keeps of those tied at its threshold
  unsigned long long below;
  unsigned long long at;
  unsigned int chosen;
  unsigned int last_nonempty;
  int bad;
};

// What a threshold search found (the same in every thread): the key t, and what step 3 needs to cut
// a tie at t. Weights are counts or fixed-point masses, as the search ran.
struct Threshold {
  uint32_t key;
  unsigned long long below;  // weight of the keys in [floor_key, t): for counts, the tokens top-k removes
  unsigned long long at;     // weight of the keys equal to t
  unsigned long long total;  // weight of the keys >= floor_key
};

// Smallest key t (among keys >= floor_key) whose weight at or below t exceeds target_scale * total +
// target_shift; weight 1 per token when kCount, else its mass exp(x - max) in fixed point.
template <bool kCount, typename View>
__device__ Threshold radix_threshold(const View& view, float x_max, uint32_t floor_key, double target_scale,
                                     double target_shift, SharedState& s) {
  uint32_t prefix = 0, high_mask = 0;
  unsigned long long below = 0, at = 0, total_weight = 0;
  double target = 0.0;
  for (int digit = 0; digit < kRadixDigits; ++digit) {
    const int shift = radix_shift(digit);
    const uint32_t mask = radix_mask(digit);
    for (int b = threadIdx.x; b < kRadixBins; b += kThreads) s.hist[b] = 0;
    if (threadIdx.x == 0) {
      s.chosen = 0xFFFFFFFFu;
      s.last_nonempty = 0;
    }
    __syncthreads();
    view.for_each([&](int64_t, float x) {
      const uint32_t key = order_key(x);
      if (key >= floor_key && (key & high_mask) == prefix) {
        const unsigned long long w = kCount ? 1ull : __float2ull_rn(exp_nonpositive(x - x_max) * kMassScale);
        atomicAdd(&s.hist[(key >> shift) & mask], w);
      }
    });
    __syncthreads();
    unsigned long long own[kBinsPerThread];
    unsigned long long own_sum = 0;
#pragma unroll
    for (int j = 0; j < kBinsPerThread; ++j) {
      const int b = threadIdx.x * kBinsPerThread + j;
      own[j] = b <= static_cast<int>(mask) ? s.hist[b] : 0ull;
      own_sum += own[j];
    }
    unsigned long long excl, total;
    cub::BlockScan<unsigned long long, kThreads>(s.cub.scan_u64).ExclusiveSum(own_sum, excl, total);
    if (digit == 0) {
      total_weight = total;
      target = target_scale * static_cast<double>(total) + target_shift;
    }
    unsigned long long acc = below + excl;
#pragma unroll
    for (int j = 0; j < kBinsPerThread; ++j) {
      const unsigned int b = threadIdx.x * kBinsPerThread + j;
      if (own[j] > 0) atomicMax(&s.last_nonempty, b);
      if (static_cast<double>(acc) <= target && static_cast<double>(acc + own[j]) > target) atomicMin(&s.chosen, b);
      acc += own[j];
    }
    __syncthreads();
    if (threadIdx.x == 0 && s.chosen == 0xFFFFFFFFu) s.chosen = s.last_nonempty;  // rounding: take the top bin
    __syncthreads();
    const unsigned int chosen = s.chosen;
    acc = below + excl;
#pragma unroll
    for (int j = 0; j < kBinsPerThread; ++j) {
      if (threadIdx.x * kBinsPerThread + j == chosen) {
        s.below = acc;
        s.at = own[j];
      }
      acc += own[j];
    }
    __syncthreads();
    below = s.below;
    at = s.at;
    prefix |= chosen << shift;
    high_mask |= mask << shift;
    __syncthreads();
  }
  return Threshold{prefix, below, at, total_weight};
}

// Calls f(x, first, lanes) for the tiles of `view` in index order until f returns false: x holds
// this thread's part of the tile, `lanes` tempered values from index `first` on (View::load_tile).
template <typename View, typename F>
__device__ __forceinline__ void for_each_tile(const View& view, F&& f) {
  const int64_t n_tiles = view.tiles();
  for (int64_t tile = 0; tile < n_tiles; ++tile) {
    float x[View::kLanes];
    int64_t first;
    int lanes;
    view.load_tile(tile, x, &first, &lanes);
    if (!f(x, first, lanes)) break;
  }
}

// Numbers the tile's values where pred(x) holds in index order from `base` across the block: calls
// on_match(lane, number) for each of this thread's, then returns how many the tile has (every thread).
template <int kLanes, typename Pred, typename OnMatch>
__device__ __forceinline__ int number_matches(const float* x, int lanes, int64_t base, Pred pred,
                                              OnMatch on_match, SharedState& s) {
  int own = 0;
#pragma unroll
  for (int j = 0; j < kLanes; ++j) own += (j < lanes && pred(x[j])) ? 1 : 0;
  int excl, tile_count;
  cub::BlockScan<int, kThreads>(s.cub.scan_i32).ExclusiveSum(own, excl, tile_count);
  int64_t number = base + excl;
#pragma unroll
  for (int j = 0; j < kLanes; ++j) {
    if (j < lanes && pred(x[j])) on_match(j, number++);
  }
  __syncthreads();  // the scan storage is reused, and on_match may have written shared memory
  return tile_count;
}

// Copies the tokens with key >= threshold into shared memory, in index order (an ordered stream
// compaction, tile by tile). The caller guarantees they fit. With highest_below, also the highest key
// below threshold there (0 if none; thread 0's value is the block's, the others' their own part).
template <typename View>
__device__ int64_t gather_candidates(const View& view, uint32_t threshold, SharedState& s,
                                     int64_t* highest_below) {
  int64_t count = 0, highest = 0;
  for_each_tile(view, [&](const float* x, int64_t first, int lanes) {
    if (highest_below != nullptr) {
#pragma unroll
      for (int j = 0; j < View::kLanes; ++j) {
        const int64_t key = j < lanes ? static_cast<int64_t>(order_key(x[j])) : 0;
        if (key < threshold && key > highest) highest = key;
      }
    }
    count += number_matches<View::kLanes>(
        x, lanes, count, [&](float v) { return order_key(v) >= threshold; },
        [&](int j, int64_t slot) {
          s.candidate_x[slot] = x[j];
          s.candidate_index[slot] = static_cast<int32_t>(first + j);
        },
        s);
    return true;
  });
  if (highest_below != nullptr) {
    *highest_below = cub::BlockReduce<int64_t, kThreads>(s.cub.index).Reduce(highest, MaxOp());
    if (threadIdx.x != 0) *highest_below = highest;
    __syncthreads();
  }
  return count;
}

// The token of rank `rank` (0-based, index order) among those of `view` with key `key` (step 6's
// tie index; the caller guarantees it exists): read by every thread. Scans tiles until it is found.
template <typename View>
__device__ int64_t nth_token_with_key(const View& view, uint32_t key, int64_t rank, SharedState& s) {
  int64_t seen = 0;
  for_each_tile(view, [&](const float* x, int64_t first, int lanes) {
    seen += number_matches<View::kLanes>(
        x, lanes, seen, [&](float v) { return order_key(v) == key; },
        [&](int j, int64_t r) {
          if (r == rank) s.tie_index = view.token_at(first + j);
        },
        s);
    return seen <= rank;
  });
  return s.tie_index;  // number_matches ended with a barrier
}

// Top-p over `view` (tokens with key >= threshold), then min-p, Z and the inverse-CDF draw; writes
// the row's token and logprob, and its cutoff (step 6) when args.cutoffs is set, for which
// removed_outside is the highest key of the row's tokens that `view` leaves out (0: none).
template <typename View>
__device__ void filter_and_draw(const View& view, uint32_t threshold, const RowParams& p, float x_max,
                                const SampleArgs& args, int64_t row, SharedState& s, int64_t removed_outside) {
  const float min_p = p.min_p;
  const double remove_bound = top_p_remove_bound(p.top_p);
  // The first tie_removed tokens (in index order) with key tie_key, tied at the top-p threshold, go.
  uint32_t tie_key = 0;
  int64_t tie_removed = 0;
  float tie_mass = 0.0f;
  if (remove_bound > 0.0) {
    const Threshold cut = radix_threshold<false>(view, x_max, threshold, remove_bound, 0.0, s);
    threshold = tie_key = cut.key;
    tie_mass = exp_nonpositive(key_to_float(cut.key) - x_max);  // bit for bit what kept_mass gives a tied token
    const unsigned long long each = __float2ull_rn(tie_mass * kMassScale);  // > 0: the chosen bin has weight
    tie_removed = (tie_mass >= min_p && each > 0)
                      ? tie_tokens_removed(static_cast<double>(cut.below), static_cast<double>(each),
                                           static_cast<double>(cut.total), remove_bound,
                                           static_cast<int64_t>(cut.at / each))
                      : 0;
  }
  const auto kept_mass = [&](float x) {
    const float e = exp_nonpositive(x - x_max);
    return (order_key(x) >= threshold && e >= min_p) ? e : 0.0f;
  };

  // Z and the last position with positive kept mass (the draw's fallback when rounding overshoots).
  // Z and the running CDF accumulate in double: float sums over 10^5 tokens drift by ~1e-5, which
  // would show in the returned logprob.
  // With cutoffs, also step 6's lowest kept and highest removed keys (the removed tied tokens: below).
  const bool want_cutoff = args.cutoffs != nullptr;
  double z_part = 0.0;
  int64_t last = -1;
  int64_t lowest_kept = 0xFFFFFFFFll, highest_removed = removed_outside;
  view.for_each([&](int64_t i, float x) {
    const float e = kept_mass(x);
    z_part += static_cast<double>(e);
    if (e > 0.0f) last = i > last ? i : last;
    if (want_cutoff) {
      const int64_t key = order_key(x);
      if (key >= threshold && exp_nonpositive(x - x_max) >= min_p) {
        lowest_kept = key < lowest_kept ? key : lowest_kept;
      } else {
        highest_removed = key > highest_removed ? key : highest_removed;
      }
    }
  });
  const double z = cub::BlockReduce<double, kThreads>(s.cub.sum).Sum(z_part) -
                   static_cast<double>(tie_removed) * static_cast<double>(tie_mass);
  __syncthreads();
  const int64_t last_all = cub::BlockReduce<int64_t, kThreads>(s.cub.index).Reduce(last, MaxOp());
  if (want_cutoff) {  // the results are thread 0's
    __syncthreads();
    lowest_kept = cub::BlockReduce<int64_t, kThreads>(s.cub.index).Reduce(lowest_kept, MinOp());
    __syncthreads();
    highest_removed = cub::BlockReduce<int64_t, kThreads>(s.cub.index).Reduce(highest_removed, MaxOp());
    if (tie_removed > 0 && highest_removed < static_cast<int64_t>(tie_key)) highest_removed = tie_key;
  }
  if (threadIdx.x == 0) {
    s.z = z;
    s.last_positive = last_all;
    s.position = INT64_MAX;
  }
  __syncthreads();
  const double z_row = s.z;
  const double target = static_cast<double>(row_uniform(args, row)) * z_row;

  // Inverse CDF in index order, one tile at a time; stops at the tile where the mass crosses target.
  // Until tie_removed tied tokens have gone by, a block-wide prefix count ranks the tied ones.
  double running = 0.0;
  int64_t ties_seen = 0;
  for_each_tile(view, [&](float* m, int64_t first, int lanes) {
    bool dropped[View::kLanes] = {};
    if (ties_seen < tie_removed) {  // the same in every thread
      ties_seen += number_matches<View::kLanes>(
          m, lanes, ties_seen, [&](float v) { return order_key(v) == tie_key; },
          [&](int j, int64_t rank) { dropped[j] = rank < tie_removed; }, s);
    }
    double own = 0.0;
#pragma unroll
    for (int j = 0; j < View::kLanes; ++j) {
      m[j] = (j < lanes && !dropped[j]) ? kept_mass(m[j]) : 0.0f;
      own += static_cast<double>(m[j]);
    }
    double excl, tile_sum;
    cub::BlockScan<double, kThreads>(s.cub.scan_f64).ExclusiveSum(own, excl, tile_sum);
    if (running + tile_sum > target) {
      double c = running + excl;
#pragma unroll
      for (int j = 0; j < View::kLanes; ++j) {
        c += static_cast<double>(m[j]);
        if (j < lanes && m[j] > 0.0f && c > target) {
          atomicMin(reinterpret_cast<unsigned long long*>(&s.position), static_cast<unsigned long long>(first + j));
          break;
        }
      }
    }
    __syncthreads();
    running += tile_sum;
    return s.position == INT64_MAX;
  });
  if (threadIdx.x == 0) {
    const int64_t position = s.position != INT64_MAX ? s.position : s.last_positive;
    args.tokens[row] = view.token_at(position);
    args.logprobs[row] = drawn_logprob(view.x_at(position), x_max, z_row);
  }
  if (want_cutoff) {
    // the tie index is needed only when the top-p cut split a tie whose kept part min-p kept too
    const int64_t tie_index = tie_removed > 0 ? nth_token_with_key(view, tie_key, tie_removed, s) : 0;
    if (threadIdx.x == 0) {
      const Cutoff cut = gap_cutoff(static_cast<uint32_t>(highest_removed), static_cast<uint32_t>(lowest_kept),
                                    tie_index);
      write_cutoff(args, row, cut.value, cut.index);
    }
  }
}

template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads) sample_kernel(const T* __restrict__ input, SampleArgs args) {
  __shared__ SharedState s;
  const int64_t row = blockIdx.x;
  const RowParams p = row_params(args, row);
  const RowView<T, kVec> view{input + row * args.row_stride, args.vocab, p.divisor(), args.from_probs};

  // Pass 1: max, argmax (lowest index on ties: NaN never wins), NaN.
  ArgMax best{-INFINITY, args.vocab};
  int has_nan = 0;
  view.for_each([&](int64_t i, float x) {
    has_nan |= x != x;
    if (x > best.value) best = ArgMax{x, i};
  });
  const ArgMax top = cub::BlockReduce<ArgMax, kThreads>(s.cub.argmax).Reduce(best, ArgMaxOp());
  const int any_nan = __syncthreads_or(has_nan);
  if (threadIdx.x == 0) {
    s.x_max = top.value;
    s.argmax = top.index;
    s.bad = !p.can_sample(top.value, any_nan != 0);
  }
  __syncthreads();
  if (s.bad || p.greedy()) {
    if (threadIdx.x == 0) {
      args.tokens[row] = s.bad ? -1 : s.argmax;
      args.logprobs[row] = s.bad ? NAN : 0.0f;
      write_cutoff(args, row, s.bad ? NAN : s.x_max, s.bad ? 0 : s.argmax);
    }
    return;
  }
  const float x_max = s.x_max;

  if (p.top_k > 0 && p.top_k < args.vocab) {
    const Threshold cut = radix_threshold<true>(view, x_max, 0u, 1.0, -static_cast<double>(p.top_k), s);
    const uint32_t threshold = cut.key;
    const int64_t kept = args.vocab - static_cast<int64_t>(cut.below);
    if (kept <= kCandidates) {
      int64_t removed_by_top_k = 0;
      const int64_t count =
          gather_candidates(view, threshold, s, args.cutoffs != nullptr ? &removed_by_top_k : nullptr);
      filter_and_draw(CandidateView{s.candidate_x, s.candidate_index, count}, threshold, p, x_max, args, row, s,
                      removed_by_top_k);
      return;
    }
    filter_and_draw(view, threshold, p, x_max, args, row, s, 0);
    return;
  }
  filter_and_draw(view, 0u, p, x_max, args, row, s, 0);
}

template <typename T>
cudaError_t launch_sample_typed(const T* input, const SampleArgs& args, cudaStream_t stream) {
  if (args.rows == 0) return cudaSuccess;
  if (args.rows > 0x7FFFFFFF) return cudaErrorInvalidValue;
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  const bool aligned = reinterpret_cast<uintptr_t>(input) % 16 == 0 && args.row_stride % kVec == 0;
  const dim3 grid(static_cast<unsigned int>(args.rows));
  if (aligned) {
    sample_kernel<T, kVec><<<grid, kThreads, 0, stream>>>(input, args);
  } else {
    sample_kernel<T, 1><<<grid, kThreads, 0, stream>>>(input, args);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace rlhf_fast
