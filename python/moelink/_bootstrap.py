"""Bringing up the runtime of one Buffer: the collective that connects each rank to its peers."""

from typing import Any, Callable, List, Optional, Tuple

import torch
import torch.distributed as dist

from . import _knobs, _moelink
from ._checks import _check_int


def arena_bytes(num_arena_bytes: Optional[int]) -> int:
    """The receive arena's size: ``num_arena_bytes`` when given, else ``MOELINK_ARENA_BYTES``."""
    if num_arena_bytes is None:
        num_arena_bytes = _knobs.arena_bytes()
    return _check_int(num_arena_bytes, "num_arena_bytes", 0)


class SubGroup:
    """Some ranks of a Buffer's group, as the group of an inner Buffer (internode mode builds one per
    node and one per lane). Its all-gather is the parent's: every rank of the parent must make it at
    the same time (each building its own subgroup's Buffer), and keeps its members' entries."""

    def __init__(self, parent_all_gather: Callable[[Any], List[Any]], members: List[int], me: int) -> None:
        self._parent_all_gather = parent_all_gather
        self.members = list(members)
        self._index = self.members.index(me)

    def rank(self) -> int:
        return self._index

    def size(self) -> int:
        return len(self.members)

    def all_gather(self, obj: Any) -> List[Any]:
        everything = self._parent_all_gather(obj)
        return [everything[m] for m in self.members]


def rank_and_all_gather(group: Any, comm: Optional[Any]) -> Tuple[int, int, Callable[[Any], List[Any]]]:
    """(rank, num_ranks, all_gather) of a ProcessGroup, an mpi4py communicator or a SubGroup
    (exactly one of group and comm)."""
    if (group is None) == (comm is None):
        raise ValueError("Buffer needs exactly one of group (a torch.distributed ProcessGroup) or comm "
                         "(an mpi4py communicator)")
    if isinstance(group, SubGroup):
        return group.rank(), group.size(), group.all_gather
    if group is not None:
        rank, num_ranks = group.rank(), group.size()

        def all_gather(obj: Any) -> List[Any]:
            gathered = [None] * num_ranks
            dist.all_gather_object(gathered, obj, group=group)
            return gathered
    else:
        rank, num_ranks = comm.Get_rank(), comm.Get_size()
        all_gather = comm.allgather
    return rank, num_ranks, all_gather


def shared_world(worlds: List[Any], num_ranks: int) -> Optional[bytes]:
    """The NVSHMEM world a new Buffer over these ranks uses, from every rank's
    ``_moelink.nvshmem_world()`` in rank order (None, or (root id, pe, num_pes)): the id of the world
    that every rank is in already as pe == its rank of num_ranks, which the Buffer then shares
    (NVSHMEM is one world per process), or None when no rank is in one (the Buffer's root makes a
    new one). Any other mix raises ValueError, on every rank alike (each decides from the same
    gathered list): a rank would otherwise init a world while its peers wait in another."""
    def world_id(r: int) -> Optional[bytes]:
        return None if worlds[r] is None else worlds[r][0]

    def where(r: int) -> str:
        return "in none" if worlds[r] is None else f"pe {worlds[r][1]} of {worlds[r][2]} in one"

    if all(world is None for world in worlds):
        return None
    other = next((r for r in range(len(worlds)) if world_id(r) != world_id(0)), None)
    if other is not None:
        raise ValueError(f"NVSHMEM: a Buffer's ranks must all be in one NVSHMEM world already, or none of them (it is "
                         f"one world per process): rank 0 is {where(0)}, rank {other} {where(other)}; destroy the "
                         "Buffers that joined it first, or build this Buffer over the same ranks as they span")
    for rank, (_, pe, num_pes) in enumerate(worlds):
        if pe != rank or num_pes != num_ranks:
            raise ValueError(f"NVSHMEM: rank {rank} is pe {pe} of {num_pes} in the NVSHMEM world its process is in, "
                             f"so a Buffer over these {num_ranks} ranks cannot share it (it needs pe == rank); "
                             "destroy the Buffers that joined it first")
    return worlds[0][0]


def bootstrap(group: Optional["dist.ProcessGroup"], comm: Optional[Any], num_nvl_bytes: int, num_rdma_bytes: int,
              low_latency_mode: bool, explicitly_destroy: bool, num_qps_per_rank: int, num_arena_bytes: int,
              enable_shrink: bool, num_nvl_ranks: int) -> Tuple["_moelink.Buffer", "_moelink.Topology", int, int]:
    """(runtime, topology, rank, num_ranks) of this rank, connected to its peers: a collective over
    ``group`` or ``comm`` (exactly one must be given). The other arguments are checked already; the
    runtime lives on the current CUDA device."""
    rank, num_ranks, all_gather = rank_and_all_gather(group, comm)
    device = torch.cuda.current_device()

    # A rank that fails alone must not leave its peers blocked in the next collective, so every
    # rank reports success or its error in one all-gather and all of them raise together.
    runtime, info, error = None, None, None
    try:
        runtime = _moelink.Buffer(rank, num_ranks, num_nvl_bytes, num_rdma_bytes, low_latency_mode,
                                  explicitly_destroy, num_nvl_ranks, num_qps_per_rank, device=device,
                                  num_arena_bytes=num_arena_bytes, enable_shrink=enable_shrink)
        topology = runtime.topology
        # The NVSHMEM root: the lane's rank on node 0 in normal mode, global rank 0 in low-latency mode.
        is_root = rank == 0 if low_latency_mode else topology.rdma_rank == 0
        unique_id = runtime.local_nvshmem_unique_id() if runtime.uses_nvshmem and is_root else None
        info = (runtime.device_id, runtime.local_ipc_handle(), unique_id, _moelink.nvshmem_world())
    except Exception as e:  # noqa: BLE001 - re-raised below, after the peers learned of it
        error = e
    gathered = all_gather((None if error is None else f"{type(error).__name__}: {error}", info))
    if error is not None:
        raise error
    for peer, (peer_error, _) in enumerate(gathered):
        if peer_error is not None:
            raise RuntimeError(f"moelink.Buffer: rank {peer} failed to initialize: {peer_error}")

    device_ids = [peer_info[0] for _, peer_info in gathered]
    ipc_handles = [peer_info[1] for _, peer_info in gathered]
    root_unique_id = None
    if runtime.uses_nvshmem:
        root = 0 if low_latency_mode else topology.nvl_rank
        root_unique_id = gathered[root][1][2]
        if low_latency_mode:
            # One world per process: a low-latency Buffer over the ranks of a world the processes
            # are in (another low-latency Buffer's, an internode Buffer's lanes') shares it.
            try:
                shared = shared_world([peer_info[3] for _, peer_info in gathered], num_ranks)
            except ValueError:
                runtime.destroy()  # not synced: frees this rank's allocations only
                raise
            if shared is not None:
                root_unique_id = shared
    runtime.sync(device_ids, ipc_handles, root_unique_id)
    return runtime, topology, rank, num_ranks
