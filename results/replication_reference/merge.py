"""Append run directories to the committed sweep directory results/replication as its next jobs.

    python results/replication_reference/merge.py SRC_RUN_DIR... [--move]

Each run becomes results/replication/<N> (N = the next free job number); its summary.json's job,
log and run_dir are rewritten to the new place (the sweep table matches a summary to its directory
by run_dir's last part), and the line "N <- origin" is appended to results/replication/origins.txt.
Then summary.csv / summary.md are rewritten. The run's files are otherwise unchanged."""

import json
import shutil
import sys
from pathlib import Path

from deepdelta.analysis.summary import write_sweep_summary

SWEEP = Path("results/replication")


def main(argv: list[str]) -> None:
    move = "--move" in argv
    sources = [Path(a) for a in argv if a != "--move"]
    n = max(int(p.name) for p in SWEEP.iterdir() if p.name.isdigit()) + 1
    with open(SWEEP / "origins.txt", "a") as log:
        for src in sources:
            if not (src / "summary.json").exists():
                raise SystemExit(f"{src}: no summary.json, not a finished run directory")
            dst = SWEEP / str(n)
            (shutil.move if move else shutil.copytree)(src, dst)
            summary = json.loads((dst / "summary.json").read_text())
            summary.update(job=str(n), log=str(dst / "train.log"), run_dir=str(dst))
            (dst / "summary.json").write_text(json.dumps(summary, indent=2))
            log.write(f"{n} <- {src}\n")
            print(f"{n} <- {src}")
            n += 1
    write_sweep_summary(SWEEP)


if __name__ == "__main__":
    main(sys.argv[1:])
