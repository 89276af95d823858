"""Downstream evaluation through lm-evaluation-harness (the optional extra ``deepdelta[eval]``).

``python -m deepdelta.eval RUN_DIR tasks=paper_1shot`` scores a run's newest checkpoint (or a
model file from ``python -m deepdelta.convert``) and writes ``eval.json`` beside its
``summary.json``. Presets and the average are in ``tasks.py``; the model as the harness's
``LM`` in ``lm.py``; the run itself in ``run.py``.
"""

LM_EVAL_VERSION = "0.4.13"  # the version the tests and the docs were made with (pyproject's `eval` extra)
INSTALL_HINT = f"pip install -e '.[eval]'  (lm-evaluation-harness {LM_EVAL_VERSION})"
