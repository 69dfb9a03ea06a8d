// What a generation carries from one step to the next, per layer: an attention layer's keys and
// values of every position so far (nn::Attention, nn::LatentAttention), a Mamba2 mixer's conv
// window and scan state (nn::Mamba2Mixer). A step runs the layers on its new tokens only and reads
// the rest from here, so generating n tokens costs n single-token steps instead of n growing
// recomputations of the whole prefix. On the parameters' device, in the activations' dtype.
#pragma once
#include <cstdint>

#include "core/tensor.h"

namespace moeforge::nn {

// Rows [row0, row0 + rows of src) of dst (both viewed as [rows, row width]) = src.
void copy_rows(const Tensor& src, Tensor& dst, int64_t row0);

struct KvCache {
  int64_t capacity = 0;  // positions the buffers hold: the prompt and every token to generate
  int64_t length = 0;    // positions written so far
  Tensor k, v;           // [capacity, heads, D], [capacity, heads, DV]; allocated by the first append
  // Writes a step's keys k_new [S, heads, D] and values v_new [S, heads, DV] after the positions so
  // far; k_all / v_all receive views of every position's, [1, length, heads, *].
  void append(const Tensor& k_new, const Tensor& v_new, Tensor& k_all, Tensor& v_all);
};

struct MambaState {
  Tensor window;  // [K-1, conv channels]: the conv's last K-1 inputs (zeros before the sequence's start)
  Tensor ssm;     // [heads, head_dim, state] F32
};

}  // namespace moeforge::nn
