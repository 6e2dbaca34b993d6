#pragma once
// Tuning of a normal-mode (intranode / internode) operation. Chunk sizes are in tokens.
#include <cstdint>

namespace moelink {

struct Config {
  int num_sms = 20;
  int num_max_nvl_chunked_send_tokens = 6;
  int num_max_nvl_chunked_recv_tokens = 256;
  int num_max_rdma_chunked_send_tokens = 6;
  int num_max_rdma_chunked_recv_tokens = 256;

  Config() = default;
  // Throws moelink::Error (kValue) naming the bad field.
  Config(int num_sms, int nvl_send, int nvl_recv, int rdma_send = 6, int rdma_recv = 256);
  void validate() const;

  int num_channels() const { return num_sms / 2; }
  // Exact NVLink-buffer bytes an intranode dispatch/combine with this config needs for rows of
  // `hidden_bytes` (the larger of the two directions, all metadata included).
  int64_t get_nvl_buffer_size_hint(int64_t hidden_bytes, int num_ranks) const;
  int64_t get_rdma_buffer_size_hint(int64_t hidden_bytes, int num_ranks) const;
};

// Presets tuned per rank count (2, 4, 8, and the internode counts).
Config default_dispatch_config(int num_ranks, int num_sms);
Config default_combine_config(int num_ranks, int num_sms);

}  // namespace moelink
