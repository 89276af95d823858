#!/usr/bin/env bash
# The next DDP call (nvidia-h200-x2), from the repo root with the wheels installed and PYTHONPATH=src:/tmp/site:
# `make bench-ddp ARGS="--repeat 3 --profile"` alone on the host (~8 min), its log written to $OUT as it runs
# (each run prints its tok/s and final loss when it ends), then the run directories' metrics and profiles.
set -uo pipefail
export PYTHONUNBUFFERED=1 DEEPDELTA_CACHE=/tmp/ddcache WANDB_MODE=offline
timeout ${BUDGET:-540} python3 -m deepdelta.scaling --gpus 2 --steps 120 --repeat 3 --profile --out /tmp/scal \
  > $OUT/scaling.log 2>&1
echo "scaling exit $?" >> $OUT/scaling.log
tar czf $OUT/scaling_runs.tgz --exclude=checkpoints --exclude=wandb --exclude='*.ckpt*' -C /tmp scal 2>/dev/null
grep -E '^-> |^\| ' $OUT/scaling.log | tail -40
