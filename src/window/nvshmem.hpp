#pragma once
// NVSHMEM symmetric heap for the RDMA buffer. The transport is a plugin, libmoelink_nvshmem.so,
// built when the build finds NVSHMEM and opened on first use (nvshmem.cpp); without it, or when it
// cannot be loaded (NVSHMEM not installed), every call except compiled() throws kState saying what
// to install.
#include <cuda_runtime_api.h>

#include <cstdint>
#include <vector>

namespace moelink::low_latency {
struct DispatchArgs;
struct CombineArgs;
}  // namespace moelink::low_latency
namespace moelink::intranode {
struct NotifyArgs;
struct DispatchArgs;
struct CombineArgs;
}  // namespace moelink::intranode
namespace moelink::kernels {
struct PeerTable;
struct ErrorSink;
struct Opening;
}  // namespace moelink::kernels

namespace moelink::window {

bool nvshmem_compiled();  // whether this build has the plugin (it may still fail to load)
void nvshmem_require();   // loads the plugin, or throws the reason it cannot be used
// 128-byte unique id, created by the root PE (rdma rank 0 of each NVL lane).
std::vector<uint8_t> nvshmem_unique_id();
// Joins the job as PE `pe` of `num_pes` using the root's unique id; binds to the current CUDA device.
// A process is in one world at a time (nvshmem_world.hpp): a join with the id of the world it is in
// already (and the same pe and num_pes) shares it, and the world is finalised at its last leave.
void nvshmem_join(int pe, int num_pes, const std::vector<uint8_t>& root_unique_id);
struct NvshmemWorldInfo {
  std::vector<uint8_t> id;  // the root's unique id it was joined with; empty when not joined
  int pe = -1;
  int num_pes = 0;
};
NvshmemWorldInfo nvshmem_world();  // needs no plugin: nothing is joined without one
void* nvshmem_alloc(int64_t bytes);  // collective, zero-filled
void nvshmem_release(void* ptr);     // collective
void nvshmem_barrier_all();          // host-blocking barrier over all PEs
void nvshmem_leave();                // the last member's leave: collective finalize (none once lost)
// On every member of the world together, before NVSHMEM's own collectives (which wait without
// bound): -1 when every PE arrived within timeout_s; otherwise the world is lost (no collective is
// made in it again, its memory is leaked, no later join in this process) and this returns the
// lowest PE that did not arrive (-2: this PE's CUDA calls failed).
int nvshmem_world_barrier(double timeout_s);
// Collective, after join: the device API end to end (nvshmem/self_test.cu); throws kCuda with the
// reason when it fails. Returns whether the store path to a mapped peer ran too.
bool nvshmem_self_test();
// After join: `symmetric` in PE pe's copy, mapped here, or nullptr where NVSHMEM cannot map it.
void* nvshmem_peer_pointer(void* symmetric, int pe);
// The low-latency kernels built for the put path (the plugin's; modes/low_latency/contract.hpp).
void nvshmem_low_latency_dispatch(const low_latency::DispatchArgs& args, int blocks, cudaStream_t stream);
void nvshmem_low_latency_combine(const low_latency::CombineArgs& args, int blocks, cudaStream_t stream);
int nvshmem_low_latency_blocks_per_sm();
// The internode lane's kernels built for the put path (the plugin's; window::Policy::kPuts):
// intranode notify, dispatch and combine, the opening and the barrier. After join, and after
// nvshmem_lane_peers has named the PE of each lane peer (pes[p] for lane rank p).
void nvshmem_lane_peers(const std::vector<int>& pes);
void nvshmem_lane_notify(const intranode::NotifyArgs& args, cudaStream_t stream);
void nvshmem_lane_dispatch(const intranode::DispatchArgs& args, cudaStream_t stream);
void nvshmem_lane_combine(const intranode::CombineArgs& args, cudaStream_t stream);
void nvshmem_lane_opening(const kernels::PeerTable& peers, int rank, int num_ranks, const kernels::Opening& opening,
                          const kernels::ErrorSink& err, cudaStream_t stream);
void nvshmem_lane_barrier(const kernels::PeerTable& peers, int rank, int num_ranks, int tag,
                          const kernels::ErrorSink& err, cudaStream_t stream);
int nvshmem_lane_blocks_per_sm();

}  // namespace moelink::window
