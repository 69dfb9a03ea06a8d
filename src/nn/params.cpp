#include "nn/params.h"

#include <cstring>

#include "core/error.h"

namespace moeforge::nn {

size_t ParamStore::add(std::string name, Shape shape) {
  MF_CHECK(!index_.count(name), "parameter '", name, "' registered twice");
  index_[name] = params_.size();
  Param p;
  p.name = std::move(name);
  p.shape = std::move(shape);
  params_.push_back(std::move(p));
  return params_.size() - 1;
}

Param* ParamStore::find(const std::string& name) {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &params_[it->second];
}

const Param* ParamStore::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &params_[it->second];
}

int64_t ParamStore::numel() const {
  int64_t n = 0;
  for (const auto& p : params_) n += shape_numel(p.shape);
  return n;
}

Tensor& ParamStore::grad(size_t i) {
  Param& p = params_.at(i);
  if (!p.grad.defined()) p.grad = Tensor::zeros(p.shape, DType::F32);
  return p.grad;
}

void ParamStore::ensure_grads() {
  for (auto& p : params_)
    if (!p.frozen && !p.grad.defined()) p.grad = Tensor::zeros(p.shape, DType::F32);
}

void ParamStore::zero_grad() {
  for (auto& p : params_)
    if (p.grad.defined()) std::memset(p.grad.raw(), 0, p.grad.nbytes());
}

}  // namespace moeforge::nn
