// Internal to ops/cuda: small host-to-device copies that do not make the host wait (upload.cpp).
#pragma once
#include <cstddef>

#include "core/tensor.h"

namespace moeforge::cuda {

// `bytes` of host memory in a new device buffer (U8 [bytes]), queued on the stream through a pinned
// staging ring; `host` may be reused as soon as it returns. Copies too large for the ring are
// pageable copies waited for.
Tensor upload_bytes(const void* host, size_t bytes, const char* what);

}  // namespace moeforge::cuda
