// Element-wise and gather/scatter kernels: SwiGLU (forward, backward), RoPE in place, embedding
// lookup and its scatter-add backward. All memory-bound; grid-stride loops over the elements, or
// over 16-byte packs of them (V elements) where the widths and pointers allow: one element per
// thread with 2-byte BF16 accesses and a 64-bit division each ran these at about half their
// bandwidth floor (docs/perf-notes.md). V = 1 is the element path.
#include "ops/cuda/check.h"
#include "ops/cuda/kernel_util.cuh"
#include "ops/cuda/ops_cuda.h"
#include "ops/cuda/runtime.h"

namespace moeforge::cuda {

using namespace detail;

namespace {


template <typename T>
__device__ __forceinline__ float round_like(float v) {
  if constexpr (std::is_same_v<T, float>) return v;
  else return __bfloat162float(__float2bfloat16(v));
}

template <typename T, int V>
__global__ void swiglu_kernel(const T* gu, T* out, int64_t rows, int64_t inter) {
  using P = Pack<T, V>;
  const int64_t per_row = inter / V;
  for (int64_t q = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; q < rows * per_row; q += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = q / per_row, c = q % per_row;
    const P g = reinterpret_cast<const P*>(gu + r * 2 * inter)[c], u = reinterpret_cast<const P*>(gu + r * 2 * inter + inter)[c];
    P o;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const float gv = load(g.v, e);
      // act_fn(gate) is a tensor of the activation dtype before it multiplies up.
      const float sv = round_like<T>(gv / (1.f + __expf(-gv)));
      store(o.v, e, sv * load(u.v, e));
    }
    reinterpret_cast<P*>(out + r * inter)[c] = o;
  }
}

// `act` (optional): the forward's output too, computed as swiglu_kernel does.
template <typename T, int V>
__global__ void swiglu_backward_kernel(const T* gu, const T* dout, T* dgu, T* act, int64_t rows, int64_t inter) {
  using P = Pack<T, V>;
  const int64_t per_row = inter / V;
  for (int64_t q = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; q < rows * per_row; q += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = q / per_row, c = q % per_row;
    const P g = reinterpret_cast<const P*>(gu + r * 2 * inter)[c], u = reinterpret_cast<const P*>(gu + r * 2 * inter + inter)[c];
    const P d = reinterpret_cast<const P*>(dout + r * inter)[c];
    P dg, du, a;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const float gv = load(g.v, e), uv = load(u.v, e), dv = load(d.v, e);
      const float sig = 1.f / (1.f + __expf(-gv));
      store(dg.v, e, dv * uv * sig * (1.f + gv * (1.f - sig)));
      store(du.v, e, dv * gv * sig);
      if (act) store(a.v, e, round_like<T>(gv / (1.f + __expf(-gv))) * uv);
    }
    reinterpret_cast<P*>(dgu + r * 2 * inter)[c] = dg;
    reinterpret_cast<P*>(dgu + r * 2 * inter + inter)[c] = du;
    if (act) reinterpret_cast<P*>(act + r * inter)[c] = a;
  }
}

// Rotates pairs (j, j + rot/2) of each head's first `rot` dimensions; V consecutive pairs per step.
template <typename T, int V>
__global__ void rope_kernel(T* x, const float* cos, const float* sin, int64_t t, int64_t h, int64_t d, int64_t rot,
                            float sign) {
  using P = Pack<T, V>;
  const int64_t half = rot / 2, per_row = half / V;
  for (int64_t q = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; q < t * h * per_row; q += (int64_t)gridDim.x * blockDim.x) {
    const int64_t c = q % per_row, th = q / per_row, tok = th / h;
    P* lo = reinterpret_cast<P*>(x + th * d) + c;
    P* hi = reinterpret_cast<P*>(x + th * d + half) + c;
    float cl[V], ch[V], sl[V], sh[V];
    load_f32<V>(cos + tok * rot + c * V, cl);
    load_f32<V>(cos + tok * rot + half + c * V, ch);
    load_f32<V>(sin + tok * rot + c * V, sl);
    load_f32<V>(sin + tok * rot + half + c * V, sh);
    const P a = *lo, b = *hi;
    P oa, ob;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const float av = load(a.v, e), bv = load(b.v, e);
      store(oa.v, e, rope_first(av, bv, cl[e], sl[e], sign));
      store(ob.v, e, rope_second(av, bv, ch[e], sh[e], sign));
    }
    *lo = oa;
    *hi = ob;
  }
}

// Launches kernel<T, 16 / sizeof(T)> over n / V packs when `packed`, else kernel<T, 1> over n elements.
template <typename T, typename... Params, typename... Args>
void launch_packed(bool packed, int64_t n, void (*by_pack)(Params...), void (*by_element)(Params...), Args... args) {
  const int64_t units = packed ? n / static_cast<int64_t>(16 / sizeof(T)) : n;
  (packed ? by_pack : by_element)<<<grid_stride_blocks(units), kGridStrideThreads, 0, current_stream()>>>(args...);
}

template <typename T, typename S>
__global__ void embedding_kernel(const int64_t* ids, const S* table, T* out, int64_t n, int64_t d, int64_t vocab,
                                 int* bad) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n * d; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t row = i / d, col = i % d;
    const int64_t id = ids[row];
    if (id < 0 || id >= vocab) {
      if (col == 0) atomicExch(bad, 1);
      store(out, i, 0.f);
      continue;
    }
    store(out, i, load(table, id * d + col));
  }
}

__device__ __forceinline__ void grad_atomic_add(float* p, float v) { atomicAdd(p, v); }
__device__ __forceinline__ void grad_atomic_add(__nv_bfloat16* p, float v) { atomicAdd(p, __float2bfloat16(v)); }

template <typename T, typename G>
__global__ void embedding_backward_kernel(const int64_t* ids, const T* dx, G* grad, int64_t n, int64_t d, int64_t vocab,
                                          int64_t padding_idx) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n * d; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t id = ids[i / d];
    if (id >= 0 && id < vocab && id != padding_idx) grad_atomic_add(grad + id * d + i % d, load(dx, i));
  }
}

// Before an embedding backward into an unzeroed gradient: the rows of the batch's ids are zeroed
// and flagged as written (two tokens of one id zero the same row twice: harmless, the adds come in
// the next launch).
template <typename G>
__global__ void zero_id_rows_kernel(const int64_t* ids, G* grad, uint8_t* written, int64_t n, int64_t d, int64_t vocab,
                                    int64_t padding_idx) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n * d; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t id = ids[i / d];
    if (id < 0 || id >= vocab || id == padding_idx) continue;
    grad[id * d + i % d] = G(0.f);
    if (i % d == 0) written[id] = 1;
  }
}

// Zeroes the rows whose flag is 0, in words of W bytes (grid-stride over every word of the tensor:
// the flags are read from cache, only unwritten rows are stored to).
template <typename W>
__global__ void zero_unwritten_rows_kernel(W* base, const uint8_t* written, int64_t words, int64_t words_per_row) {
  for (int64_t w = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; w < words; w += (int64_t)gridDim.x * blockDim.x)
    if (!written[w / words_per_row]) base[w] = W{};
}

// y += x elementwise (same dtype and size), and a device copy.
template <typename T, int V>
__global__ void add_kernel(T* y, const T* x, int64_t n) {
  using P = Pack<T, V>;
  for (int64_t q = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; q < n / V; q += (int64_t)gridDim.x * blockDim.x) {
    P a = reinterpret_cast<P*>(y)[q];
    const P b = reinterpret_cast<const P*>(x)[q];
#pragma unroll
    for (int e = 0; e < V; ++e) store(a.v, e, load(a.v, e) + load(b.v, e));
    reinterpret_cast<P*>(y)[q] = a;
  }
}

// Counter-based normal samples: element i's two uniforms come from splitmix64(seed, i), so the
// values depend on neither the launch shape nor the order (Box-Muller, one sample per element).
__device__ __forceinline__ uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

template <typename T>
__global__ void fill_normal_kernel(T* x, int64_t n, float mean, float std, uint64_t seed) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const uint64_t r = splitmix64(seed ^ splitmix64(static_cast<uint64_t>(i)));
    const float u1 = (static_cast<float>(r >> 40) + 1.f) * (1.f / 16777217.f);  // (0, 1]
    const float u2 = static_cast<float>((r >> 16) & 0xFFFFFFu) * (1.f / 16777216.f);
    store(x, i, mean + std * sqrtf(-2.f * logf(u1)) * cospif(2.f * u2));
  }
}

template <typename T>
__global__ void fill_kernel(T* x, int64_t n, float v) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) store(x, i, v);
}

template <typename S, typename T>
__global__ void convert_kernel(const S* x, T* y, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) store(y, i, load(x, i));
}

}  // namespace

void convert(const Tensor& src, Tensor& dst) {
  require_float(src, "convert");
  require_float(dst, "convert");
  MF_CHECK(src.numel() == dst.numel(), "convert: ", src.numel(), " elements into ", dst.numel());
  if (src.numel() == 0) return;
  dispatch_float(src.dtype(), [&](auto* stag) {
    using S = std::remove_pointer_t<decltype(stag)>;
    dispatch_float(dst.dtype(), [&](auto* ttag) {
      using T = std::remove_pointer_t<decltype(ttag)>;
      convert_kernel<<<grid_stride_blocks(src.numel()), kGridStrideThreads, 0, current_stream()>>>(src.data<S>(), dst.data<T>(),
                                                                                                  src.numel());
    });
  });
  MF_CUDA_CHECK_LAUNCH("convert");
}

void fill_normal(Tensor& x, float mean, float std, uint64_t seed) {
  require_float(x, "fill_normal");
  if (x.numel() == 0) return;
  dispatch_float(x.dtype(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    fill_normal_kernel<<<grid_stride_blocks(x.numel()), kGridStrideThreads, 0, current_stream()>>>(x.data<T>(), x.numel(), mean,
                                                                                                  std, seed);
  });
  MF_CUDA_CHECK_LAUNCH("fill_normal");
}

void fill(Tensor& x, float value) {
  require_float(x, "fill");
  if (x.numel() == 0) return;
  dispatch_float(x.dtype(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    fill_kernel<<<grid_stride_blocks(x.numel()), kGridStrideThreads, 0, current_stream()>>>(x.data<T>(), x.numel(), value);
  });
  MF_CUDA_CHECK_LAUNCH("fill");
}

Tensor swiglu(const Tensor& gate_up) {
  require_float(gate_up, "swiglu");
  const int64_t two_i = gate_up.shape().back(), rows = gate_up.numel() / two_i, inter = two_i / 2;
  MF_CHECK(two_i % 2 == 0, "swiglu: last dimension must be even, got ", two_i);
  Shape s = gate_up.shape();
  s.back() = inter;
  Tensor out = empty(s, gate_up.dtype(), "swiglu output");
  if (rows * inter == 0) return out;
  dispatch_float(gate_up.dtype(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    constexpr int V = 16 / sizeof(T);
    launch_packed<T>(packs_fit<T>(inter, {gate_up.raw(), out.raw()}), rows * inter, swiglu_kernel<T, V>, swiglu_kernel<T, 1>,
                     gate_up.data<T>(), out.data<T>(), rows, inter);
  });
  MF_CUDA_CHECK_LAUNCH("swiglu");
  return out;
}

Tensor swiglu_backward(const Tensor& gate_up, const Tensor& dout, Tensor* act) {
  require_float(gate_up, "swiglu_backward");
  const int64_t two_i = gate_up.shape().back(), rows = gate_up.numel() / two_i, inter = two_i / 2;
  MF_CHECK(dout.numel() == rows * inter && dout.dtype() == gate_up.dtype(), "swiglu_backward: dout does not match");
  Tensor dgu = empty(gate_up.shape(), gate_up.dtype(), "swiglu input gradient");
  if (act) {
    Shape s = gate_up.shape();
    s.back() = inter;
    *act = empty(s, gate_up.dtype(), "swiglu output");
  }
  if (rows * inter == 0) return dgu;
  dispatch_float(gate_up.dtype(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    constexpr int V = 16 / sizeof(T);
    T* act_out = act ? act->data<T>() : nullptr;
    launch_packed<T>(packs_fit<T>(inter, {gate_up.raw(), dout.raw(), dgu.raw(), act ? act->raw() : dgu.raw()}), rows * inter,
                     swiglu_backward_kernel<T, V>, swiglu_backward_kernel<T, 1>, gate_up.data<T>(), dout.data<T>(),
                     dgu.data<T>(), act_out, rows, inter);
  });
  MF_CUDA_CHECK_LAUNCH("swiglu_backward");
  return dgu;
}

void rope_inplace(Tensor& x, const Tensor& cos, const Tensor& sin, bool inverse) {
  require_float(x, "rope");
  MF_CHECK(x.dim() == 3, "rope: expected [T, H, D], got ", shape_str(x.shape()));
  const int64_t t = x.shape()[0], h = x.shape()[1], d = x.shape()[2], rot = cos.shape().back();
  MF_CHECK(cos.dtype() == DType::F32 && sin.dtype() == DType::F32 && cos.shape()[0] == t && sin.shape() == cos.shape() &&
               rot <= d && rot % 2 == 0,
           "rope: cos/sin ", shape_str(cos.shape()), " do not fit x ", shape_str(x.shape()));
  if (t * h == 0) return;
  dispatch_float(x.dtype(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    constexpr int V = 16 / sizeof(T);
    // Packs of V pairs: half a rotation and every head's row start on a pack boundary.
    const bool packed = (rot / 2) % V == 0 && d % V == 0 && packs_fit<T>(d, {x.raw()}) && packs_fit<float>(rot, {cos.raw(), sin.raw()});
    launch_packed<T>(packed, t * h * (rot / 2), rope_kernel<T, V>, rope_kernel<T, 1>, x.data<T>(), cos.data<float>(),
                     sin.data<float>(), t, h, d, rot, inverse ? -1.f : 1.f);
  });
  MF_CUDA_CHECK_LAUNCH("rope");
}

Tensor embedding(const Tensor& ids, const Tensor& table) {
  MF_CHECK(ids.dtype() == DType::I64, "embedding: ids must be I64");
  require_float(table, "embedding");
  const int64_t n = ids.numel(), vocab = table.shape()[0], d = table.shape()[1];
  Shape s = ids.shape();
  s.push_back(d);
  Tensor out = empty(s, table.dtype(), "embedding output");
  if (n == 0) return out;
  Tensor bad = empty({1}, DType::I32, "embedding range flag");
  MF_CUDA_CHECK(cudaMemsetAsync(bad.raw(), 0, sizeof(int), current_stream()));
  dispatch_float(table.dtype(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    embedding_kernel<<<grid_stride_blocks(n * d), kGridStrideThreads, 0, current_stream()>>>(ids.data<int64_t>(), table.data<T>(), out.data<T>(),
                                                                          n, d, vocab, bad.data<int>());
  });
  MF_CUDA_CHECK_LAUNCH("embedding");
  int flag = 0;
  MF_CUDA_CHECK(cudaMemcpyAsync(&flag, bad.raw(), sizeof(int), cudaMemcpyDeviceToHost, current_stream()));
  MF_CUDA_CHECK(cudaStreamSynchronize(current_stream()));
  MF_CHECK(flag == 0, "embedding: a token id is outside the vocabulary (", vocab, " tokens)");
  return out;
}

void embedding_backward(const Tensor& ids, const Tensor& dx, Tensor& table_grad, int64_t padding_idx,
                        Tensor* written_rows) {
  MF_CHECK(ids.dtype() == DType::I64 && (table_grad.dtype() == DType::F32 || table_grad.dtype() == DType::BF16),
           "embedding_backward: ids I64, grad F32 or BF16");
  require_float(dx, "embedding_backward");
  const int64_t n = ids.numel(), vocab = table_grad.shape()[0], d = table_grad.shape()[1];
  MF_CHECK(dx.numel() == n * d, "embedding_backward: dx has ", dx.numel(), " elements, expected ", n * d);
  if (written_rows) {
    // Only the batch's rows are written: the rest of the table's gradient (all but a few thousand
    // of ~150K rows) is neither zeroed here nor read by the optimizer (docs/perf-notes.md).
    MF_CUDA_CHECK(cudaMemsetAsync(written_rows->raw(), 0, written_rows->nbytes(), current_stream()));
    if (n == 0) return;
    if (table_grad.dtype() == DType::F32)
      zero_id_rows_kernel<<<grid_stride_blocks(n * d), kGridStrideThreads, 0, current_stream()>>>(
          ids.data<int64_t>(), table_grad.data<float>(), written_rows->data<uint8_t>(), n, d, vocab, padding_idx);
    else
      zero_id_rows_kernel<<<grid_stride_blocks(n * d), kGridStrideThreads, 0, current_stream()>>>(
          ids.data<int64_t>(), table_grad.data<__nv_bfloat16>(), written_rows->data<uint8_t>(), n, d, vocab,
          padding_idx);
    MF_CUDA_CHECK_LAUNCH("embedding_backward (zero the batch's rows)");
  }
  if (n == 0) return;
  dispatch_float(dx.dtype(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    if (table_grad.dtype() == DType::F32)
      embedding_backward_kernel<<<grid_stride_blocks(n * d), kGridStrideThreads, 0, current_stream()>>>(
          ids.data<int64_t>(), dx.data<T>(), table_grad.data<float>(), n, d, vocab, padding_idx);
    else
      embedding_backward_kernel<<<grid_stride_blocks(n * d), kGridStrideThreads, 0, current_stream()>>>(
          ids.data<int64_t>(), dx.data<T>(), table_grad.data<__nv_bfloat16>(), n, d, vocab, padding_idx);
  });
  MF_CUDA_CHECK_LAUNCH("embedding_backward");
}

void add_inplace(Tensor& y, const Tensor& x) {
  require_float(y, "add_inplace");
  MF_CHECK(x.dtype() == y.dtype() && x.numel() == y.numel(), "add_inplace: operands differ: ", dtype_name(y.dtype()),
           shape_str(y.shape()), " and ", dtype_name(x.dtype()), shape_str(x.shape()));
  if (y.numel() == 0) return;
  dispatch_float(y.dtype(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    constexpr int V = 16 / sizeof(T);
    launch_packed<T>(packs_fit<T>(y.numel(), {y.raw(), x.raw()}), y.numel(), add_kernel<T, V>, add_kernel<T, 1>, y.data<T>(),
                     x.data<T>(), y.numel());
  });
  MF_CUDA_CHECK_LAUNCH("add_inplace");
}

Tensor copy(const Tensor& x, const char* what) {
  Tensor y = empty(x.shape(), x.dtype(), what);
  if (x.nbytes() > 0)
    MF_CUDA_CHECK(cudaMemcpyAsync(y.raw(), x.raw(), x.nbytes(), cudaMemcpyDeviceToDevice, current_stream()));
  return y;
}

namespace {

// Up to kMaxZeroBlocks block indices by value (kernel parameters: no upload, no synchronisation).
constexpr int kMaxZeroBlocks = 512;
struct BlockIndices {
  int32_t index[kMaxZeroBlocks];
};

// Block blockIdx.y of the list: its 16-byte words, grid-stride over x.
__global__ void zero_blocks_kernel(uint4* base, BlockIndices list, int64_t words_per_block) {
  uint4* block = base + static_cast<int64_t>(list.index[blockIdx.y]) * words_per_block;
  for (int64_t w = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; w < words_per_block; w += (int64_t)gridDim.x * blockDim.x)
    block[w] = make_uint4(0, 0, 0, 0);
}

}  // namespace

void zero_blocks(void* base, int64_t block_bytes, const std::vector<int32_t>& blocks) {
  if (blocks.empty() || block_bytes == 0) return;
  const bool words = block_bytes % 16 == 0 && reinterpret_cast<uintptr_t>(base) % 16 == 0;
  if (!words) {  // odd sizes: one memset per block
    for (int32_t b : blocks)
      MF_CUDA_CHECK(cudaMemsetAsync(static_cast<char*>(base) + static_cast<int64_t>(b) * block_bytes, 0,
                                    static_cast<size_t>(block_bytes), current_stream()));
    return;
  }
  const int64_t words_per_block = block_bytes / 16;
  // Enough x-blocks to keep the GPU busy over all listed blocks together.
  const auto per_block = static_cast<unsigned>(std::clamp<int64_t>((words_per_block + 255) / 256, 1, 64));
  for (size_t first = 0; first < blocks.size(); first += kMaxZeroBlocks) {
    BlockIndices list{};
    const size_t n = std::min(blocks.size() - first, static_cast<size_t>(kMaxZeroBlocks));
    for (size_t i = 0; i < n; ++i) list.index[i] = blocks[first + i];
    zero_blocks_kernel<<<dim3(per_block, static_cast<unsigned>(n)), 256, 0, current_stream()>>>(static_cast<uint4*>(base), list,
                                                                                             words_per_block);
    MF_CUDA_CHECK_LAUNCH("zero_blocks");
  }
}

void zero_unwritten_rows(Tensor& t, const Tensor& written) {
  const int64_t rows = written.numel(), row_bytes = static_cast<int64_t>(t.nbytes()) / rows;
  if (t.numel() == 0) return;
  if (row_bytes % 16 == 0 && reinterpret_cast<uintptr_t>(t.raw()) % 16 == 0) {
    const int64_t words = static_cast<int64_t>(t.nbytes()) / 16;
    zero_unwritten_rows_kernel<<<grid_stride_blocks(words), kGridStrideThreads, 0, current_stream()>>>(
        static_cast<uint4*>(t.raw()), written.data<uint8_t>(), words, row_bytes / 16);
  } else {
    const int64_t bytes = static_cast<int64_t>(t.nbytes());
    zero_unwritten_rows_kernel<<<grid_stride_blocks(bytes), kGridStrideThreads, 0, current_stream()>>>(
        static_cast<uint8_t*>(t.raw()), written.data<uint8_t>(), bytes, row_bytes);
  }
  MF_CUDA_CHECK_LAUNCH("zero_unwritten_rows");
}

void zero(Tensor& x) {
  if (x.nbytes() > 0) MF_CUDA_CHECK(cudaMemsetAsync(x.raw(), 0, x.nbytes(), current_stream()));
}

}  // namespace moeforge::cuda
