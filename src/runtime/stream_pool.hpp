#pragma once
// Communication streams outlive the Buffers that used them: tensors the caching allocator was told
// an operation uses on a comm stream (record_stream) may be freed after the Buffer's destroy(), and
// freeing one records an event on that stream, so destroying it would crash the process. A
// destroyed Buffer gives its stream back here, and the next Buffer on that device takes it.
#include <cuda_runtime_api.h>

namespace moelink::runtime {

// A non-blocking stream on the current device `device`, reused when one was given back.
cudaStream_t acquire_comm_stream(int device);
void give_back_comm_stream(cudaStream_t stream, int device);

}  // namespace moelink::runtime
