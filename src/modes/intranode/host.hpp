#pragma once
// Intranode normal mode, host side: argument and buffer-size checks, the notify host wait, launches.
#include "moelink/config.hpp"
#include "moelink/ops.hpp"

namespace moelink::runtime {
class Context;
}

namespace moelink::intranode {

// notify_launch checks the arguments (a rank that rejects them abstains; the handle's tensors too
// when given), opens the dispatch and launches the count exchange, and returns; notify_wait waits
// on the host for its counts. notify is the two.
void notify_launch(runtime::Context& ctx, const DispatchInputs& in, const Config& config, const StreamOrder& order,
                   const DispatchHandle* handle = nullptr);
DispatchPlan notify_wait(runtime::Context& ctx);
DispatchPlan notify(runtime::Context& ctx, const DispatchInputs& in, const DispatchHandle& handle, const Config& config,
                    const StreamOrder& order);
EventHandle dispatch(runtime::Context& ctx, const DispatchInputs& in, const DispatchHandle& handle,
                     const DispatchOutputs& out, const Config& config, const StreamOrder& order, bool cached);
// The largest num_sms at which every rank sharing this GPU runs these kernels at once.
// The largest num_sms whose blocks fit on this GPU at once with ranks_per_gpu ranks on it (0: this
// Buffer's own count of ranks sharing its GPU).
int max_num_sms(const runtime::Context& ctx, int ranks_per_gpu = 0);

EventHandle combine(runtime::Context& ctx, const CombineInputs& in, const DispatchHandle& handle,
                    const CombineOutputs& out, const Config& config, const StreamOrder& order);

}  // namespace moelink::intranode
