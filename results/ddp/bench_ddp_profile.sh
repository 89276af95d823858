#!/usr/bin/env bash
# DDP calls 9 and 10 of 2026-11-30 (nvidia-h200-x2), from the repo root with the wheels installed and PYTHONPATH=src:/tmp/site:
#   BUDGET=545 bash results/ddp/bench_ddp_profile.sh                        # make bench-ddp ARGS="--repeat 3 --profile", 342 s
#   bash results/ddp/bench_ddp_profile.sh --repeat 1 callbacks.divergence.sync=false   # the guard without its host sync, ~4 min
#   bash results/ddp/bench_ddp_profile.sh --repeat 1 '~callbacks.divergence'           # no guard at all (the bound), ~4 min
# The log is written to $OUT as it runs (each run prints its tok/s and final loss when it ends), then the run
# directories' metrics and profiles (no checkpoints).
set -uo pipefail
export PYTHONUNBUFFERED=1 DEEPDELTA_CACHE=/tmp/ddcache WANDB_MODE=offline
[ $# -gt 0 ] || set -- --repeat 3
out=/tmp/scal_$(date +%H%M%S)
timeout ${BUDGET:-540} python3 -m deepdelta.scaling --gpus 2 --steps 120 --profile --out $out "$@" > $OUT/scaling.log 2>&1
echo "scaling exit $?" >> $OUT/scaling.log
tar czf $OUT/scaling_runs.tgz --exclude=checkpoints --exclude=wandb --exclude='*.ckpt*' -C /tmp $(basename $out) 2>/dev/null
grep -E '^-> |^\| ' $OUT/scaling.log | tail -40
