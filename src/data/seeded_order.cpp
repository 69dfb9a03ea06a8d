#include "data/seeded_order.h"

#include <numeric>
#include <random>
#include <utility>

namespace moeforge::data {

std::vector<int64_t> seeded_order(size_t n, uint64_t seed) {
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::mt19937_64 gen(seed);
  for (size_t i = n; i > 1; --i) std::swap(order[i - 1], order[gen() % i]);
  return order;
}

}  // namespace moeforge::data
