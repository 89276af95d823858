#!/usr/bin/env bash
# Device call 4 of 2026-11-30 (nvidia-h200-x2), from the repo root with the wheels installed and
# PYTHONPATH=src:/tmp/site: `make bench-ddp ARGS="--repeat 3"` (1 GPU against 2-GPU DDP, 3 pairs),
# then the 2-GPU parity test (tests/test_ddp_parity.py, marker gpu2) run after run while time is left.
# Every file is written to $OUT as it is made.
set -uo pipefail
export PYTHONUNBUFFERED=1 DEEPDELTA_CACHE=/tmp/ddcache WANDB_MODE=offline
timeout 340 python3 -m deepdelta.scaling --gpus 2 --steps 120 --repeat 3 --out /tmp/scal > $OUT/scaling.log 2>&1
echo "scaling exit $?" >> $OUT/scaling.log
tar czf $OUT/scaling.tgz --exclude=checkpoints --exclude=wandb --exclude='*.ckpt*' -C /tmp scal 2>/dev/null
end=$((SECONDS + ${PARITY_SECONDS:-150}))
for i in 1 2 3; do
  left=$((end - SECONDS)); [ $left -gt 60 ] || break
  echo "== parity run $i (warm compile cache after the first)" >> $OUT/parity.txt
  PARITY_OUT=/tmp/par$i timeout $left python3 -m pytest -q -s -p no:cacheprovider tests/test_ddp_parity.py -m gpu2 \
    2>&1 | grep -E '^\{"config|passed|failed|Error' >> $OUT/parity.txt
done
tail -25 $OUT/scaling.log; cat $OUT/parity.txt | cut -c1-400
