#!/usr/bin/env bash
# Add to ./.whl (see ../shared/tools/device-wheels.sh) the wheels that `deepdelta.eval` and
# `deepdelta.bench_eval` need on the GPU machine (Python 3.12, x86-64), whose image lacks them:
# lm-evaluation-harness (pinned as in pyproject's `eval` extra) and what it imports when it scores
# a local task (sacrebleu and its imports). Run from the repo root after device-wheels.sh.
set -euo pipefail
PLAT="--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
python3 -m pip download -q --no-deps $PLAT -d .whl \
  lm_eval==0.4.13 sacrebleu portalocker colorama tabulate lxml more_itertools \
  2>&1 | grep -v -i warning || true
du -sh .whl
