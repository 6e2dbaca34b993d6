"""Soak: many rounds of dispatch + combine with fresh routing every round, each verified against
tests/reference, and device memory watched for growth.

    bash scripts/with_mps.sh python3 bench/soak.py [--rounds 10000] [--ranks 4] [--hidden 2048] [--first-round 0]

Every round each rank draws its own T in [0, 4096] (0 included) and its routing (tests/reference
make_routing: -1 slots, tokens routed nowhere); the round's options are drawn from the round's seed,
so every rank agrees on them: dispatch ordered by previous_event with async_finish (inputs written
late, outputs sometimes allocated on the comm stream), num_worst_tokens, expert_alignment, a cached
dispatch of fresh data reusing the handle, combine bias, a combine input in the arena. Even ranks
take dispatch rows into an arena, odd ranks through the rings. Ranks exchange their routing over
gloo, never through moelink, so each builds its own reference; every output is compared on the GPU
(checks.py). A mismatch is counted and the soak goes on (the ranks must stay in step); a moelink
exception ends it.

Every --mem-every rounds all ranks sample torch.cuda.memory_allocated() and the device's free memory
(after gc, synchronize, empty_cache); growth of either beyond 64 MiB after the first sample fails.
Last line: "soak: R ranks, N rounds (from round F), M mismatches, X rounds/s, memory growth Y MiB". Exit status 0
when M == 0 and memory did not grow, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
for _path in (REPO_ROOT / "tests", REPO_ROOT / "tests" / "gpu"):  # common.py adds build/python
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import launcher  # noqa: E402

GROWTH_LIMIT_MIB = 64
MAX_REPORTED = 5  # mismatches printed in full per rank


def _draw_options(seed: int, i: int) -> dict:
    """The round's options, the same on every rank."""
    import numpy as np

    rng = np.random.default_rng([seed, i, 0x50AC])
    use_async = bool(rng.random() < 0.3)
    return dict(use_async=use_async, on_comm_stream=use_async and bool(rng.random() < 0.5),
                worst=bool(rng.random() < 0.3), slack=int(rng.integers(0, 65)),
                alignment=int(rng.choice([1, 1, 4, 128])), cached=bool(rng.random() < 0.5),
                num_bias=int(rng.integers(0, 3)), y_in_arena=bool(rng.random() < 0.5))


def _one_round(buf, rank, num_ranks, i, opts, config, combine_config, report) -> bool:
    """Round i on this rank; True when every output matched the reference."""
    import numpy as np
    import torch
    import torch.distributed as dist

    import checks
    import common
    from reference import moe_reference as ref

    seed, hidden, num_topk, num_experts = opts["seed"], opts["hidden"], opts["topk"], opts["experts"]
    o = _draw_options(seed, i)
    rng = np.random.default_rng([seed, i, rank, 0x7])
    num_tokens = 0 if rng.random() < 0.05 else int(rng.integers(0, opts["max_tokens"] + 1))
    round_seed = ref.mix_seed(seed, i)
    routing = ref.make_routing(round_seed, rank, num_tokens, num_topk, num_experts, num_ranks,
                               drop_prob=0.1, nowhere_prob=0.05)
    gathered = [None] * num_ranks
    dist.all_gather_object(gathered, routing)
    tokens = [int(t.shape[0]) for t in gathered]
    inputs = [ref.make_inputs(round_seed, s, tokens[s], hidden, num_topk, device="cuda") for s in range(num_ranks)]
    mine = inputs[rank]
    num_worst = 0
    if o["worst"]:
        per_rank = sum(ref.layout_np(t, num_experts, num_ranks)[0].astype(np.int64) for t in gathered)
        num_worst = int(per_rank.max()) + o["slack"]
    case = checks.Case(f"round {i}", num_tokens, hidden, num_topk, num_experts, alignment=o["alignment"],
                       worst=num_worst > 0, num_bias=o["num_bias"])
    what = f"rank {rank} round {i} (T={num_tokens}, worst={num_worst}, {o})"
    ok = True

    def verify(check, *args):
        nonlocal ok
        try:
            check(*args)
        except AssertionError as e:
            ok = False
            report.append(str(e))

    topk_idx = torch.from_numpy(routing).cuda()
    *layout, _ = buf.get_dispatch_layout(topk_idx, num_experts)
    expected_layout = ref.reference_layout(topk_idx, num_experts, num_ranks)
    verify(common.check_layout, layout, expected_layout, what)
    want = ref.reference_dispatch(gathered, [inp.x for inp in inputs], [inp.topk_weights for inp in inputs], rank,
                                  num_experts, num_ranks, o["alignment"])

    def ordered(tensor):
        """(input, previous_event): written late and ordered by an event in async rounds."""
        if not o["use_async"]:
            return tensor, None
        return checks.written_late(tensor), buf.capture()

    x, previous_event = ordered(mine.x)
    out = buf.dispatch(x, num_tokens_per_rank=layout[0], is_token_in_rank=layout[3], num_tokens_per_expert=layout[2],
                       topk_idx=topk_idx, topk_weights=mine.topk_weights, expert_alignment=o["alignment"],
                       num_worst_tokens=num_worst, config=config, previous_event=previous_event,
                       async_finish=o["use_async"], allocate_on_comm_stream=o["on_comm_stream"])
    if o["use_async"]:
        out[5].current_stream_wait()
    verify(checks.check_dispatch, out, want, num_worst, case, what)
    num_rows = num_worst or want.num_recv_tokens

    if o["cached"]:
        fresh = [ref.make_inputs(round_seed, s, tokens[s], hidden, num_topk, device="cuda", salt=1)
                 for s in range(num_ranks)]
        want_cached = ref.reference_dispatch(gathered, [inp.x for inp in fresh], None, rank, num_experts, num_ranks,
                                             o["alignment"])
        cached = buf.dispatch(fresh[rank].x, handle=out[4], config=config)
        verify(checks.check_recv_x, cached[0], want_cached, num_rows, case, f"{what} cached")
        del fresh, cached

    y = checks.combine_input(inputs, want.plan, rank, num_rows, hidden)
    if o["y_in_arena"] and buf.num_arena_bytes:
        in_place = buf.arena_empty(y.shape, y.dtype)
        if in_place is not None:
            in_place.copy_(y)
            y = in_place
    bias = ref.make_bias(round_seed, rank, num_tokens, hidden, o["num_bias"], device="cuda")
    y, previous_event = ordered(y)
    combined_x, combined_weights, event = buf.combine(
        y, out[4], topk_weights=out[2], bias=bias, config=combine_config, previous_event=previous_event,
        async_finish=o["use_async"], allocate_on_comm_stream=o["on_comm_stream"])
    if o["use_async"]:
        event.current_stream_wait()
    want_x, want_weights = ref.reference_combine(
        expected_layout[3], lambda d, t: (mine.x[t].float() * checks.combine_scale(d)).to(torch.bfloat16), hidden,
        topk_idx, mine.topk_weights, num_experts, bias)
    verify(checks.check_combine, combined_x, combined_weights, want_x, want_weights, what)
    return ok


def _soak(rank, num_ranks, opts):
    import torch

    import common

    config, combine_config = common.make_configs(num_ranks, common.num_sms_for(num_ranks))
    arena = opts["arena_mib"] * common.MIB if rank % 2 == 0 else 0
    buf = common.make_buffer(num_ranks, (config, combine_config), (opts["hidden"],), num_arena_bytes=arena)
    mismatches, report, samples = 0, [], []
    start = time.perf_counter()
    first = opts["first_round"]
    for i in range(first, first + opts["rounds"]):
        if not _one_round(buf, rank, num_ranks, i, opts, config, combine_config, report):
            mismatches += 1
            if mismatches <= MAX_REPORTED:
                print(f"soak: rank {rank} round {i} MISMATCH:\n  " + "\n  ".join(report), flush=True)
            report.clear()
        done = i + 1 - first
        if done % opts["mem_every"] == 0:
            free = common.settled_free_memory()
            samples.append((done, torch.cuda.memory_allocated(), free))
            common.log(rank, f"soak: {done} rounds (to round {i}), {mismatches} mismatches on rank 0, "
                             f"{done / (time.perf_counter() - start):.1f} rounds/s, "
                             f"allocated {samples[-1][1] / common.MIB:.1f} MiB, "
                             f"device free {free / common.MIB:.0f} MiB")
    seconds = time.perf_counter() - start
    buf.destroy()
    growth = 0
    if samples:
        _, base_allocated, base_free = samples[0]
        growth = max([0] + [max(allocated - base_allocated, base_free - free) for _, allocated, free in samples[1:]])
    return dict(mismatches=mismatches, seconds=seconds, growth=growth, samples=samples)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10000)
    parser.add_argument("--ranks", type=int, default=4, choices=(2, 4, 8))
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--arena-mib", type=int, default=256, help="receive arena of the even ranks (0: none)")
    parser.add_argument("--mem-every", type=int, default=1000, help="rounds between memory samples")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--first-round", type=int, default=0,
                        help="the first round's index: a round's routing and options depend only on the seed and "
                             "its index, so runs of --rounds N from 0, N, 2N, ... make up one longer soak")
    parser.add_argument("--timeout-s", type=float, default=None, help="default: 300 s + 0.5 s per round")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.mem_every < 1 or args.first_round < 0 or args.hidden % 128:
        parser.error("--rounds and --mem-every must be >= 1, --first-round >= 0 and --hidden a multiple of 128")
    opts = dict(rounds=args.rounds, hidden=args.hidden, topk=args.topk, experts=args.experts,
                max_tokens=args.max_tokens, arena_mib=args.arena_mib, mem_every=args.mem_every, seed=args.seed,
                first_round=args.first_round)
    timeout_s = args.timeout_s if args.timeout_s is not None else 300 + 0.5 * args.rounds
    results = launcher.run_ranks(args.ranks, _soak, opts, timeout_s=timeout_s)
    mismatches = sum(r["mismatches"] for r in results)
    rate = args.rounds / max(r["seconds"] for r in results)
    growth_mib = max(r["growth"] for r in results) / (1 << 20)
    print(f"soak: {args.ranks} ranks, {args.rounds} rounds (from round {args.first_round}), {mismatches} mismatches, "
          f"{rate:.1f} rounds/s, memory growth {growth_mib:.1f} MiB", flush=True)
    if len(results[0]["samples"]) < 2:
        print(f"soak: fewer than two memory samples (every {args.mem_every} rounds): growth not measured", flush=True)
    return 0 if mismatches == 0 and growth_mib <= GROWTH_LIMIT_MIB else 1


if __name__ == "__main__":
    sys.exit(main())
