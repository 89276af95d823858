"""Downstream evaluation through lm-evaluation-harness, on local tasks only (no network):
the harness's numbers against a hand computation with the model, the CLI on a trained run,
eval.json, the run's W&B run, the sweep report's columns, and the offline failure."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tests.analysis.conftest import env
from tests.conftest import ROOT

pytest.importorskip("lm_eval")

from deepdelta.data.tokenizer import ByteTokenizer  # noqa: E402
from deepdelta.eval.lm import DeepDeltaLM  # noqa: E402
from deepdelta.eval.run import EvalError, evaluate, require_harness  # noqa: E402
from deepdelta.eval.tasks import write_mc_task  # noqa: E402
from deepdelta.model import DeltaTransformer  # noqa: E402
from tests.model.conftest import perturb, tiny_config  # noqa: E402

DOCS = [
    {"question": "x = 1\ny = x +", "choices": ["1", "x", "("], "answer": 0},
    {"question": "def f(a, b):\n    return a", "choices": [" + b", " ** b", "]"], "answer": 0},
    {"question": "import o", "choices": ["s", "q", "%%"], "answer": 0},
    {"question": "for i in ran", "choices": ["ge(3):", "ge[3]:", "dom"], "answer": 0},
    {"question": "print('hi", "choices": ["')", "]", "')\n"], "answer": 2},
]


def local_task(folder: Path, name: str = "dd_local_mc", dataset_path: str = "json") -> Path:
    """The harness YAML task over DOCS (``deepdelta.eval.tasks.write_mc_task``, which the benchmark uses too)."""
    return write_mc_task(folder, DOCS, name, dataset_path)


def by_hand(model: DeltaTransformer) -> tuple[list[list[float]], float]:
    """Each choice's log-likelihood after its question, from one forward of the model per choice."""
    scores = []
    with torch.no_grad():
        for doc in DOCS:
            row = []
            for choice in doc["choices"]:
                ctx, cont = list(doc["question"].encode()), list(choice.encode())
                ids = torch.tensor([ctx + cont])
                logp = F.log_softmax(model(ids[:, :-1]).double(), -1)[0]
                row.append(sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont)))
            scores.append(row)
    acc = sum(max(range(len(r)), key=r.__getitem__) == d["answer"] for r, d in zip(scores, DOCS, strict=True)) / len(
        DOCS
    )
    return scores, acc


@pytest.fixture(scope="module")
def model() -> DeltaTransformer:
    torch.manual_seed(0)
    return perturb(DeltaTransformer(tiny_config(vocab_size=256, block_size=64)).double(), std=0.05).eval()


def test_harness_accuracy_equals_a_hand_computation(model, tmp_path):
    task = local_task(tmp_path / "tasks")
    result = evaluate(model, ByteTokenizer(), str(task), batch_size=2)
    _, acc = by_hand(model)
    row = result["tasks"]["dd_local_mc"]
    assert row["n"] == len(DOCS) and row["metrics"]["acc"]["value"] == pytest.approx(acc)
    assert row["metrics"]["acc"]["stderr"] is not None


def test_loglikelihood_and_rolling_equal_the_forward(model):
    lm = DeepDeltaLM(model, ByteTokenizer(), batch_size=3)
    requests = [SimpleNamespace(args=(d["question"], c)) for d in DOCS for c in d["choices"]]
    got = [s for s, _ in lm.loglikelihood(requests, disable_tqdm=True)]
    want = [s for row in by_hand(model)[0] for s in row]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-12)  # fp64 model: the same sums, reordered
    # rolling: the whole text after the EOT prefix, in windows of block_size (64) tokens
    text = "".join(d["question"] for d in DOCS) * 3  # longer than one window
    (rolling,) = lm.loglikelihood_rolling([SimpleNamespace(args=(text,))], disable_tqdm=True)
    ids = [0] + list(text.encode())
    with torch.no_grad():
        total, done = 0.0, 0
        while done < len(ids) - 1:  # disjoint windows, each with as much left context as fits
            end = min(done + 64, len(ids) - 1)
            start = max(0, end - 64)
            logp = F.log_softmax(model(torch.tensor([ids[start:end]])).double(), -1)[0]
            total += sum(logp[p - start, ids[p + 1]].item() for p in range(done, end))
            done = end
    assert rolling == pytest.approx(total, rel=1e-10)


def test_missing_harness_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(EvalError, match=r"pip install -e '\.\[eval\]'"):
        require_harness()


def run_eval(cache_dir: Path, *args: str, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deepdelta.eval", *args],
        cwd=ROOT,
        env=env(cache_dir, **extra),
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_cli_on_a_trained_sweep_then_the_report(tiny_sweep, cache_dir, tmp_path):
    task = local_task(tmp_path / "tasks")
    tiny_sweep = Path(shutil.copytree(tiny_sweep, tmp_path / "sweep"))  # other tests read the shared one as trained
    proc = run_eval(cache_dir, "--sweep", str(tiny_sweep), f"tasks={task}", "batch_size=4")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = sorted(p.parent for p in tiny_sweep.glob("*/summary.json"))
    for run in runs:
        result = json.loads((run / "eval.json").read_text())
        assert result["tasks"]["dd_local_mc"]["n"] == len(DOCS)
        # the CLI's number is the harness's on this run's own checkpoint and tokenizer
        from deepdelta.convert import load_model

        _, acc = by_hand(load_model(run).double())
        assert result["tasks"]["dd_local_mc"]["metrics"]["acc"]["value"] == pytest.approx(acc)
        wandb_files = list((run / "wandb").glob("offline-run-*/*.wandb"))
        assert wandb_files and any(b"eval/dd_local_mc/acc" in f.read_bytes() for f in wandb_files)
    # the report's downstream table: mean over seeds and the Δ to additive paired by seed
    from deepdelta.analysis.runs import find_runs, group_runs
    from deepdelta.analysis.tables import eval_scores, eval_table

    groups = group_runs(find_runs(tiny_sweep))
    frame = eval_table(groups).set_index(["model", "metric"])
    ddl = next(g for g in groups if g.residual == "ddl")
    additive = next(g for g in groups if g.residual == "additive")
    per_seed = {
        name: {r.seed: eval_scores(r.path)["dd_local_mc/acc"] for r in g.runs}
        for name, g in (("d", ddl), ("a", additive))
    }
    diffs = [per_seed["d"][s] - per_seed["a"][s] for s in (0, 1)]
    row = frame.loc[(ddl.label, "dd_local_mc/acc")]
    assert row["seeds"] == 2 and row["compared with"] == additive.label
    assert row["Δ vs baseline"].startswith(f"{sum(diffs) / 2:+.4f} [")
    assert frame.loc[(additive.label, "dd_local_mc/acc")]["Δ vs baseline"] == "baseline"


def test_offline_hub_task_fails_fast_naming_the_task(cache_dir, tmp_path, tiny_sweep):
    task = local_task(tmp_path / "hub", name="dd_hub_task", dataset_path="deepdelta-tests/not-a-dataset")
    run = sorted(p.parent for p in tiny_sweep.glob("*/summary.json"))[0]
    start = time.time()
    proc = run_eval(cache_dir, str(run), f"tasks={task}", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    assert proc.returncode == 2 and time.time() - start < 60
    assert "task 'dd_hub_task' could not be loaded" in proc.stderr and "Traceback" not in proc.stderr
    assert not (run / "eval.json").exists() or "dd_hub_task" not in (run / "eval.json").read_text()


def test_preset_tasks_and_their_datasets_are_the_harness_own():
    """Every preset task is a task of the installed harness, and HUB_DATASETS (the offline
    check's) is its YAML's dataset_path: read as text, no index, no network."""
    import lm_eval

    from deepdelta.eval.tasks import HUB_DATASETS, PRESETS

    root = Path(lm_eval.__file__).parent / "tasks"
    yamls = {}
    for path in root.rglob("*.yaml"):
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("task:"):
                yamls.setdefault(line.split(":", 1)[1].strip(), path)

    def dataset_path(path: Path) -> str | None:
        for line in path.read_text().splitlines():
            if line.startswith("dataset_path:"):
                return line.split(":", 1)[1].strip()
            if line.startswith("include:"):  # a variant of another task: its base's data
                base = dataset_path(path.parent / line.split(":", 1)[1].strip())
                if base:
                    return base
        return None

    names = {t for preset in PRESETS.values() for t in preset.tasks}
    assert names == set(HUB_DATASETS)
    for name in sorted(names):
        assert name in yamls, f"{name}: not a task of lm-evaluation-harness {lm_eval.__version__}"
        assert dataset_path(yamls[name]) == HUB_DATASETS[name], name


def test_offline_preset_without_cached_data_stops_before_indexing(monkeypatch, tmp_path):
    """Offline, with nothing cached: the first preset task is named with its dataset, before
    the harness indexes its task YAMLs (~10 s) and without any network."""
    import datasets.config
    import huggingface_hub.constants as hub
    import lm_eval.tasks

    from deepdelta.data import network
    from deepdelta.eval import run

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(network, "url_reachable", lambda *a, **k: pytest.fail("probed the network"))
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", lambda *a, **k: pytest.fail("indexed the harness tasks"))
    names = resolve_names("paper_1shot")
    start = time.time()
    with pytest.raises(EvalError) as err:
        run.build_tasks(names, [])
    assert time.time() - start < 5
    message = str(err.value)
    assert message.startswith("task 'arc_challenge' could not be loaded") and "allenai/ai2_arc" in message
    assert "HF_DATASETS_OFFLINE=1" in message and "local task YAML" in message
    # with its data in the datasets cache, the check lets the harness try (here: the index)
    (tmp_path / "datasets" / "allenai___ai2_arc").mkdir(parents=True)
    with pytest.raises(pytest.fail.Exception, match="indexed the harness tasks"):
        run.build_tasks(["arc_challenge"], [])


def test_cli_offline_paper_preset_says_how_to_fetch(cache_dir, tmp_path):
    """``python -m deepdelta.eval MODEL tasks=paper_1shot`` offline with an empty HF_HOME: one
    error line naming the task and the way out, exit status 2, in seconds."""
    from deepdelta.convert import save_model

    save_model(DeltaTransformer(tiny_config(vocab_size=256, block_size=64)), tmp_path / "model.pt")
    start = time.time()
    proc = run_eval(
        cache_dir, str(tmp_path / "model.pt"), "tasks=paper_1shot", "device=cpu",
        HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
    )  # fmt: skip
    assert proc.returncode == 2 and time.time() - start < 60, proc.stderr[-2000:]
    assert "error: task 'arc_challenge' could not be loaded" in proc.stderr and "Traceback" not in proc.stderr
    assert "Fetch it once on a machine with network" in proc.stderr


def resolve_names(spec: str) -> list[str]:
    from deepdelta.eval.tasks import resolve

    return resolve(spec)[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["/no/such/run"], "no such run directory"),
        (["limit=0"], "limit: got '0'"),
        (["tasks="], "tasks: got an empty list"),
        (["colour=red"], "colour: unknown setting"),
    ],
)
def test_user_mistakes_are_one_line(tmp_path, capsys, args, message):
    from deepdelta.eval.__main__ import main

    argv = args if args[0].startswith("/") else [str(tmp_path), *args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_generate_until_is_greedy_decoding_cut_at_the_stop_string(model):
    from deepdelta.model.decode import generate

    lm = DeepDeltaLM(model, ByteTokenizer())
    prompts = ["def f(", "x = 1\n"]
    requests = [SimpleNamespace(args=(p, {"until": ["\n", ")"], "max_gen_toks": 12})) for p in prompts]
    got = lm.generate_until(requests, disable_tqdm=True)
    for prompt, text in zip(prompts, got, strict=True):
        ids = torch.tensor([list(prompt.encode())])
        new = generate(model, ids, 12, temperature=0.0, stop_token_ids={0})[0, ids.shape[1] :].tolist()
        want = bytes(t for t in new if t != 0).decode("utf-8", errors="replace").split("\n")[0].split(")")[0]
        assert text == want and "\n" not in text


def test_a_run_evaluates_itself_when_it_finishes(cli, tmp_path):
    task = local_task(tmp_path / "tasks")
    proc = cli("debug=fast", "logger=csv", "model.n_layer=1", f"eval.tasks={task}", "eval.batch_size=8")
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert result["tasks"]["dd_local_mc"]["n"] == len(DOCS) and "evaluation: wrote" in proc.stdout
    from deepdelta.convert import load_model

    _, acc = by_hand(load_model(tmp_path / "run").double())
    assert result["tasks"]["dd_local_mc"]["metrics"]["acc"]["value"] == pytest.approx(acc)
