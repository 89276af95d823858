#!/usr/bin/env bash
# Device calls 5, 6, 7, 8 and 10 of 2026-11-30 (nvidia-h200-x2), from the repo root with the wheels installed and
# PYTHONPATH=src:/tmp/site: the 2-GPU parity test (tests/test_ddp_parity.py, marker gpu2) run after run.
# KINDS lists the runs: "cold" gives a run an empty Inductor cache of its own, "warm" reuses the last one.
# Used as: BUDGET=545 KINDS="cold warm warm warm cold" bash ...; then FIRST=5 KINDS="cold warm warm warm warm"; then FIRST=10
# KINDS="cold warm warm cold warm" (the final form of the test); then FIRST=14 BUDGET=555 KINDS="cold warm warm warm warm warm"
# (runs 14-18, the sixth cut by the budget); then FIRST=19 BUDGET=200 KINDS=warm, whose cache directory did not exist (cold).
# Each run's figures (JSON, with the per-step loss differences) are appended to $OUT/parity.txt as it ends.
set -uo pipefail
export PYTHONUNBUFFERED=1 DEEPDELTA_CACHE=/tmp/ddcache WANDB_MODE=offline
end=$((SECONDS + ${BUDGET:-560}))
i=${FIRST:-1}
cache=/tmp/inductor_warm
for kind in ${KINDS:-cold warm warm warm cold}; do
  left=$((end - SECONDS)); [ $left -gt 100 ] || break
  [ $kind = cold ] && cache=/tmp/inductor_cold_$i
  echo "== parity run $i ($kind Inductor cache $cache) $(date -u +%H:%M:%S)" >> $OUT/parity.txt
  start=$SECONDS
  TORCHINDUCTOR_CACHE_DIR=$cache PARITY_OUT=/tmp/par$i timeout $left python3 -m pytest -q -s -p no:cacheprovider \
    tests/test_ddp_parity.py -m gpu2 > /tmp/par$i.pytest.txt 2>&1
  echo "pytest exit $? after $((SECONDS - start)) s" >> $OUT/parity.txt
  grep -E 'passed|failed|Error' /tmp/par$i.pytest.txt | grep -v '^E ' | tail -5 >> $OUT/parity.txt
  for f in /tmp/par$i/*_figures.json; do [ -f $f ] && { cat $f; echo; } >> $OUT/parity.txt; done
  tar czf $OUT/par$i.tgz -C /tmp par$i par$i.pytest.txt 2>/dev/null
  i=$((i + 1))
done
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv >> $OUT/parity.txt
grep -E '^== |exit|passed|failed' $OUT/parity.txt
