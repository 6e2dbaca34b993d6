"""get_dispatch_layout against tests/reference, synchronous and ordered by events."""

import itertools

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

import checks  # noqa: E402
import common  # noqa: E402
import launcher  # noqa: E402

from reference import moe_reference as ref  # noqa: E402

# (T, K, E); 40000 tokens takes the multi-block path of the layout kernel (above 32768 tokens).
SHAPES = list(itertools.product((0, 1, 4096), (1, 8), (8, 256))) + [(40000, 8, 256)]


def _layout(rank, num_ranks, seed):
    configs = common.make_configs(num_ranks, common.num_sms_for(num_ranks))
    buf = common.make_buffer(num_ranks, configs, (2048,))
    for i, (num_tokens, num_topk, num_experts) in enumerate(SHAPES):
        if num_experts < num_ranks or num_experts % num_ranks:
            continue
        for drop_prob in (0.0, 0.2):
            topk_idx = torch.from_numpy(ref.make_routing(seed + i, rank, num_tokens, num_topk, num_experts, num_ranks,
                                                         drop_prob=drop_prob)).cuda()
            *got, _ = buf.get_dispatch_layout(topk_idx, num_experts)
            common.check_layout(got, ref.reference_layout(topk_idx, num_experts, num_ranks),
                                f"rank {rank} T={num_tokens} K={num_topk} E={num_experts} drop={drop_prob}")
        common.log(rank, f"[R={num_ranks}] layout T={num_tokens} K={num_topk} E={num_experts}: ok")

    for repeat in range(3):
        _ordered_layout(buf, rank, num_ranks, seed + 100 + repeat)
        common.log(rank, f"[R={num_ranks}] layout ordered after a late write of topk_idx, round {repeat}: ok")
    buf.destroy()


def _late_topk(source):
    """source's values, written by the current stream only after a long sleep; before that every
    slot names expert 0, so a layout that does not wait reads a wrong but valid routing."""
    topk_idx = torch.zeros_like(source)
    torch.cuda._sleep(checks.SLEEP_CYCLES)
    topk_idx.copy_(source)
    return topk_idx


def _ordered_layout(buf, rank, num_ranks, seed):
    num_tokens, num_topk, num_experts = 4096, 8, 256
    source = torch.from_numpy(ref.make_routing(seed, rank, num_tokens, num_topk, num_experts, num_ranks,
                                               drop_prob=0.1)).cuda()
    want = ref.reference_layout(source, num_experts, num_ranks)
    torch.cuda.synchronize()

    # Default ordering: the comm stream waits for the current stream.
    *got, _ = buf.get_dispatch_layout(_late_topk(source), num_experts)
    common.check_layout(got, want, f"rank {rank} layout after the current stream")

    # previous_event + async_finish: ordered by the captured event, and the caller waits explicitly.
    topk_idx = _late_topk(source)
    *got, event = buf.get_dispatch_layout(topk_idx, num_experts, previous_event=buf.capture(), async_finish=True)
    event.current_stream_wait()
    common.check_layout(got, want, f"rank {rank} layout after previous_event")


@pytest.mark.parametrize("num_ranks", common.RANK_COUNTS)
def test_layout(num_ranks):
    launcher.run_ranks(num_ranks, _layout, 300 * num_ranks, timeout_s=180)
