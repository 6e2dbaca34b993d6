// get_dispatch_layout, host side: from top-k expert ids to the counts and mask a dispatch needs.
#include "modes/layout/host.hpp"

#include "modes/layout/contract.hpp"
#include "runtime/context.hpp"
#include "runtime/errors.hpp"

namespace moelink::layout {

using detail::raise;
using runtime::Context;

namespace {

void check_shape(const TensorRef& t, std::initializer_list<int64_t> shape, DType dtype, int device, const char* arg) {
  check::defined(t, arg);
  check::dtype(t, dtype, arg);
  check::shape(t, std::vector<int64_t>(shape), arg);
  check::contiguous(t, arg);
  check::on_device(t, device, arg);
}

}  // namespace

EventHandle get_dispatch_layout(Context& ctx, const TensorRef& topk_idx, int num_experts, const LayoutOutputs& out,
                                const StreamOrder& order) {
  ctx.require_usable("get_dispatch_layout");
  // It opens no collective, so a pending data error is raised here, before its launch.
  ctx.check_on_entry(false);
  const int R = ctx.topo.num_ranks;
  check::defined(topk_idx, "topk_idx");
  check::dtype(topk_idx, DType::kInt64, "topk_idx");
  check::dim(topk_idx, 2, "topk_idx");
  check::contiguous(topk_idx, "topk_idx");
  check::on_device(topk_idx, ctx.device, "topk_idx");
  const int64_t T = topk_idx.size(0), K = topk_idx.size(1);
  if (K < 1 || K > kernels::kMaxTopK)
    raise(ErrorKind::kValue, "topk_idx: expected 1..", kernels::kMaxTopK, " columns (top-k), got ", K);
  if (num_experts <= 0 || num_experts % R != 0 || num_experts > kernels::kMaxExperts)
    raise(ErrorKind::kValue, "num_experts: expected a positive multiple of num_ranks (", R, ") up to ",
          kernels::kMaxExperts, ", got ", num_experts);
  check_shape(out.num_tokens_per_rank, {R}, DType::kInt32, ctx.device, "num_tokens_per_rank");
  check_shape(out.num_tokens_per_expert, {num_experts}, DType::kInt32, ctx.device, "num_tokens_per_expert");
  check_shape(out.is_token_in_rank, {T, R}, DType::kBool, ctx.device, "is_token_in_rank");
  const bool with_rdma = out.num_tokens_per_rdma_rank.data != nullptr;
  if (with_rdma)
    check_shape(out.num_tokens_per_rdma_rank, {ctx.topo.num_rdma_ranks}, DType::kInt32, ctx.device, "num_tokens_per_rdma_rank");

  ctx.begin_op(order);
  LayoutArgs args{};
  args.topk_idx = static_cast<const int64_t*>(topk_idx.data);
  args.num_tokens = static_cast<int>(T);
  args.num_topk = static_cast<int>(K);
  args.num_experts = num_experts;
  args.num_ranks = R;
  args.num_nvl_ranks = ctx.topo.num_nvl_ranks;
  args.num_tokens_per_rank = static_cast<int*>(out.num_tokens_per_rank.data);
  args.num_tokens_per_rdma_rank = with_rdma ? static_cast<int*>(out.num_tokens_per_rdma_rank.data) : nullptr;
  args.num_tokens_per_expert = static_cast<int*>(out.num_tokens_per_expert.data);
  args.is_token_in_rank = static_cast<bool*>(out.is_token_in_rank.data);
  args.err = ctx.error_sink();
  launch_layout(args, ctx.comm_stream);
  return ctx.end_op(order);
}

}  // namespace moelink::layout
