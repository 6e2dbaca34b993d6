// Calls only what needs no GPU (Topology, Config and its size hints, the error type) through the
// installed headers and libmoelink.so. Every public header is included, so one that depends on a
// private src/ header, or on something the package does not export, fails this build.
#include <cstdint>
#include <cstdio>

#include "moelink/buffer.hpp"
#include "moelink/config.hpp"
#include "moelink/error.hpp"
#include "moelink/event.hpp"
#include "moelink/ops.hpp"
#include "moelink/tensor.hpp"
#include "moelink/topology.hpp"

int main() {
  const moelink::Topology topology = moelink::Topology::make(3, 8);
  if (topology.nvl_rank != 3 || topology.num_nvl_ranks != 8 || !topology.is_intranode()) {
    std::printf("FAILED: Topology::make(3, 8) gave nvl_rank %d of %d\n", topology.nvl_rank, topology.num_nvl_ranks);
    return 1;
  }
  const moelink::Config config;
  const int64_t hint = config.get_nvl_buffer_size_hint(7168 * 2, 8);
  if (hint <= 0) {
    std::printf("FAILED: get_nvl_buffer_size_hint gave %lld\n", static_cast<long long>(hint));
    return 1;
  }
  // The library's error type crosses the shared-library boundary with its kind.
  try {
    (void)moelink::Topology::make(0, 6, 4);
    std::printf("FAILED: Topology::make(0, 6, 4) did not throw\n");
    return 1;
  } catch (const moelink::Error& error) {
    if (error.kind() != moelink::ErrorKind::kValue) {
      std::printf("FAILED: wrong error kind: %s\n", error.what());
      return 1;
    }
  }
  std::printf("moelink %s consumer: ok (nvl hint %lld bytes)\n", CONSUMER_FOUND_VERSION, static_cast<long long>(hint));
  return 0;
}
