#pragma once
// Where a rank sits: global rank, node ("rdma rank") and place in the node ("nvl rank").
// GPUs per node is a runtime value.
#include <cstdint>

namespace moelink {

inline constexpr int kMaxNvlRanks = 8;

struct Topology {
  int rank = 0;
  int num_ranks = 1;
  int num_nvl_ranks = 1;   // GPUs per node (the NVLink domain)
  int num_rdma_ranks = 1;  // nodes
  int nvl_rank = 0;
  int rdma_rank = 0;

  // num_nvl_ranks == 0 picks min(num_ranks, kMaxNvlRanks). Throws kValue when num_ranks is not a
  // multiple of num_nvl_ranks, rank is out of range, or num_nvl_ranks is negative or above kMaxNvlRanks.
  static Topology make(int rank, int num_ranks, int num_nvl_ranks = 0);

  bool is_intranode() const { return num_rdma_ranks == 1; }
  int root_rdma_rank_global() const { return nvl_rank; }  // the rank holding the NVSHMEM id for this lane
  int global_rank(int rdma, int nvl) const { return rdma * num_nvl_ranks + nvl; }
};

}  // namespace moelink
