// The named parameters of a model in its internal layout (experts fused into [E, ...] tensors).
// Order is stable: it is the order of registration, which is the order of the forward pass.
#pragma once
#include <map>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace moeforge::nn {

// What the layers read their weights from and write their gradients into, by parameter index:
// the model's own host ParamStore (the CPU reference, F32) or a device copy of it
// (gpu::DeviceParams: the policy's compute dtype, F32 masters, ZeRO-3 blocks). The layers and the
// decoder are written once against this; the storage decides where and in what dtype they run.
class ParamAccess {
 public:
  virtual ~ParamAccess() = default;
  // The whole value (of a ZeRO-3 sharded parameter: only between gather() and release()).
  virtual const Tensor& value(size_t i) const = 0;
  // The gradient, allocated zeroed on first use; gradients accumulate.
  virtual Tensor& grad(size_t i) = 0;
  // The gradient for a site that writes all of it in one op (a GEMM's output). `accumulate` comes
  // back false when nothing has been added to it yet: the storage may then hand it out unzeroed and
  // the site must overwrite every element (no memset, and the GEMM reads no C: on a GPU step these
  // were ~2 bytes written and ~2 read per parameter for nothing); true when it holds contributions
  // to add to. Storages that keep gradients zeroed (the host's) always say true.
  virtual Tensor& grad_for_write(size_t i, bool& accumulate) {
    accumulate = true;
    return grad(i);
  }
  // For a site that writes only some rows of a gradient (an expert weight's experts that got
  // tokens, an embedding's rows of the batch's tokens), right after grad_for_write came back with
  // accumulate false: flags for the gradient viewed as [rows, numel / rows], U8 [rows] on its
  // device, for the site to fill (1: written). The storage then takes the unwritten rows as zeros
  // without their being written: its optimizer reads no gradient there, and any other read of the
  // gradient (grad(), a later grad_for_write) zeroes them first. Null where the storage keeps
  // gradients whole: the site then writes every row, zeros included.
  virtual Tensor* written_rows(size_t /*i*/, int64_t /*rows*/) { return nullptr; }
  // Also right after grad_for_write came back with accumulate false: where a site whose op can
  // leave the gradient's sum of squares as partial sums on the way (the experts' weight-gradient
  // kernel, from the accumulators it already holds) puts them, for the gradient norm to add up
  // instead of reading the gradient again. Any later write to the gradient (grad(), another
  // grad_for_write) drops them. Null where the storage keeps none.
  virtual Tensor* squares_out(size_t /*i*/) { return nullptr; }
  // Those partial sums while they still describe the gradient as it is; null otherwise.
  virtual const Tensor* grad_squares(size_t /*i*/) const { return nullptr; }
  // The gradient as its sites left it, for readers that take row flags (the optimizer, the norm):
  // `written` gets its flags, undefined where every row was written (always, by default).
  virtual Tensor& grad_as_written(size_t i, Tensor& written) {
    written = Tensor();
    return grad(i);
  }
  // The value at full precision: the F32 master where the storage keeps one beside a BF16 compute
  // copy (a buffer Transformers keeps in F32 under autocast, such as DeepSeek's correction bias).
  virtual const Tensor& exact(size_t i) const { return value(i); }
  // Whether the parameter takes a gradient: false for buffers and for weights frozen under LoRA, whose
  // gradient sites are skipped (no gradient is allocated or computed).
  virtual bool trainable(size_t i) const = 0;
  virtual Device device() const = 0;
  // The dtype activations are computed in (F32 on the host; the precision policy's on a GPU).
  virtual DType compute_dtype() const = 0;
  // ZeRO-3 residency, called by the layer loop around each layer (no-ops where every value is
  // whole): gather makes these values whole (waiting for a prefetch that started it), prefetch
  // starts that and returns, release frees the whole values again, scatter_grads sums the whole
  // gradients over the parameters' group into this rank's blocks and frees them.
  virtual void gather(const std::vector<size_t>&) {}
  virtual void prefetch(const std::vector<size_t>&) {}
  virtual void release(const std::vector<size_t>&) {}
  virtual void scatter_grads(const std::vector<size_t>&) {}
  // ZeRO-3: this rank's block of a sharded parameter's gradient (what scatter_grads summed into);
  // null where the parameter is whole.
  virtual Tensor* block_grad(size_t) { return nullptr; }
  virtual size_t size() const = 0;  // parameters, index for index with the model's ParamStore
};

struct Param {
  std::string name;  // internal name, e.g. "model.layers.0.mlp.experts.gate_up_proj"
  Shape shape;       // the shape the config implies
  Tensor value;      // filled by the loader
  Tensor grad;       // F32, same shape; allocated by ensure_grads()
  bool decay = true;  // AdamW weight decay applies (false for norms and biases when excluded)
  // False for a buffer that is loaded and saved but never updated (DeepSeek-V3's routing
  // correction bias): it gets no gradient and the optimizers leave it as it is.
  bool trainable = true;
  // A LoRA adapter's A or B (nn/lora.h): not in the base checkpoint, saved as a PEFT adapter.
  bool lora = false;
  // A base weight frozen under LoRA (trainable false too): no gradient, no optimizer state, and no
  // F32 master copy on a GPU (it stays in the compute dtype).
  bool frozen = false;
};

class ParamStore : public ParamAccess {
 public:
  // Registers a parameter; returns its index for the layer to keep.
  size_t add(std::string name, Shape shape);
  Tensor& at(size_t i) { return params_[i].value; }
  const Tensor& at(size_t i) const { return params_[i].value; }
  std::vector<Param>& all() { return params_; }
  const std::vector<Param>& all() const { return params_; }
  Param* find(const std::string& name);
  const Param* find(const std::string& name) const;
  int64_t numel() const;
  // ParamAccess: the host values (F32 compute); a gradient is allocated (zeroed, F32) on first use.
  const Tensor& value(size_t i) const override { return params_[i].value; }
  Tensor& grad(size_t i) override;
  Device device() const override { return Device::cpu(); }
  DType compute_dtype() const override { return DType::F32; }
  bool trainable(size_t i) const override { return params_[i].trainable; }
  size_t size() const override { return params_.size(); }
  // Allocates (zeroed) gradients for every parameter that has none (LoRA's frozen base excepted);
  // zero_grad() clears them.
  void ensure_grads();
  void zero_grad();

 private:
  std::vector<Param> params_;
  std::map<std::string, size_t> index_;
};

}  // namespace moeforge::nn
