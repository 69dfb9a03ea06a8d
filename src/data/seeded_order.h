// A seeded permutation of [0, n) that is the same on every machine: Fisher-Yates over
// std::mt19937_64 (whose output the standard fixes) with our own index draw (the library's
// distributions are not fixed), so shuffles, packing orders and held-out splits reproduce anywhere.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace moeforge::data {

std::vector<int64_t> seeded_order(size_t n, uint64_t seed);

}  // namespace moeforge::data
