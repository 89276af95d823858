#!/usr/bin/env bash
# The impl=reference replication study on a GPU machine (issue 16), as run on 2 × H200 on 2026-11-29:
#   bash results/replication_reference/gpu_study.sh study     # 6 configurations × 3 seeds, one job per GPU
#   bash results/replication_reference/gpu_study.sh rest      # what the first call (9 of 18 jobs in 555 s) left: two
#                                                             # sweeps side by side, so two jobs share each GPU
#   bash results/replication_reference/gpu_study.sh switches  # ddl_cc seed 0 with one impl item switched to the paper's
#   bash results/replication_reference/gpu_study.sh redo      # (2026-11-30) call 1's nine jobs again, and hc/mhc seed 0
#   bash results/replication_reference/gpu_study.sh peers     # (2026-11-30) hc/mhc seeds 1 and 2
# Each writes outputs/sweeps/<name>/ (the usual sweep directory) and packs its summaries, logs and
# metrics (no checkpoints) into $OUT/<name>.tgz when $OUT is set.
set -uo pipefail
cd "$(dirname "$0")/../.."
export DEEPDELTA_CACHE=${DEEPDELTA_CACHE:-/tmp/ddcache} PYTHONUNBUFFERED=1 WANDB_MODE=offline
LIMIT=${LIMIT:-540}
what=${1:-study}
if [ "$what" = study ]; then
  name=replication_reference
  timeout "$LIMIT" python3 -m deepdelta.gpusweep --gpus 2 --dir outputs/sweeps/$name sweep=replication impl=reference \
    seed=0,1,2 variant=additive,ddl,write_only,additive_cc,ddl_cc,write_only_cc
elif [ "$what" = rest ]; then
  name=replication_reference_rest
  g="sweep=replication impl=reference"
  timeout "$LIMIT" python3 -m deepdelta.gpusweep --gpus 2 --dir outputs/sweeps/$name/a $g seed=2 \
    variant=additive,ddl,write_only,additive_cc,ddl_cc,write_only_cc > /tmp/rest_a.log 2>&1 &
  timeout "$LIMIT" python3 -m deepdelta.gpusweep --gpus 2 --dir outputs/sweeps/$name/b $g seed=1 \
    variant=additive_cc,ddl_cc,write_only_cc > /tmp/rest_b.log 2>&1 &
  wait
  grep -h "finished in\|FAILED" /tmp/rest_a.log /tmp/rest_b.log
elif [ "$what" = redo ] || [ "$what" = peers ]; then
  # every job at once, alternating over GPUS (5-6 jobs share a GPU: their tok/s measure sharing, not the model)
  name=replication_$what
  mkdir -p outputs/sweeps/$name
  if [ "$what" = redo ]; then
    jobs="0:hc_dynamic_n4 0:ddl_cc 0:mhc_n4 0:additive_cc 0:write_only_cc 0:additive 0:ddl 0:write_only 1:additive 1:ddl 1:write_only"
  else
    jobs="1:hc_dynamic_n4 1:mhc_n4 2:hc_dynamic_n4 2:mhc_n4"
  fi
  python3 -m deepdelta.data prepare sweep=replication impl=reference 2>&1 | tail -1
  i=0
  for j in $jobs; do
    gpus=(${GPUS:-0 1})  # GPUS="1": every job on GPU 1
    seed=${j%%:*} variant=${j#*:} gpu=${gpus[$((i % ${#gpus[@]}))]} job=s${j%%:*}_${j#*:}
    (CUDA_VISIBLE_DEVICES=$gpu timeout "$LIMIT" python3 src/train.py sweep=replication impl=reference seed=$seed \
      variant=$variant hydra.run.dir=outputs/sweeps/$name/$job > outputs/sweeps/$name/$job.log 2>&1
     echo "$job (gpu $gpu) exit $?") &
    i=$((i + 1))
  done
  wait
else
  name=replication_switches
  mkdir -p outputs/sweeps/$name
  run() {  # one job on one GPU: $1 gpu, $2 job name, rest overrides
    local gpu=$1 job=$2; shift 2
    CUDA_VISIBLE_DEVICES=$gpu timeout "$LIMIT" python3 src/train.py sweep=replication variant=ddl_cc seed=0 "$@" \
      hydra.run.dir=outputs/sweeps/$name/$job > outputs/sweeps/$name/$job.log 2>&1
    echo "$job exit $?"
  }
  # all 8 at once, 4 to a GPU (their tok/s are not comparable with the study's)
  run 0 paper impl=paper & run 0 item1 model.value_source=context model.value_squash=none &
  run 0 item2 model.qk_norm=before_rope & run 0 item3 model.norm_eps=1e-6 &
  run 1 item4 model.compressor_init=identity & run 1 item5 model.cc_form=mix &
  run 1 item6 model.gate_init=zero & run 1 item7 model.value_bias_init=zero &
  wait
fi
if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/$name.tgz" --exclude=checkpoints --exclude=wandb --exclude='*.ckpt*' outputs/sweeps/$name
fi
python3 - "$name" <<'PY'
import json, pathlib, sys
for p in sorted(pathlib.Path("outputs/sweeps", sys.argv[1]).rglob("summary.json")):
    s = json.loads(p.read_text())
    print(f"{p.parent.name:>6} {s.get('name', ''):<40} {s.get('status')} val {s.get('val_loss')} tok/s {s.get('tok_per_s')}")
PY
