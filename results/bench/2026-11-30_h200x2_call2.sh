#!/usr/bin/env bash
# Device call 2 of 2026-11-30 (nvidia-h200-x2), run from the repo root with the wheels installed and
# PYTHONPATH=src:/tmp/site. Two GPUs, two kinds of work that do not share a GPU:
#   GPU 1: the hc/mhc study's seeds 1 and 2 (4 training jobs at once), then the GPU numerics tests 3 times;
#   GPU 0: make bench for the paper's six at impl=reference, their fused rows, the peers set, and bench_eval.
# GPU 0's timings are of GPU 0 alone; the host's CPUs were shared with GPU 1's jobs (32 cores).
set -uo pipefail
export PYTHONUNBUFFERED=1 DEEPDELTA_CACHE=/tmp/ddcache WANDB_MODE=offline
W=/tmp/call2; mkdir -p $W
(GPUS=1 LIMIT=400 bash results/replication_reference/gpu_study.sh peers > $W/peers.txt 2>&1
 for i in 1 2 3; do
   CUDA_VISIBLE_DEVICES=1 timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_fastpath.py -m gpu \
     -k compiled_bf16_matches_eager_gpu 2>&1 | tail -3
 done > $W/numerics.txt 2>&1) &
G1=$!
export CUDA_VISIBLE_DEVICES=0
B="python3 -m deepdelta.bench"
timeout 170 $B --variants paper_six --impl reference --out $W/paper_six_reference.csv > $W/bench_paper_six.log 2>&1
timeout 120 $B --variants additive,ddl-dv1-fused,ddl-cc-ec-dv4-fused,ddl-tc-ec-dv4-fused,ddl-cc-ec-dv4-fused-bf16 \
  --impl reference --out $W/fused_reference.csv > $W/bench_fused.log 2>&1
timeout 170 $B --variants peers --impl reference --out $W/peers.csv > $W/bench_peers.log 2>&1
if [ -f src/deepdelta/bench_eval.py ]; then
  timeout 100 python3 -m deepdelta.bench_eval --out $W/bench_eval.csv > $W/bench_eval.log 2>&1
fi
wait $G1
date -u >> $W/done.txt
tar czf $OUT/call2.tgz -C /tmp call2
cat $W/peers.txt; cat $W/numerics.txt
for f in $W/bench_*.log; do echo "== $f"; tail -16 $f; done
