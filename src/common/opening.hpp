#pragma once
// The opening kernel, for a rank that abstains because its own checks rejected its arguments (every
// operation's own kernel opens it otherwise): one block that runs the opening barrier with the
// digest and leaves the gate (opening.cuh has the protocol).
#include <cuda_runtime_api.h>

#include "common/header.hpp"

namespace moelink::kernels {

void launch_opening(const PeerTable& peers, int rank, int num_ranks, const Opening& opening, const ErrorSink& err,
                    cudaStream_t stream);

}  // namespace moelink::kernels
