#pragma once
// get_dispatch_layout, host side: argument checks and the launch.
#include "moelink/ops.hpp"

namespace moelink::runtime {
class Context;
}

namespace moelink::layout {

EventHandle get_dispatch_layout(runtime::Context& ctx, const TensorRef& topk_idx, int num_experts,
                                const LayoutOutputs& out, const StreamOrder& order);

}  // namespace moelink::layout
