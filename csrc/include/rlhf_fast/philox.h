// Philox4x32-10 (Salmon et al., "Parallel Random Numbers: As Easy as 1, 2, 3", SC'11), host and device.
//
// Counter-based: the output is a pure function of (counter, key), so any thread can draw the number of
// any (seed, offset, row) without state. rlhf_fast/reference/sample.py implements the same function in
// PyTorch; the three implementations agree bit for bit (checked against Random123's known answers).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define RLHF_FAST_HOST_DEVICE __host__ __device__ __forceinline__
#else
// Forced: GCC leaves these out of line in a large -fPIC translation unit, which stops vectorization.
#define RLHF_FAST_HOST_DEVICE inline __attribute__((always_inline))
#endif

namespace rlhf_fast {

struct Philox4x32Out {
  uint32_t v[4];
};

RLHF_FAST_HOST_DEVICE void philox_mulhilo(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
#if defined(__CUDA_ARCH__)
  *hi = __umulhi(a, b);
  *lo = a * b;
#else
  const uint64_t product = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(product >> 32);
  *lo = static_cast<uint32_t>(product);
#endif
}

// Random123's philox4x32_R(10, ctr, key).
RLHF_FAST_HOST_DEVICE Philox4x32Out philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                                 uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += kW0;
      k1 += kW1;
    }
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(kM0, c0, &hi0, &lo0);
    philox_mulhilo(kM1, c2, &hi1, &lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return Philox4x32Out{{c0, c1, c2, c3}};
}

// The uniform in [0, 1) that row `row` of a sampling call uses: counter (row, 0, offset), key seed,
// top 24 bits of the first output word times 2^-24 (exact in float).
RLHF_FAST_HOST_DEVICE float philox_row_uniform(uint64_t seed, uint64_t offset, uint64_t row) {
  const Philox4x32Out out = philox4x32_10(
      static_cast<uint32_t>(row), static_cast<uint32_t>(row >> 32), static_cast<uint32_t>(offset),
      static_cast<uint32_t>(offset >> 32), static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  return static_cast<float>(out.v[0] >> 8) * (1.0f / 16777216.0f);
}

}  // namespace rlhf_fast
