#include <cstdint>

#include "harness.hpp"
#include "moelink/config.hpp"

using moelink::Config;
using moelink::ErrorKind;

MOELINK_TEST(config_defaults_validate) {
  const Config config;
  EXPECT_NO_THROW(config.validate());
  EXPECT_EQ(config.num_channels(), config.num_sms / 2);
}

MOELINK_TEST(config_constructor_stores_fields) {
  const Config config(24, 8, 512, 16, 128);
  EXPECT_EQ(config.num_sms, 24);
  EXPECT_EQ(config.num_max_nvl_chunked_send_tokens, 8);
  EXPECT_EQ(config.num_max_nvl_chunked_recv_tokens, 512);
  EXPECT_EQ(config.num_max_rdma_chunked_send_tokens, 16);
  EXPECT_EQ(config.num_max_rdma_chunked_recv_tokens, 128);
  EXPECT_EQ(config.num_channels(), 12);
  const Config rdma_defaults(20, 6, 256);
  EXPECT_EQ(rdma_defaults.num_max_rdma_chunked_send_tokens, 6);
  EXPECT_EQ(rdma_defaults.num_max_rdma_chunked_recv_tokens, 256);
}

MOELINK_TEST(config_num_sms_must_be_even_and_in_range) {
  for (int sms : {2, 4, 20, 132, 256}) EXPECT_NO_THROW(Config(sms, 6, 256));
  for (int sms : {0, 1, 3, 21, -2, 258, 512}) EXPECT_THROW_KIND(Config(sms, 6, 256), ErrorKind::kValue, "num_sms");
}

MOELINK_TEST(config_chunk_sizes) {
  EXPECT_THROW_KIND(Config(20, 0, 256), ErrorKind::kValue, "num_max_nvl_chunked_send_tokens");
  EXPECT_THROW_KIND(Config(20, -1, 256), ErrorKind::kValue, "num_max_nvl_chunked_send_tokens");
  EXPECT_NO_THROW(Config(20, 1, 2));
  EXPECT_NO_THROW(Config(20, 6, 12));
  EXPECT_THROW_KIND(Config(20, 6, 11), ErrorKind::kValue, "num_max_nvl_chunked_recv_tokens");
  EXPECT_THROW_KIND(Config(20, 1, 1), ErrorKind::kValue, "num_max_nvl_chunked_recv_tokens");

  EXPECT_THROW_KIND(Config(20, 6, 256, 0, 256), ErrorKind::kValue, "num_max_rdma_chunked_send_tokens");
  EXPECT_THROW_KIND(Config(20, 6, 256, -3, 256), ErrorKind::kValue, "num_max_rdma_chunked_send_tokens");
  EXPECT_NO_THROW(Config(20, 6, 256, 1, 2));
  EXPECT_NO_THROW(Config(20, 6, 256, 16, 32));
  EXPECT_THROW_KIND(Config(20, 6, 256, 16, 31), ErrorKind::kValue, "num_max_rdma_chunked_recv_tokens");
}

MOELINK_TEST(config_validate_checks_mutated_fields) {
  Config config;
  config.num_sms = 7;
  EXPECT_THROW_KIND(config.validate(), ErrorKind::kValue, "num_sms");
  config = Config();
  config.num_max_nvl_chunked_recv_tokens = config.num_max_nvl_chunked_send_tokens;
  EXPECT_THROW_KIND(config.validate(), ErrorKind::kValue, "num_max_nvl_chunked_recv_tokens");
  config = Config();
  config.num_max_rdma_chunked_send_tokens = 0;
  EXPECT_THROW_KIND(config.validate(), ErrorKind::kValue, "num_max_rdma_chunked_send_tokens");
}

MOELINK_TEST(config_nvl_size_hint_is_positive_and_aligned) {
  const Config config(20, 6, 256);
  for (int64_t hidden_bytes : {16, 128, 4096, 7168 * 2, 7168 + 7168 / 128 * 4}) {
    if (hidden_bytes % 16 != 0) continue;
    for (int num_ranks = 1; num_ranks <= 8; ++num_ranks) {
      const int64_t bytes = config.get_nvl_buffer_size_hint(hidden_bytes, num_ranks);
      EXPECT_GT(bytes, 0);
      EXPECT_EQ(bytes % 128, 0);
    }
  }
}

MOELINK_TEST(config_nvl_size_hint_grows_strictly) {
  const Config config(20, 6, 256);
  // In hidden_bytes.
  for (int num_ranks : {1, 2, 8}) {
    int64_t previous = 0;
    for (int64_t hidden_bytes = 16; hidden_bytes <= 16384; hidden_bytes *= 2) {
      const int64_t bytes = config.get_nvl_buffer_size_hint(hidden_bytes, num_ranks);
      EXPECT_GT(bytes, previous);
      previous = bytes;
    }
    EXPECT_LT(config.get_nvl_buffer_size_hint(7168, num_ranks), config.get_nvl_buffer_size_hint(7168 + 16, num_ranks));
  }
  // In num_ranks.
  for (int64_t hidden_bytes : {16, 14336}) {
    int64_t previous = 0;
    for (int num_ranks = 1; num_ranks <= 8; ++num_ranks) {
      const int64_t bytes = config.get_nvl_buffer_size_hint(hidden_bytes, num_ranks);
      EXPECT_GT(bytes, previous);
      previous = bytes;
    }
  }
  // In num_max_nvl_chunked_recv_tokens.
  for (int num_ranks : {2, 8}) {
    int64_t previous = 0;
    for (int recv_tokens : {12, 13, 64, 256, 512, 1024}) {
      const int64_t bytes = Config(20, 6, recv_tokens).get_nvl_buffer_size_hint(14336, num_ranks);
      EXPECT_GT(bytes, previous);
      previous = bytes;
    }
  }
}

MOELINK_TEST(config_nvl_size_hint_rejects_bad_arguments) {
  const Config config;
  EXPECT_THROW_KIND(config.get_nvl_buffer_size_hint(0, 8), ErrorKind::kValue, "hidden_bytes");
  EXPECT_THROW_KIND(config.get_nvl_buffer_size_hint(-16, 8), ErrorKind::kValue, "hidden_bytes");
  EXPECT_THROW_KIND(config.get_nvl_buffer_size_hint(7169, 8), ErrorKind::kValue, "hidden_bytes");
  EXPECT_THROW_KIND(config.get_nvl_buffer_size_hint(8, 8), ErrorKind::kValue, "hidden_bytes");
  EXPECT_THROW_KIND(config.get_nvl_buffer_size_hint(14336, 0), ErrorKind::kValue, "num_ranks");
  EXPECT_THROW_KIND(config.get_nvl_buffer_size_hint(14336, -1), ErrorKind::kValue, "num_ranks");
}

MOELINK_TEST(config_hints_across_nodes) {
  // Across nodes the NVLink rings connect one node's GPUs (8 unless MOELINK_NVL_RANKS says so, as in
  // deep_ep), and the node-to-node rings one GPU of each node.
  const Config config(20, 6, 256, 6, 256);
  EXPECT_EQ(config.get_nvl_buffer_size_hint(14336, 16), config.get_nvl_buffer_size_hint(14336, 8));
  EXPECT_EQ(config.get_rdma_buffer_size_hint(14336, 8), 0);  // one node
  const int64_t two_nodes = config.get_rdma_buffer_size_hint(14336, 16);
  EXPECT_GT(two_nodes, 0);
  EXPECT_LT(two_nodes, config.get_rdma_buffer_size_hint(14336, 32));
  // The node-to-node leg is an intranode exchange over the nodes, driven by the RDMA fields.
  EXPECT_EQ(two_nodes, Config(20, 6, 256).get_nvl_buffer_size_hint(14336, 2));
  EXPECT_THROW_KIND(config.get_rdma_buffer_size_hint(14336, 8 * 9), ErrorKind::kValue, "nodes");
}

MOELINK_TEST(config_presets_validate_and_keep_num_sms) {
  for (int num_ranks : {1, 2, 4, 8}) {
    for (int sms : {2, 8, 16, 20, 24}) {
      const Config dispatch = moelink::default_dispatch_config(num_ranks, sms);
      const Config combine = moelink::default_combine_config(num_ranks, sms);
      EXPECT_NO_THROW(dispatch.validate());
      EXPECT_NO_THROW(combine.validate());
      EXPECT_EQ(dispatch.num_sms, sms);
      EXPECT_EQ(combine.num_sms, sms);
      EXPECT_GT(dispatch.get_nvl_buffer_size_hint(14336, num_ranks), 0);
      EXPECT_GT(combine.get_nvl_buffer_size_hint(14336, num_ranks), 0);
    }
  }
}
