#!/usr/bin/env bash
# Device call 3 of 2026-11-30 (nvidia-h200-x2), run from the repo root with the wheels installed
# (.whl, tools/device-wheels-eval.sh) and PYTHONPATH=src:/tmp/site. Call 2 timed out before it packed
# its bench rows (its GPU 1 chain was longer than the call), so this call writes each file to $OUT
# as it is made. One GPU each, at the same time (the host's 32 CPU cores shared by both):
#   GPU 0: make bench for the paper's six at impl=reference, then their fused rows, then bench_eval;
#   GPU 1: make bench for the peers set (additive, additive_cc, ddl_cc, hc, static hc, mhc), then the
#          GPU numerics tests run after run while time is left (up to three).
set -uo pipefail
export PYTHONUNBUFFERED=1 DEEPDELTA_CACHE=/tmp/ddcache WANDB_MODE=offline
B="python3 -m deepdelta.bench --impl reference"
(export CUDA_VISIBLE_DEVICES=0
 timeout 230 $B --variants paper_six --out $OUT/paper_six_reference.csv > $OUT/gpu0.log 2>&1
 timeout 130 $B --variants additive,ddl-dv1-fused,ddl-cc-ec-dv4-fused,ddl-cc-ec-dv4-fused-bf16 \
   --out $OUT/fused_reference.csv >> $OUT/gpu0.log 2>&1
 timeout 180 python3 -m deepdelta.bench_eval --out $OUT/bench_eval.csv >> $OUT/gpu0.log 2>&1) &
(export CUDA_VISIBLE_DEVICES=1
 timeout 250 $B --variants peers --out $OUT/peers_reference.csv > $OUT/gpu1.log 2>&1
 end=$((SECONDS + 290))
 for i in 1 2 3; do  # the GPU numerics tests, run after run, as long as time is left
   left=$((end - SECONDS)); [ $left -gt 20 ] || break
   echo "== numerics run $i" >> $OUT/gpu1.log
   timeout $left python3 -m pytest -q -p no:cacheprovider tests/test_fastpath.py -m gpu \
     -k compiled_bf16_matches_eager_gpu >> $OUT/gpu1.log 2>&1
 done) &
wait
for f in $OUT/gpu0.log $OUT/gpu1.log; do echo "== $f"; grep -E "^\||passed|failed|rror" $f | cut -c1-160; done
