#include "moelink/config.hpp"

#include "common/header.hpp"
#include "modes/intranode/ring_layout.hpp"
#include "runtime/errors.hpp"
#include "runtime/knobs.hpp"

namespace moelink {

Config::Config(int num_sms_, int nvl_send, int nvl_recv, int rdma_send, int rdma_recv)
    : num_sms(num_sms_),
      num_max_nvl_chunked_send_tokens(nvl_send),
      num_max_nvl_chunked_recv_tokens(nvl_recv),
      num_max_rdma_chunked_send_tokens(rdma_send),
      num_max_rdma_chunked_recv_tokens(rdma_recv) {
  validate();
}

void Config::validate() const {
  using detail::raise;
  if (num_sms < 2 || num_sms > 2 * kernels::kMaxChannels || num_sms % 2 != 0)
    raise(ErrorKind::kValue, "Config.num_sms: expected an even number in [2, ", 2 * kernels::kMaxChannels, "], got ",
          num_sms, " (one sender and one receiver SM per channel)");
  // A chunk's token list lives in shared memory (64 entries per peer).
  if (num_max_nvl_chunked_send_tokens < 1 || num_max_nvl_chunked_send_tokens > 64)
    raise(ErrorKind::kValue, "Config.num_max_nvl_chunked_send_tokens: expected 1..64, got ", num_max_nvl_chunked_send_tokens);
  if (num_max_nvl_chunked_recv_tokens < 2 * num_max_nvl_chunked_send_tokens)
    raise(ErrorKind::kValue, "Config.num_max_nvl_chunked_recv_tokens: expected >= 2 * num_max_nvl_chunked_send_tokens (",
          2 * num_max_nvl_chunked_send_tokens, "), got ", num_max_nvl_chunked_recv_tokens);
  if (num_max_rdma_chunked_send_tokens < 1)
    raise(ErrorKind::kValue, "Config.num_max_rdma_chunked_send_tokens: expected >= 1, got ", num_max_rdma_chunked_send_tokens);
  if (num_max_rdma_chunked_recv_tokens < 2 * num_max_rdma_chunked_send_tokens)
    raise(ErrorKind::kValue, "Config.num_max_rdma_chunked_recv_tokens: expected >= 2 * num_max_rdma_chunked_send_tokens (",
          2 * num_max_rdma_chunked_send_tokens, "), got ", num_max_rdma_chunked_recv_tokens);
}

namespace {
void check_hint_args(int64_t hidden_bytes, int num_ranks, int max_ranks) {
  if (hidden_bytes <= 0 || hidden_bytes % 16 != 0)
    detail::raise(ErrorKind::kValue, "hidden_bytes: expected a positive multiple of 16, got ", hidden_bytes);
  if (num_ranks < 1 || num_ranks > max_ranks)
    detail::raise(ErrorKind::kValue, "num_ranks: expected 1..", max_ranks, ", got ", num_ranks);
}
}  // namespace

static int ranks_per_node(int num_ranks) {
  const int knob = knobs::nvl_ranks_per_node();
  const int per_node = knob > 0 ? knob : kMaxNvlRanks;
  return num_ranks < per_node ? num_ranks : per_node;
}

int64_t Config::get_nvl_buffer_size_hint(int64_t hidden_bytes, int num_ranks) const {
  validate();
  check_hint_args(hidden_bytes, num_ranks, 1 << 20);
  // Across nodes the NVLink rings connect the GPUs of one node (MOELINK_NVL_RANKS, else 8).
  num_ranks = ranks_per_node(num_ranks);
  // Dispatch rings carry the most per row (scales, ids, weights); combine rows of the same hidden
  // size carry less, so the dispatch layout at the largest top-k bounds both directions.
  const auto layout = intranode::RingLayout::make(num_ranks, num_channels(), num_max_nvl_chunked_recv_tokens,
                                                hidden_bytes, static_cast<int>(hidden_bytes / 128), kernels::kMaxTopK);
  return layout.total_bytes();
}

int64_t Config::get_rdma_buffer_size_hint(int64_t hidden_bytes, int num_ranks) const {
  validate();
  check_hint_args(hidden_bytes, num_ranks, 1 << 20);
  // Internode mode's node-to-node leg (python/moelink/_internode.py) is an intranode exchange among
  // the same-index GPUs of every node, with rings of num_max_rdma_chunked_recv_tokens slots per
  // channel, whose rows carry x, its scales and the top-k ids and weights: the NVLink hint of
  // that exchange, exactly.
  const int per_node = ranks_per_node(num_ranks);
  const int num_nodes = (num_ranks + per_node - 1) / per_node;
  if (num_nodes <= 1) return 0;
  if (num_nodes > kMaxNvlRanks)
    detail::raise(ErrorKind::kValue, "num_ranks: internode mode reaches at most ", kMaxNvlRanks, " nodes, got ",
                  num_nodes);
  // A lane forced onto the put path also holds its 64-bit tails and a mirror of every ring
  // (MOELINK_DEBUG_LANE_FORCE_PUT).
  const bool puts = knobs::debug_lane_force_put() != knobs::LanePut::kStores;
  const auto layout = intranode::RingLayout::make(num_nodes, num_channels(), num_max_rdma_chunked_recv_tokens,
                                                hidden_bytes, static_cast<int>(hidden_bytes / 128), kernels::kMaxTopK,
                                                puts);
  return layout.total_bytes(puts);
}

Config default_dispatch_config(int num_ranks, int num_sms) {
  if (num_ranks < 1) detail::raise(ErrorKind::kValue, "num_ranks: expected >= 1, got ", num_ranks);
  // 128-slot rings let a sender run several 24-token batches ahead of its receivers; measured best
  // of 24/64/128 slots at 4x24, 4x8 and 8x16 SMs on an H100 (bench/RESULTS.md). Receivers drain
  // up to max(chunk, slots / 2) rows per handshake.
  return Config(num_sms, 16, 128, 8, 128);
}

Config default_combine_config(int num_ranks, int num_sms) {
  if (num_ranks < 1) detail::raise(ErrorKind::kValue, "num_ranks: expected >= 1, got ", num_ranks);
  // Combine receivers walk tokens in batches of min(warps, slots - chunk); 16-row chunks into
  // 128-slot rings measured best of 16/32/64/128 slots.
  return Config(num_sms, 16, 128, 8, 128);
}

}  // namespace moelink
