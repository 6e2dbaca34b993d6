#include "moelink/topology.hpp"

#include <algorithm>
#include <string>

#include "moelink/error.hpp"

namespace moelink {

namespace {

[[noreturn]] void invalid(const std::string& what) { throw Error(ErrorKind::kValue, "moelink: Topology: " + what); }

}  // namespace

Topology Topology::make(int rank, int num_ranks, int num_nvl_ranks) {
  if (num_ranks < 1) invalid("num_ranks: expected >= 1, got " + std::to_string(num_ranks));
  // 0 is the documented "auto" value; a negative count is a caller bug, not a request for auto.
  if (num_nvl_ranks < 0) {
    invalid("num_nvl_ranks: expected 0 (auto) or 1.." + std::to_string(kMaxNvlRanks) + ", got " +
            std::to_string(num_nvl_ranks));
  }
  if (num_nvl_ranks == 0) num_nvl_ranks = std::min(num_ranks, kMaxNvlRanks);
  if (num_nvl_ranks > kMaxNvlRanks) {
    invalid("num_nvl_ranks: expected <= " + std::to_string(kMaxNvlRanks) + " (GPUs per NVLink domain), got " +
            std::to_string(num_nvl_ranks));
  }
  if (num_ranks % num_nvl_ranks != 0) {
    invalid("num_ranks: expected a multiple of num_nvl_ranks (" + std::to_string(num_nvl_ranks) + "), got " +
            std::to_string(num_ranks));
  }
  if (rank < 0 || rank >= num_ranks) {
    invalid("rank: expected 0.." + std::to_string(num_ranks - 1) + ", got " + std::to_string(rank));
  }

  Topology topo;
  topo.rank = rank;
  topo.num_ranks = num_ranks;
  topo.num_nvl_ranks = num_nvl_ranks;
  topo.num_rdma_ranks = num_ranks / num_nvl_ranks;
  // Ranks are numbered node-major so that a node's GPUs are consecutive, as launchers assign them.
  topo.nvl_rank = rank % num_nvl_ranks;
  topo.rdma_rank = rank / num_nvl_ranks;
  return topo;
}

}  // namespace moelink
