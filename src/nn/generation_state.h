// What a generation carries from one step to the next, per layer: an attention layer's keys and
// values of every position so far (nn::Attention, nn::LatentAttention), a Mamba2 mixer's conv
// window and scan state (nn::Mamba2Mixer). A step runs the layers on its new tokens only and reads
// the rest from here, so generating n tokens costs n single-token steps instead of n growing
// recomputations of the whole prefix. On the parameters' device, in the activations' dtype.
#pragma once
#include <cstdint>
#include <functional>
#include <vector>

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

// One layer's states of the sequences a generation step runs together: rows [offsets[i],
// offsets[i+1]) of the step's tokens are sequence i's new tokens (its prompt, or its next token),
// and states[i] is that sequence's state in this layer. The layers run their projections over all
// rows at once and only what reads the state (attention over the cache, the conv and scan) per
// sequence, so a batch of sequences costs one pass over the weights per step. One sequence:
// offsets {0, T}.
template <typename State>
struct SequenceStates {
  std::vector<int64_t> offsets;  // [B+1], from 0 to the step's T
  std::vector<State*> states;    // [B]
  size_t size() const { return states.size(); }
  int64_t begin(size_t i) const { return offsets[i]; }
  int64_t rows(size_t i) const { return offsets[i + 1] - offsets[i]; }
};
using KvCaches = SequenceStates<KvCache>;
using MambaStates = SequenceStates<MambaState>;

// out [T, width] whose rows of each sequence are fn(i, first row, rows) ([rows, width] each): the
// per-sequence part of a batched generation step, gathered back into one tensor.
Tensor per_sequence(const std::vector<int64_t>& offsets, int64_t width, DType dtype, Device device,
                    const std::function<Tensor(size_t, int64_t, int64_t)>& fn);

}  // namespace moeforge::nn
