#!/usr/bin/env bash
# Runs CMD under an MPS daemon so several ranks can share one GPU concurrently, the way the
# single-GPU test machine runs multi-rank jobs. Reuses a reachable daemon, else starts a private one
# (own pipe/log dirs, stopped on exit). Changes no GPU setting; without MPS the command runs as is.
#   scripts/with_mps.sh CMD [ARGS...]
set -uo pipefail

if [ $# -eq 0 ]; then
  echo "usage: $0 CMD [ARGS...]" >&2
  exit 2
fi

# NVLink multicast stays off: on shared hosts a program using it can take the GPUs out of service.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

# MOELINK_NO_MPS=1: run directly, e.g. where MPS cannot serve clients (some containers).
if [ "${MOELINK_NO_MPS:-0}" = 1 ] || ! command -v nvidia-cuda-mps-control >/dev/null 2>&1; then
  "$@"
  exit $?
fi

if echo get_server_list | timeout 10 nvidia-cuda-mps-control >/dev/null 2>&1; then
  echo "moelink: using the running MPS daemon" >&2
  "$@"
  exit $?
fi

CUDA_MPS_PIPE_DIRECTORY=$(mktemp -d -t moelink-mps-pipe.XXXXXX)
CUDA_MPS_LOG_DIRECTORY=$(mktemp -d -t moelink-mps-log.XXXXXX)
export CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY

if ! nvidia-cuda-mps-control -d; then
  echo "moelink: could not start an MPS daemon; running without MPS" >&2
  rm -rf "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
  "$@"
  exit $?
fi
echo "moelink: started an MPS daemon (pipe $CUDA_MPS_PIPE_DIRECTORY, log $CUDA_MPS_LOG_DIRECTORY)" >&2

# shellcheck disable=SC2317  # called by the EXIT trap
stop_daemon() {
  echo quit | timeout 30 nvidia-cuda-mps-control >/dev/null 2>&1 || true
  rm -rf "$CUDA_MPS_PIPE_DIRECTORY"
}
trap stop_daemon EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

"$@"
exit $?
