#include <set>
#include <utility>

#include "harness.hpp"
#include "moelink/topology.hpp"

using moelink::ErrorKind;
using moelink::Topology;

namespace {

// Every rank of a (num_ranks, num_nvl_ranks) job: the fields agree with each other, and together
// the ranks cover each (node, GPU) slot exactly once.
void check_job(int num_ranks, int num_nvl_ranks) {
  const int num_nodes = num_ranks / num_nvl_ranks;
  std::set<std::pair<int, int>> slots;
  for (int rank = 0; rank < num_ranks; ++rank) {
    const Topology topo = Topology::make(rank, num_ranks, num_nvl_ranks);
    EXPECT_EQ(topo.rank, rank);
    EXPECT_EQ(topo.num_ranks, num_ranks);
    EXPECT_EQ(topo.num_nvl_ranks, num_nvl_ranks);
    EXPECT_EQ(topo.num_rdma_ranks, num_nodes);
    EXPECT_EQ(topo.nvl_rank, rank % num_nvl_ranks);
    EXPECT_EQ(topo.rdma_rank, rank / num_nvl_ranks);
    EXPECT_TRUE(topo.nvl_rank >= 0 && topo.nvl_rank < num_nvl_ranks);
    EXPECT_TRUE(topo.rdma_rank >= 0 && topo.rdma_rank < num_nodes);
    EXPECT_EQ(topo.global_rank(topo.rdma_rank, topo.nvl_rank), rank);
    EXPECT_EQ(topo.is_intranode(), num_nodes == 1);
    EXPECT_EQ(topo.root_rdma_rank_global(), topo.nvl_rank);
    slots.insert({topo.rdma_rank, topo.nvl_rank});
  }
  EXPECT_EQ(static_cast<int>(slots.size()), num_ranks);
}

}  // namespace

MOELINK_TEST(topology_explicit_gpus_per_node) {
  for (int gpus_per_node : {1, 2, 3, 4, 6, 8}) {
    for (int nodes = 1; nodes <= 16; ++nodes) check_job(nodes * gpus_per_node, gpus_per_node);
  }
}

MOELINK_TEST(topology_auto_gpus_per_node_is_min_of_ranks_and_8) {
  for (int num_ranks : {1, 2, 3, 4, 5, 6, 7, 8, 16, 24, 32, 64, 128}) {
    const int expected = num_ranks < 8 ? num_ranks : 8;
    for (int rank : {0, num_ranks / 2, num_ranks - 1}) {
      const Topology topo = Topology::make(rank, num_ranks);
      EXPECT_EQ(topo.num_nvl_ranks, expected);
      EXPECT_EQ(topo.num_rdma_ranks, num_ranks / expected);
      EXPECT_EQ(topo.nvl_rank, rank % expected);
      EXPECT_EQ(topo.rdma_rank, rank / expected);
      // 0 is the explicit spelling of "auto".
      const Topology same = Topology::make(rank, num_ranks, 0);
      EXPECT_EQ(same.num_nvl_ranks, expected);
    }
  }
}

MOELINK_TEST(topology_single_rank) {
  const Topology topo = Topology::make(0, 1);
  EXPECT_EQ(topo.num_nvl_ranks, 1);
  EXPECT_EQ(topo.num_rdma_ranks, 1);
  EXPECT_EQ(topo.nvl_rank, 0);
  EXPECT_EQ(topo.rdma_rank, 0);
  EXPECT_TRUE(topo.is_intranode());
}

MOELINK_TEST(topology_concrete_examples) {
  // Rank 13 of 2 nodes x 8 GPUs: second node, sixth GPU.
  Topology topo = Topology::make(13, 16, 8);
  EXPECT_EQ(topo.rdma_rank, 1);
  EXPECT_EQ(topo.nvl_rank, 5);
  EXPECT_FALSE(topo.is_intranode());
  EXPECT_EQ(topo.global_rank(0, 5), 5);
  // Rank 7 of 4 nodes x 3 GPUs: third node, second GPU.
  topo = Topology::make(7, 12, 3);
  EXPECT_EQ(topo.num_rdma_ranks, 4);
  EXPECT_EQ(topo.rdma_rank, 2);
  EXPECT_EQ(topo.nvl_rank, 1);
  EXPECT_EQ(topo.global_rank(3, 2), 11);
}

MOELINK_TEST(topology_rejects_ranks_not_a_multiple_of_gpus_per_node) {
  EXPECT_THROW_KIND(Topology::make(0, 12, 8), ErrorKind::kValue, "num_ranks");
  EXPECT_THROW_KIND(Topology::make(0, 7, 2), ErrorKind::kValue, "multiple");
  EXPECT_THROW_KIND(Topology::make(0, 10, 4), ErrorKind::kValue, "num_nvl_ranks (4)");
  EXPECT_THROW_KIND(Topology::make(0, 9, 6), ErrorKind::kValue, "got 9");
  // Auto picks 8 above 8 ranks, so 12 ranks need an explicit GPUs-per-node.
  EXPECT_THROW_KIND(Topology::make(0, 12), ErrorKind::kValue, "num_ranks");
  EXPECT_NO_THROW(Topology::make(0, 12, 4));
  EXPECT_NO_THROW(Topology::make(0, 12, 6));
}

MOELINK_TEST(topology_rejects_rank_out_of_range) {
  EXPECT_THROW_KIND(Topology::make(-1, 8, 8), ErrorKind::kValue, "rank");
  EXPECT_THROW_KIND(Topology::make(8, 8, 8), ErrorKind::kValue, "got 8");
  EXPECT_THROW_KIND(Topology::make(16, 16), ErrorKind::kValue, "0..15");
  EXPECT_THROW_KIND(Topology::make(1, 1), ErrorKind::kValue, "rank");
  EXPECT_NO_THROW(Topology::make(15, 16));
}

MOELINK_TEST(topology_rejects_more_than_8_gpus_per_node) {
  EXPECT_THROW_KIND(Topology::make(0, 16, 16), ErrorKind::kValue, "num_nvl_ranks");
  EXPECT_THROW_KIND(Topology::make(0, 9, 9), ErrorKind::kValue, "got 9");
  EXPECT_THROW_KIND(Topology::make(0, 72, 72), ErrorKind::kValue, "<= 8");
}

MOELINK_TEST(topology_rejects_negative_gpus_per_node_and_empty_jobs) {
  EXPECT_THROW_KIND(Topology::make(0, 8, -1), ErrorKind::kValue, "num_nvl_ranks");
  EXPECT_THROW_KIND(Topology::make(0, 8, -8), ErrorKind::kValue, "got -8");
  EXPECT_THROW_KIND(Topology::make(0, 0), ErrorKind::kValue, "num_ranks");
  EXPECT_THROW_KIND(Topology::make(0, -4, 2), ErrorKind::kValue, "num_ranks");
}
