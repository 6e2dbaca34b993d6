#pragma once
// The device barrier over a node's NVLink peers, as one launch (barrier.cuh has the protocol), its
// arrivals over the window `policy` names.
#include <cuda_runtime_api.h>

#include "common/header.hpp"
#include "window/window.hpp"

namespace moelink::kernels {

void launch_barrier(const PeerTable& peers, int rank, int num_ranks, int tag, const ErrorSink& err,
                    window::Policy policy, cudaStream_t stream);
// The NVSHMEM plugin's build (window/nvshmem/lane.cu), which launch_barrier reaches for kPuts.
void launch_barrier_puts(const PeerTable& peers, int rank, int num_ranks, int tag, const ErrorSink& err,
                         cudaStream_t stream);

}  // namespace moelink::kernels
