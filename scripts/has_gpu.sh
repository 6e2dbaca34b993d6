#!/usr/bin/env bash
# Exit 0 when a CUDA GPU is visible. torch decides when it is installed; nvidia-smi covers machines
# without torch and ones where torch cannot initialise CUDA (the GPU tests then report why).
PYTHON=${PYTHON:-python3}
if "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
  exit 0
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
  exit 0
fi
exit 1
