// The dropout mask's hash (ops::dropout_scaled), one definition for the CPU and CUDA code so both
// draw the same mask: element i of a call with `seed` is dropped when the top 24 bits of
// splitmix64(seed ^ splitmix64(i)), as a fraction of 2^24, fall below p.
#pragma once
#include <cstdint>

#include "core/host_device.h"

namespace moeforge::ops {

MF_HOST_DEVICE uint64_t dropout_splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

MF_HOST_DEVICE bool dropout_keeps(uint64_t seed, int64_t i, float p) {
  const uint64_t r = dropout_splitmix64(seed ^ dropout_splitmix64(static_cast<uint64_t>(i)));
  return static_cast<float>(r >> 40) * (1.f / 16777216.f) >= p;
}

}  // namespace moeforge::ops
