#!/usr/bin/env bash
# FSDP check for a machine with 2 or more GPUs (accelerate runs FSDP on GPUs only, so tests/test_fsdp.py skips
# it on a CPU). Trains stage 2 (LoRA'd LLM in the loop, logit_scale clamp acting) and stage 1 for 3 steps on the
# tiny models in 2 processes under examples/accelerate/fsdp.yaml (FSDP2, transformer auto-wrap, FULL_STATE_DICT)
# and compares the losses, the final save_model() checkpoint (full, merged, reloaded with from_pretrained) and
# each process's logit_scale shard with one process on the same global batches; DDP (ddp-style launch) alongside.
#
#   bash examples/accelerate/run_fsdp_check.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
gpus=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -lt 2 ]; then
    echo "run_fsdp_check.sh needs 2 or more GPUs; this machine has $gpus." >&2
    exit 1
fi
HF_HUB_OFFLINE=1 python -m pytest tests/test_fsdp.py -k "two_process" -v -rs -p no:cacheprovider "$@"
