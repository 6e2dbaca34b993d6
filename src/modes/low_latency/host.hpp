#pragma once
// Low-latency mode, host side (deep_ep's low_latency_dispatch / low_latency_combine).
#include "moelink/ops.hpp"

namespace moelink::runtime {
class Context;
}

namespace moelink::low_latency {

int64_t rdma_size_hint(int max_tokens, int hidden, int num_ranks, int num_experts);
EventHandle dispatch(runtime::Context& ctx, const LowLatencyDispatchInputs& in, const LowLatencyDispatchOutputs& out,
                     LowLatencyPhase phase, const StreamOrder& order);
EventHandle combine(runtime::Context& ctx, const LowLatencyCombineInputs& in, const LowLatencyCombineOutputs& out,
                    LowLatencyPhase phase, const StreamOrder& order);
// Zeroes this rank's signal words of the layout, between two barriers (Buffer::clean_low_latency_buffer).
void clean(runtime::Context& ctx, int max_tokens, int hidden, int num_experts);
// Shrink's mask calls (Buffer::low_latency_update_mask and the others).
EventHandle mask_call(runtime::Context& ctx, int op, int rank, int value, const TensorRef* out, const StreamOrder& order);
// The zero-copy combine input area `which` (0 or 1) of this rank's low-latency region.
void* combine_buffer(const runtime::Context& ctx, int max_tokens, int hidden, int num_experts, int which);

}  // namespace moelink::low_latency
