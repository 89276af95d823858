#!/bin/bash
# .probe/tree is `git archive HEAD` (05a71fe) plus tests/test_ddp_parity.py and pyproject.toml of this work;
# .probe/site/sitecustomize.py turns cuDNN attention off when DD_NOCUDNN=1 (experiment only)
# issue 18, device call 2 (nvidia-h200-x2), run from the repo root:
# (a) do processes that compile the same model get the same gradients, and which knob makes them;
# (b) the 2-GPU parity test through the CLI: ddl_dv1 as the code is, and all 3 configs with the knobs
R=$PWD; T=$R/.probe/tree
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=4 DEEPDELTA_CACHE=/tmp/ddcache WANDB_MODE=offline
export PYTHONPATH=$T/src:/tmp/site
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c "import torch,lightning;print(torch.__version__,lightning.__version__,'inductor.deterministic',hasattr(torch._inductor.config,'deterministic'),'cudnn_sdp',torch.backends.cuda.cudnn_sdp_enabled())"; date -u; } > $OUT/env.txt 2>&1
cat $OUT/env.txt
mkdir -p /tmp/par; (cd $T && python3 -m deepdelta.data prepare model=small > /tmp/prep.log 2>&1) & PREP=$!
G="python3 $R/results/ddp/grad_versions.py"
SW=()
sw() { (export CUDA_VISIBLE_DEVICES=$1 TAG=$2 SRC=$T/src DIR=/dev/shm/gv; shift 2; env "$@" timeout 130 $G) >> $OUT/sweep.txt 2>&1 & SW+=($!); }
sw 0 default1 X=1; sw 1 default2 X=1; sw 0 tidet1 TORCHINDUCTOR_DETERMINISTIC=1; sw 1 tidet2 TORCHINDUCTOR_DETERMINISTIC=1
sw 0 nocudnn1 NOCUDNN=1; sw 1 nocudnn2 NOCUDNN=1; sw 0 both1 NOCUDNN=1 TORCHINDUCTOR_DETERMINISTIC=1; sw 0 fp32 MODE=fp32
wait $PREP; tail -2 /tmp/prep.log
cd $T
PT="python3 -m pytest -q -s -p no:cacheprovider tests/test_ddp_parity.py -m gpu2"
(PARITY_CONFIGS=ddl_dv1 PARITY_OUT=/tmp/par/base timeout 175 $PT --basetemp=/tmp/pt_base > /tmp/par/pytest_base.txt 2>&1) & B=$!
(DD_NOCUDNN=1 TORCHINDUCTOR_DETERMINISTIC=1 PYTHONPATH=$R/.probe/site:$PYTHONPATH PARITY_OUT=/tmp/par/fix timeout 175 $PT --basetemp=/tmp/pt_fix > /tmp/par/pytest_fix.txt 2>&1) & F=$!

wait "${SW[@]}"
echo "== sweep compare" >> $OUT/sweep.txt
(cd $R && DIR=/dev/shm/gv timeout 40 python3 results/ddp/grad_versions.py compare) >> $OUT/sweep.txt 2>&1
grep -v Warning $OUT/sweep.txt | grep "loss \||\|per layer\|block\|embed\|norm\|readout\|expand\|Error\|error" | cut -c1-200
wait $B $F
cp /tmp/par/pytest_*.txt $OUT/ 2>/dev/null
tar czf $OUT/parity.tar.gz -C /tmp par 2>/dev/null
for f in /tmp/par/pytest_base.txt /tmp/par/pytest_fix.txt; do echo "== $f"; grep -E '^\{"config|passed|failed|Error|error' $f | cut -c1-700 | tail -12; done
