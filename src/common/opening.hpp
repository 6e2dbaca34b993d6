#pragma once
// The opening kernel, for a rank that abstains because its own checks rejected its arguments (every
// operation's own kernel opens it otherwise): one block that runs the opening barrier with the
// digest and leaves the gate (opening.cuh has the protocol), over the window `policy` names.
#include <cuda_runtime_api.h>

#include "common/header.hpp"
#include "window/window.hpp"

namespace moelink::kernels {

void launch_opening(const PeerTable& peers, int rank, int num_ranks, const Opening& opening, const ErrorSink& err,
                    window::Policy policy, cudaStream_t stream);
// The NVSHMEM plugin's build (window/nvshmem/lane.cu), which launch_opening reaches for kPuts.
void launch_opening_puts(const PeerTable& peers, int rank, int num_ranks, const Opening& opening, const ErrorSink& err,
                         cudaStream_t stream);

}  // namespace moelink::kernels
