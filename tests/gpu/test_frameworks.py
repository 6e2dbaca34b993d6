"""The call sequences of the frameworks that use deep_ep, through the ``deep_ep`` name, against the
reference: what Megatron-LM's flex dispatcher (fused_a2a), SGLang's normal-mode DeepEP dispatcher
and vLLM's high-throughput all2all manager call, with the arguments they pass. Each is a rank
function that imports only ``deep_ep`` (moelink.install_as_deep_ep() stands in for the installed
shim), the way the framework's own module does.

The sequences follow the frameworks' sources (call shapes and keyword names, not their code):
- Megatron: EventOverlap(EventHandle()) as previous_event with async_finish and
  allocate_on_comm_stream everywhere; Buffer.set_num_sms; the NVLink size from the dispatch and
  combine configs' hints; dispatch forward, combine forward, and their backwards (combine of the
  gradient, cached dispatch of the gradient).
- SGLang: Config(**fields) from its tuning JSON; Buffer(..., allow_mnnvl=True) in auto mode
  (low_latency_mode=True, num_rdma_bytes covering get_low_latency_rdma_size_hint);
  Buffer.capture() as previous_event; expert_alignment=128; async and sync rounds.
- vLLM: Buffer(group=<gloo group>, num_nvl_bytes=1 GiB, num_rdma_bytes=0, low_latency_mode=False,
  num_qps_per_rank=1, explicitly_destroy=True); layout and dispatch without previous events;
  `event.event is not None` before waiting; combine with topk_weights=None.
"""

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

import moelink  # noqa: E402

import checks  # noqa: E402
import common  # noqa: E402
import launcher  # noqa: E402
from checks import Case  # noqa: E402

from reference import moe_reference as ref  # noqa: E402

HIDDEN = 2048


def _deep_ep():
    moelink.install_as_deep_ep()
    import deep_ep

    return deep_ep


def _round_inputs(num_ranks, seed, num_experts, salt=0):
    case = Case("framework", 256, HIDDEN, 8, num_experts).resolved(num_ranks)
    routing = checks.make_routing_all(case, seed, num_ranks)
    inputs = checks.make_inputs_all(case, seed, num_ranks, salt=salt)
    return case, routing, inputs


def _expect_round(case, routing, inputs, rank, num_ranks, alignment=1):
    return ref.reference_dispatch(routing, [inp.x for inp in inputs], [inp.topk_weights for inp in inputs], rank,
                                  case.num_experts, num_ranks, alignment)


def _expect_combine(case, routing, inputs, rank, num_ranks, with_weights):
    mine = inputs[rank]
    topk_idx = torch.from_numpy(routing[rank]).cuda()
    is_token_in_rank = ref.reference_layout(topk_idx, case.num_experts, num_ranks)[3]
    return ref.reference_combine(
        is_token_in_rank, lambda d, tokens: (mine.x[tokens].float() * checks.combine_scale(d)).to(torch.bfloat16),
        case.hidden, topk_idx, mine.topk_weights if with_weights else None, case.num_experts)


def _check_combined(combined, with_weights, case, routing, inputs, rank, num_ranks, what):
    """combined: combine's (combined_x, combined_topk_weights) as returned; with_weights: whether the
    call passed topk_weights (then the weights must come back, else None)."""
    want_x, want_weights = _expect_combine(case, routing, inputs, rank, num_ranks, with_weights=with_weights)
    checks.check_combine(combined[0], combined[1], want_x, want_weights, what)


def _megatron(rank, num_ranks, seed):
    deep_ep = _deep_ep()
    from deep_ep import Buffer
    from deep_ep.utils import EventHandle, EventOverlap

    group = common.world_group()
    Buffer.set_num_sms(24)
    hidden_bytes = HIDDEN * 2
    num_nvl_bytes = 0
    for config in (Buffer.get_dispatch_config(group.size()), Buffer.get_combine_config(group.size())):
        num_nvl_bytes = max(config.get_nvl_buffer_size_hint(hidden_bytes, group.size()), num_nvl_bytes)
    buffer = Buffer(group, num_nvl_bytes, 0)
    num_experts = 8 * num_ranks
    for i in range(3):
        case, routing, inputs = _round_inputs(num_ranks, seed + i, num_experts)
        mine = inputs[rank]
        token_indices = torch.from_numpy(routing[rank]).cuda()
        token_probs = mine.topk_weights
        what = f"megatron rank {rank}/{num_ranks} round {i}"

        # FusedDispatch.forward
        previous_event = EventOverlap(EventHandle())
        (num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank,
         previous_event) = buffer.get_dispatch_layout(token_indices, num_experts, previous_event=previous_event,
                                                      async_finish=True, allocate_on_comm_stream=True)
        recv_x, recv_token_indices, recv_token_probs, num_recv_tokens_per_expert_list, handle, after_event = \
            buffer.dispatch(mine.x, topk_idx=token_indices, topk_weights=token_probs,
                            num_tokens_per_rank=num_tokens_per_rank, num_tokens_per_rdma_rank=num_tokens_per_rdma_rank,
                            is_token_in_rank=is_token_in_rank, num_tokens_per_expert=num_tokens_per_expert,
                            previous_event=previous_event, async_finish=True, allocate_on_comm_stream=True)
        after_event.current_stream_wait()
        want = _expect_round(case, routing, inputs, rank, num_ranks)
        checks.check_dispatch((recv_x, recv_token_indices, recv_token_probs, num_recv_tokens_per_expert_list, handle,
                               after_event), want, 0, case, what)

        # FusedCombine.forward (the experts' output) ...
        y = checks.combine_input(inputs, want.plan, rank, want.num_recv_tokens, case.hidden)
        combined_x, combined_weights, after_event = buffer.combine(y, handle=handle, async_finish=True,
                                                                   previous_event=EventOverlap(EventHandle()),
                                                                   allocate_on_comm_stream=True)
        after_event.current_stream_wait()
        _check_combined((combined_x, combined_weights), False, case, routing, inputs, rank, num_ranks,
                        f"{what}: combine forward")

        # ... FusedCombine.backward: the gradient goes out again by a cached dispatch ...
        grad = inputs[rank].x.flip(0).contiguous()  # stands for the combined output's gradient
        grad_x, _, _, _, _, after_event = buffer.dispatch(grad, handle=handle,
                                                          previous_event=EventOverlap(EventHandle()),
                                                          async_finish=True, allocate_on_comm_stream=True)
        after_event.current_stream_wait()
        flipped = [inp.x.flip(0).contiguous() for inp in inputs]
        want_grad = ref.reference_dispatch(routing, flipped, None, rank, case.num_experts, num_ranks)
        common.assert_bits_equal(grad_x, want_grad.recv_x, f"{what}: cached dispatch (combine backward)")

        # ... and FusedDispatch.backward: the experts' input gradient comes back by a combine.
        grad_in, grad_probs, after_event = buffer.combine(y, handle, topk_weights=recv_token_probs.float(),
                                                          previous_event=EventOverlap(EventHandle()),
                                                          async_finish=True, allocate_on_comm_stream=True)
        after_event.current_stream_wait()
        _check_combined((grad_in, grad_probs), True, case, routing, inputs, rank, num_ranks,
                        f"{what}: dispatch backward")
        common.log(rank, f"[R={num_ranks}] megatron round {i} exact")
    del buffer, deep_ep  # Megatron never calls destroy(): the Buffer is dropped (explicitly_destroy=False)


def _sglang(rank, num_ranks, seed):
    deep_ep = _deep_ep()
    from deep_ep import Buffer, Config

    # deep_ep tuning JSON, as SGLang reads it (--deepep-config)
    tuned = {"normal_dispatch": {"num_sms": 24, "num_max_nvl_chunked_send_tokens": 16,
                                 "num_max_nvl_chunked_recv_tokens": 256, "num_max_rdma_chunked_send_tokens": 6,
                                 "num_max_rdma_chunked_recv_tokens": 128},
             "normal_combine": {"num_sms": 24, "num_max_nvl_chunked_send_tokens": 6,
                                "num_max_nvl_chunked_recv_tokens": 256, "num_max_rdma_chunked_send_tokens": 6,
                                "num_max_rdma_chunked_recv_tokens": 128}}
    dispatch_config = Config(**tuned["normal_dispatch"])
    combine_config = Config(**tuned["normal_combine"])
    group = common.world_group()
    num_experts = 8 * num_ranks
    hidden_bytes = HIDDEN * 2
    num_nvl_bytes = max(c.get_nvl_buffer_size_hint(hidden_bytes, group.size())
                        for c in (dispatch_config, combine_config, Buffer.get_dispatch_config(group.size()),
                                  Buffer.get_combine_config(group.size())))
    # auto mode: one buffer for prefill (normal) and decode (low latency)
    num_rdma_bytes = Buffer.get_low_latency_rdma_size_hint(128, HIDDEN, group.size(), num_experts)
    buffer = Buffer(group, num_nvl_bytes=num_nvl_bytes, num_rdma_bytes=num_rdma_bytes, low_latency_mode=True,
                    num_qps_per_rank=num_experts // group.size(), allow_mnnvl=True)
    for i, async_finish in enumerate((True, False, True)):
        case, routing, inputs = _round_inputs(num_ranks, seed + i, num_experts)
        mine = inputs[rank]
        topk_idx = torch.from_numpy(routing[rank]).cuda()
        what = f"sglang rank {rank}/{num_ranks} round {i} async={async_finish}"
        previous_event = Buffer.capture() if async_finish else None
        (num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank,
         previous_event) = buffer.get_dispatch_layout(topk_idx, num_experts, previous_event=previous_event,
                                                      async_finish=async_finish,
                                                      allocate_on_comm_stream=previous_event is not None)
        out = buffer.dispatch(mine.x, topk_idx=topk_idx, topk_weights=mine.topk_weights,
                              num_tokens_per_rank=num_tokens_per_rank, num_tokens_per_rdma_rank=num_tokens_per_rdma_rank,
                              is_token_in_rank=is_token_in_rank, num_tokens_per_expert=num_tokens_per_expert,
                              previous_event=previous_event, async_finish=async_finish,
                              allocate_on_comm_stream=(previous_event is not None) and async_finish,
                              expert_alignment=128, config=dispatch_config)
        if async_finish:
            out[5].current_stream_wait()
        want = _expect_round(case, routing, inputs, rank, num_ranks, alignment=128)
        checks.check_dispatch(out, want, 0, case, what)
        y = checks.combine_input(inputs, want.plan, rank, want.num_recv_tokens, case.hidden)
        previous_event = Buffer.capture() if async_finish else None
        *combined, event = buffer.combine(y, out[4], async_finish=async_finish, previous_event=previous_event,
                                          allocate_on_comm_stream=previous_event is not None, config=combine_config)
        if async_finish:
            event.current_stream_wait()
        _check_combined(combined, False, case, routing, inputs, rank, num_ranks, f"{what}: combine")
        common.log(rank, f"[R={num_ranks}] sglang round {i} exact")
    del buffer, deep_ep  # SGLang never calls destroy(): the Buffer is dropped (explicitly_destroy=False)


def _vllm(rank, num_ranks, seed):
    deep_ep = _deep_ep()

    cpu_group = common.world_group()  # gloo, as vLLM's device communicator passes its CPU group
    buffer = deep_ep.Buffer(group=cpu_group, num_nvl_bytes=1024 * 1024 * 1024, num_rdma_bytes=0,
                            low_latency_mode=False, num_qps_per_rank=1, explicitly_destroy=True)
    dispatch_config = deep_ep.Buffer.get_dispatch_config(num_ranks)
    combine_config = deep_ep.Buffer.get_combine_config(num_ranks)
    num_experts = 8 * num_ranks
    for i, async_prepare in enumerate((False, True)):
        case, routing, inputs = _round_inputs(num_ranks, seed + i, num_experts)
        mine = inputs[rank]
        rank_topk_ids = torch.from_numpy(routing[rank]).cuda().to(deep_ep.topk_idx_t)
        what = f"vllm rank {rank}/{num_ranks} round {i} async={async_prepare}"
        (num_tokens_per_rank, num_tokens_per_rdma_rank, dispatch_expert_num_tokens, is_token_in_rank,
         event) = buffer.get_dispatch_layout(topk_idx=rank_topk_ids, num_experts=num_experts, previous_event=None,
                                             async_finish=False, allocate_on_comm_stream=False)
        out = buffer.dispatch(x=mine.x, handle=None, num_tokens_per_rank=num_tokens_per_rank,
                              num_tokens_per_rdma_rank=num_tokens_per_rdma_rank, is_token_in_rank=is_token_in_rank,
                              num_tokens_per_expert=dispatch_expert_num_tokens, topk_idx=rank_topk_ids,
                              topk_weights=mine.topk_weights, expert_alignment=1, config=dispatch_config,
                              previous_event=None, async_finish=async_prepare, allocate_on_comm_stream=False)
        event = out[5]
        if async_prepare:
            assert event.event is not None, f"{what}: an async dispatch must return an event"
        if event.event is not None:
            event.current_stream_wait()
        want = _expect_round(case, routing, inputs, rank, num_ranks)
        checks.check_dispatch(out, want, 0, case, what)
        y = checks.combine_input(inputs, want.plan, rank, want.num_recv_tokens, case.hidden)
        *combined, event = buffer.combine(x=y, handle=out[4], topk_weights=None, config=combine_config,
                                          previous_event=None, async_finish=async_prepare, allocate_on_comm_stream=False)
        if event.event is not None:
            event.current_stream_wait()
        _check_combined(combined, False, case, routing, inputs, rank, num_ranks, f"{what}: combine")
        common.log(rank, f"[R={num_ranks}] vllm round {i} exact")
    buffer.destroy()


@pytest.mark.parametrize("num_ranks", (2, 4))
@pytest.mark.parametrize("framework", ("megatron", "sglang", "vllm"))
def test_framework_call_sequence(framework, num_ranks):
    fn = {"megatron": _megatron, "sglang": _sglang, "vllm": _vllm}[framework]
    launcher.run_ranks(num_ranks, fn, 69000 + 100 * num_ranks, timeout_s=300)
