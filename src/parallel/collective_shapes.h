// Internal to dist: the argument checks every Communicator backend makes before a collective, so
// gloo, NCCL and the one-rank group reject the same calls with the same messages.
#pragma once
#include <cstdint>
#include <vector>

#include "core/tensor.h"
#include "parallel/communicator.h"

namespace moeforge::parallel {

// `in` holds size() blocks of `out` (reduce-scatter), or `out` size() copies of `in` (all-gather).
void check_blocks(const Communicator& c, const char* op, const Tensor& whole, const Tensor& block);

// Counts per rank that sum to the tensors' row counts, with rows of one width; returns the bytes
// of one row (0 when neither tensor has rows).
int64_t check_all_to_all(const Communicator& c, const Tensor& in, const std::vector<int64_t>& send_rows,
                         const Tensor& out, const std::vector<int64_t>& recv_rows);

}  // namespace moeforge::parallel
