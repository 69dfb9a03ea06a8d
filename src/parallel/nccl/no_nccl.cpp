// Built without the CUDA backend (or without NCCL): device collectives are unavailable.
#include "core/error.h"
#include "parallel/communicator.h"

namespace moeforge::parallel {

bool nccl_available() { return false; }

std::unique_ptr<Communicator> connect_nccl(TcpStoreClient&, const std::string& name, int, int,
                                           std::chrono::milliseconds) {
  MF_THROW("group '", name, "': this moeforge was built without NCCL (it needs the CUDA backend)");
}

}  // namespace moeforge::parallel
