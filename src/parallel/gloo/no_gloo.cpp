// Built when gloo (libgloo-dev) was not found: multi-rank CPU runs are unavailable.
#include "core/error.h"
#include "parallel/communicator.h"

namespace moeforge::parallel {

bool gloo_available() { return false; }

std::unique_ptr<Communicator> connect_gloo(TcpStoreClient&, const std::string& name, int, int, const std::string&,
                                           std::chrono::milliseconds) {
  MF_THROW("group '", name, "': this moeforge was built without gloo, so ranks cannot talk on the CPU "
           "(install libgloo-dev: scripts/install-deps.sh)");
}

}  // namespace moeforge::parallel
