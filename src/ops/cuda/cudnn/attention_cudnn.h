// cuDNN's fused attention (the graph API's SDPA, through the cuDNN frontend), used by
// cuda::attention / attention_backward when this build has cuDNN and the call is one it handles:
// BF16/F16, no document masks, head_dim a multiple of 8 up to 256. Same layouts and the same
// log-sum-exp as the native kernels, so forward and backward may come from either.
#pragma once
#include <cstdint>

#include "core/tensor.h"

namespace moeforge::cuda::cudnn_attention {

// Whether this call goes to cuDNN: the build has it, the library loads, the shapes and masks are
// supported, and MOEFORGE_ATTENTION is not "native".
bool usable(const Tensor& q, int64_t window, const Tensor* doc_ids);

// q [B,S,Hq,D], k/v [B,S,Hkv,D]; out like q; lse [B,Hq,S] F32 (natural log).
void forward(const Tensor& q, const Tensor& k, const Tensor& v, float scale, int64_t window, Tensor& out, Tensor& lse);
void backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
              const Tensor& dout, float scale, int64_t window, Tensor& dq, Tensor& dk, Tensor& dv);

}  // namespace moeforge::cuda::cudnn_attention
