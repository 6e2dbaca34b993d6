#pragma once
// Intranode normal mode, host side: argument and buffer-size checks, the notify host wait, launches.
#include "moelink/config.hpp"
#include "moelink/ops.hpp"

namespace moelink::runtime {
class Context;
}

namespace moelink::intranode {

DispatchPlan notify(runtime::Context& ctx, const DispatchInputs& in, const DispatchHandle& handle, const Config& config,
                    const StreamOrder& order);
EventHandle dispatch(runtime::Context& ctx, const DispatchInputs& in, const DispatchHandle& handle,
                     const DispatchOutputs& out, const Config& config, const StreamOrder& order, bool cached);
// The largest num_sms at which every rank sharing this GPU runs these kernels at once.
int max_num_sms(const runtime::Context& ctx);

EventHandle combine(runtime::Context& ctx, const CombineInputs& in, const DispatchHandle& handle,
                    const CombineOutputs& out, const Config& config, const StreamOrder& order);

}  // namespace moelink::intranode
