#pragma once
// NVSHMEM symmetric heap for the RDMA buffer. Compiled against NVSHMEM when the build finds it
// (MOELINK_WITH_NVSHMEM); otherwise every call except compiled() throws kState "built without NVSHMEM".
#include <cstdint>
#include <vector>

namespace moelink::window {

bool nvshmem_compiled();
// 128-byte unique id, created by the root PE (rdma rank 0 of each NVL lane).
std::vector<uint8_t> nvshmem_unique_id();
// Joins the job as PE `pe` of `num_pes` using the root's unique id; binds to the current CUDA device.
void nvshmem_join(int pe, int num_pes, const std::vector<uint8_t>& root_unique_id);
void* nvshmem_alloc(int64_t bytes);  // collective, zero-filled
void nvshmem_release(void* ptr);     // collective
void nvshmem_barrier_all();          // host-blocking barrier over all PEs
void nvshmem_leave();                // collective finalize

}  // namespace moelink::window
