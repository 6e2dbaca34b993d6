"""CUDA graphs (Runtime v2 contract E): get_dispatch_layout + dispatch(num_worst_tokens=R*T) +
combine captured with torch.cuda.graph and replayed on fresh data, on 2 and 4 ranks, without and
with a receive arena (512 MiB on every rank).

Two graphs share one Buffer: graph A computes combine's input from recv_x inside the graph, graph B
reads a static input (in the arena when there is one) that the host fills from the reference before
each replay. Each of REPLAYS rounds refills both graphs' static inputs with fresh routing and data,
replays them and checks every output against the reference (rows bit-exact, padding -1, combine
within checks.check_combine's tolerance), and checks that replaying B left A's outputs alone. Every
EAGER_EVERY rounds an eager dispatch + combine runs on the same Buffer and is checked too; its
recv_x is kept across the next replays and must still be intact afterwards.
"""

import gc

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

import checks  # noqa: E402
import common  # noqa: E402
import faults  # noqa: E402
import launcher  # noqa: E402
from checks import Case  # noqa: E402

from reference import moe_reference as ref  # noqa: E402

REPLAYS = 100
EAGER_EVERY = 10
GRAPH_CASES = (Case("graph-a", 256, 2048, 8, 64), Case("graph-b", 128, 4096, 4, 32, drop_prob=0.2))
EAGER_CASE = Case("eager", 200, 2048, 8, 64, alignment=4)
ARENA_BYTES = 512 * common.MIB


class CapturedRound:
    """One captured layout + dispatch + combine with its static inputs and outputs."""

    def __init__(self, buf, rank, num_ranks, case, config, combine_config, y_in_graph: bool):
        self.buf, self.rank, self.num_ranks = buf, rank, num_ranks
        self.config, self.combine_config = config, combine_config
        self.case = case.resolved(num_ranks)
        num_tokens, hidden, num_topk = self.case.num_tokens, self.case.hidden, self.case.num_topk
        self.num_worst = num_ranks * num_tokens
        self.x = torch.empty((num_tokens, hidden), dtype=torch.bfloat16, device="cuda")
        self.topk_idx = torch.empty((num_tokens, num_topk), dtype=torch.int64, device="cuda")
        self.topk_weights = torch.empty((num_tokens, num_topk), dtype=torch.float32, device="cuda")
        self.y = None
        if not y_in_graph:
            self.y = buf.arena_empty((self.num_worst, hidden), torch.bfloat16) if buf.num_arena_bytes else None
            if self.y is None:
                self.y = torch.empty((self.num_worst, hidden), dtype=torch.bfloat16, device="cuda")
        self.graph = None
        self.outputs = None

    def load(self, seed: int) -> None:
        """Fresh routing and data into the static inputs, and the reference of that data."""
        self.routed = faults.routed(self.case, seed, self.rank, self.num_ranks)
        self.x.copy_(self.routed.mine.x)
        self.topk_idx.copy_(self.routed.topk_idx)
        self.topk_weights.copy_(self.routed.mine.topk_weights)
        self.want = self.routed.want()
        if self.y is not None:
            self.y.copy_(self.routed.combine_input(self.want, self.num_worst))

    def _ops(self):
        num_experts = self.case.num_experts
        num_tokens_per_rank, rdma, num_tokens_per_expert, is_token_in_rank, _ = \
            self.buf.get_dispatch_layout(self.topk_idx, num_experts)
        out = self.buf.dispatch(self.x, num_tokens_per_rank=num_tokens_per_rank, is_token_in_rank=is_token_in_rank,
                                num_tokens_per_expert=num_tokens_per_expert, topk_idx=self.topk_idx,
                                topk_weights=self.topk_weights, num_worst_tokens=self.num_worst, config=self.config)
        y = self.y
        if y is None:
            y = (out[0].float() * checks.combine_scale(self.rank)).to(torch.bfloat16)
        combined = self.buf.combine(y, out[4], topk_weights=out[2], config=self.combine_config)
        return (num_tokens_per_rank, rdma, num_tokens_per_expert, is_token_in_rank), out, combined

    def capture(self, seed: int, what: str) -> None:
        self.load(seed)
        self.outputs = self._ops()  # warm-up, eager, checked like a replay
        self.check(f"{what} warm-up")
        self.outputs = None
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = self._ops()
        torch.cuda.synchronize()

    def replay(self, seed: int) -> None:
        self.load(seed)
        self.graph.replay()

    def check(self, what: str) -> None:
        layout, out, (combined_x, combined_weights, _) = self.outputs
        r = self.routed
        common.check_layout(layout, ref.reference_layout(r.topk_idx, self.case.num_experts, self.num_ranks), what)
        checks.check_dispatch(out, self.want, self.num_worst, self.case, what)
        checks.check_combine(combined_x, combined_weights, *r.want_combine(), what)

    def check_recv_x(self, what: str) -> None:
        """The last replay's recv_x is still what that replay received."""
        checks.check_recv_x(self.outputs[1][0], self.want, self.num_worst, self.case, what)


def eager_round(buf, rank, num_ranks, seed, config, combine_config, what):
    """An uncached dispatch + combine outside the graphs; (recv_x, its reference) to keep."""
    r = faults.routed(EAGER_CASE.resolved(num_ranks), seed, rank, num_ranks)
    out, want = faults.checked_dispatch(buf, r, config, what=what)
    faults.checked_combine(buf, r, out, want, combine_config, what=what)
    return out[0], want


def _graphs(rank, num_ranks, seed):
    config, combine_config = common.make_configs(num_ranks, common.num_sms_for(num_ranks))
    hidden_sizes = sorted({case.hidden for case in GRAPH_CASES + (EAGER_CASE,)})
    eager_case = EAGER_CASE.resolved(num_ranks)
    for arena in (0, ARENA_BYTES):
        mode = "arena" if arena else "rings"
        buf = common.make_buffer(num_ranks, (config, combine_config), hidden_sizes, num_arena_bytes=arena)
        graphs = [CapturedRound(buf, rank, num_ranks, GRAPH_CASES[0], config, combine_config, y_in_graph=True),
                  CapturedRound(buf, rank, num_ranks, GRAPH_CASES[1], config, combine_config, y_in_graph=False)]
        for g, graph in enumerate(graphs):
            graph.capture(seed + g, f"rank {rank}/{num_ranks} {mode} graph {g}")
        kept = None
        for i in range(REPLAYS):
            what = f"rank {rank}/{num_ranks} {mode} replay {i}"
            for g, graph in enumerate(graphs):
                graph.replay(seed + 1000 * (g + 1) + i)
                graph.check(f"{what} graph {g}")
            graphs[0].check_recv_x(f"{what}: graph 0's recv_x after graph 1's replay")
            if kept is not None:
                checks.check_recv_x(kept[0], kept[1], kept[1].num_recv_tokens, eager_case,
                                    f"{what}: the eager round's recv_x after the replays that followed it")
                kept = None
            if i % EAGER_EVERY == EAGER_EVERY - 1:
                kept = eager_round(buf, rank, num_ranks, seed + 50000 + i, config, combine_config,
                                   f"{what} eager round")
                for g, graph in enumerate(graphs):
                    graph.check_recv_x(f"{what}: graph {g}'s recv_x after the eager round")
        common.log(rank, f"[R={num_ranks}] {mode}: 2 graphs x {REPLAYS} replays of fresh data, "
                         f"{REPLAYS // EAGER_EVERY} eager rounds between them: ok")
        del graphs, kept
        gc.collect()
        torch.cuda.synchronize()
        buf.destroy()


@pytest.mark.parametrize("num_ranks", (2, 4))
def test_cuda_graphs(num_ranks):
    launcher.run_ranks(num_ranks, _graphs, 13000 * num_ranks, timeout_s=300)
