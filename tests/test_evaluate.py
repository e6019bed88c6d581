"""`kvp-mlx evaluate`: the lm-eval model (kvp_mlx.evaluate), the bundled protocols, HumanEval scoring.

Tasks read small local files written here (the hub's formats), so everything runs offline.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from kvp_mlx import evaluate as ev  # noqa: E402
from kvp_mlx.cli import main  # noqa: E402

LL_DOCS = [
    {"q": "def add(a, b):\n    return", "choices": [" a + b", " a - b", " None"], "label": 0},
    {"q": "import os\nimport", "choices": [" sys", " xyz", " 12"], "label": 0},
    {"q": "for i in range(", "choices": ["10):", "x", "]]"], "label": 0},
]
GEN_DOCS = [{"q": "def f(x):\n    return x", "a": " + 1"}, {"q": "class A:\n    def", "a": " __init__"}]


def write_tasks(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "ll.jsonl").write_text("".join(json.dumps(d) + "\n" for d in LL_DOCS))
    (root / "gen.jsonl").write_text("".join(json.dumps(d) + "\n" for d in GEN_DOCS))
    (root / "local_ll.yaml").write_text(f"""task: local_ll
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / 'll.jsonl'}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{q}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    (root / "local_gen.yaml").write_text(f"""task: local_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / 'gen.jsonl'}
output_type: generate_until
test_split: test
doc_to_text: "{{{{q}}}}"
doc_to_target: "{{{{a}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""")
    return root


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    return write_tasks(tmp_path_factory.mktemp("tasks"))


def _samples(results: dict) -> dict:
    return {task: [(s["doc_id"], s["resps"], s["filtered_resps"]) for s in rows]
            for task, rows in results["samples"].items()}


def test_identity_kvp_scores_equal_base(identity_dirs, task_dir):
    """aux = base copy, identity predictor: kvp's loglikelihoods and generations are base's, exactly."""
    out = {}
    for method in ("base", "kvp"):
        out[method] = ev.evaluate(str(identity_dirs["openelm"]), method=method, tasks=["local_ll", "local_gen"],
                                  include_paths=[task_dir])
    assert ev.scores(out["kvp"]) == ev.scores(out["base"])
    assert _samples(out["kvp"]) == _samples(out["base"])
    gens = [r[1] for r in _samples(out["kvp"])["local_gen"]]
    assert len(gens) == len(GEN_DOCS) and all(isinstance(g[0][0], str) for g in gens)
    # the loglikelihoods really are numbers from the model (not all equal)
    lls = [r[1][0][0][0] for r in _samples(out["kvp"])["local_ll"]]
    assert len(set(lls)) > 1


def test_cli_demo_model_offline(task_dir, tmp_path, capsys):
    rc = main(["evaluate", "--method", "lazy", "--lazy-schedule", "L0.75-0.5", "--tasks", "local_ll,local_gen",
               "--include-path", str(task_dir), "--limit", "2", "--output-dir", str(tmp_path)])
    assert rc == 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["kvp_mlx"]["method"] == "lazy" and saved["kvp_mlx"]["method_options"] == {"schedule": "L0.75-0.5"}
    assert set(saved["results"]) == {"local_ll", "local_gen"}
    assert "acc,none" in capsys.readouterr().out


def test_cli_refuses_unknown_task_and_foreign_flag(task_dir, capsys):
    assert main(["evaluate", "--tasks", "no_such_task", "--include-path", str(task_dir)]) == 1
    assert "unknown lm-eval task" in capsys.readouterr().err
    assert main(["evaluate", "--method", "base", "--rp-keep", "0.5", "--tasks", "local_ll"]) == 1
    assert "--rp-keep applies to --method rp" in capsys.readouterr().err
    assert main(["evaluate", "--method", "runahead", "--tasks", "local_ll", "--include-path", str(task_dir)]) == 1
    assert "cannot run inside lm-eval's process" in capsys.readouterr().err


def _local_variant(root: Path, base_yaml: str, task: str, split: str, docs: list[dict], extra: str = "") -> None:
    data = root / f"{task}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / f"{task}.yaml").write_text(
        f"include: {ev.TASKS_DIR / base_yaml}\ntask: {task}\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    {split}: {data}\n{extra}")


def test_triviaqa_protocol_renders_paper_prompt(tmp_path):
    docs = [{"question": "Who wrote Hamlet?", "question_id": "q1",
             "answer": {"aliases": ["Shakespeare", "William Shakespeare"], "value": "William Shakespeare"}},
            {"question": "What is the capital of France?", "question_id": "q2",
             "answer": {"aliases": ["Paris"], "value": "Paris"}}]
    data = tmp_path / "trivia.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "triviaqa_local.yaml").write_text(
        f"include: {ev.TASKS_DIR / 'triviaqa_kvp.yaml'}\ntask: triviaqa_local\ndataset_path: json\n"
        f"dataset_name: null\ndataset_kwargs:\n  data_files:\n    train: {data}\n    validation: {data}\n")
    manager = ev.task_manager([tmp_path])
    task = manager.load_task_or_group(["triviaqa_local"])["triviaqa_local"]
    doc = task.validation_docs()[0]
    assert task.doc_to_text(doc) == "Question: Who wrote Hamlet?\nAnswer:"
    assert task.config.generation_kwargs["until"] == ["\n", ".", ","]
    assert task.config.generation_kwargs["do_sample"] is False
    assert task.config.num_fewshot == 1 and task.config.validation_split == "validation"
    assert task.doc_to_target(doc) == ["Shakespeare", "William Shakespeare"]
    paper = ev.TASKS_DIR / "triviaqa_kvp.yaml"
    assert "dataset_name: rc.nocontext" in paper.read_text()
    # exact match ignores case and punctuation
    metric = task.config.metric_list[0]
    assert metric["ignore_case"] and metric["ignore_punctuation"]



def test_humaneval_scoring_two_problems(tmp_path):
    from lm_eval import evaluator
    from lm_eval.api.model import LM

    problems = [
        {"task_id": "t/0", "prompt": "def add(a, b):\n", "entry_point": "add", "canonical_solution": "",
         "test": "def check(f):\n    assert f(2, 3) == 5\n"},
        {"task_id": "t/1", "prompt": "def neg(x):\n", "entry_point": "neg", "canonical_solution": "",
         "test": "def check(f):\n    assert f(2) == -2\n"},
    ]
    completions = {"def add(a, b):\n": "    return a + b\n", "def neg(x):\n": "    return x\n"}  # 1 right, 1 wrong

    class Canned(LM):
        def generate_until(self, requests):
            return [completions[r.args[0]] for r in requests]

        def loglikelihood(self, requests):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests):
            raise NotImplementedError

    _local_variant(tmp_path, "humaneval_kvp.yaml", "humaneval_local", "test", problems)
    manager = ev.task_manager([tmp_path])
    with pytest.raises(ValueError, match="unsafe"):
        evaluator.simple_evaluate(model=Canned(), tasks=["humaneval_local"], task_manager=manager)
    res = evaluator.simple_evaluate(model=Canned(), tasks=["humaneval_local"], task_manager=manager,
                                    confirm_run_unsafe_code=True)
    assert res["results"]["humaneval_local"]["pass_at_1,create_test"] == 0.5


def test_pass_at_k_estimator():
    import importlib.util

    spec = importlib.util.spec_from_file_location("kvp_humaneval", ev.TASKS_DIR / "kvp_humaneval.py")
    he = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(he)
    assert he.pass_at_k_estimate(20, 0, 10) == 0.0
    assert he.pass_at_k_estimate(20, 11, 10) == 1.0
    assert he.pass_at_k_estimate(20, 1, 10) == pytest.approx(0.5)  # 1 - C(19,10)/C(20,10)
    assert he.pass_at_k_estimate(10, 3, 1) == pytest.approx(0.3)


def _one_error(capsys, *argv: str) -> str:
    assert main(list(argv)) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1, err
    return err[0]


def test_bad_task_files_and_paths_are_one_line_errors(tmp_path, capsys):
    """Malformed or missing data, a malformed task YAML, a missing --include-path and an --output-dir
    that is a file: one line each, naming the file or task, before any scoring."""
    root = write_tasks(tmp_path / "tasks")
    (root / "ll.jsonl").write_text('{"q": "a", "choices": ["x"], "label": 0}\n{not json\n')
    (root / "gen.jsonl").unlink()
    line = _one_error(capsys, "evaluate", "--tasks", "local_ll", "--include-path", str(root))
    assert f"task 'local_ll' ({root / 'local_ll.yaml'}, data files: ['{root / 'll.jsonl'}']): cannot load its " \
           "dataset: DatasetGenerationError" in line and "JSON parse error" in line, line
    line = _one_error(capsys, "evaluate", "--tasks", "local_gen", "--include-path", str(root))
    assert "task 'local_gen'" in line and f"FileNotFoundError: Unable to find '{root / 'gen.jsonl'}'" in line, line
    line = _one_error(capsys, "evaluate", "--tasks", "local_ll", "--include-path", str(tmp_path / "missing"))
    assert line == f"error: --include-path {tmp_path / 'missing'} does not exist"
    line = _one_error(capsys, "evaluate", "--tasks", "local_ll", "--include-path", str(root / "ll.jsonl"))
    assert "is not a directory (give the folder holding task YAML files)" in line
    (root / "broken.yaml").write_text("task: broken\n  bad: [indent\n")
    line = _one_error(capsys, "evaluate", "--tasks", "broken", "--include-path", str(root))
    assert line == (f"error: task file {root / 'broken.yaml'} is not valid YAML: mapping values are not allowed "
                    "here (line 2, column 6)")
    (root / "broken.yaml").write_text("- just a list\n")
    line = _one_error(capsys, "evaluate", "--tasks", "broken", "--include-path", str(root))
    assert line == f"error: task file {root / 'broken.yaml'} must hold a mapping of task settings, got list"
    (tmp_path / "afile").write_text("")
    line = _one_error(capsys, "evaluate", "--tasks", "local_ll", "--output-dir", str(tmp_path / "afile"))
    assert line == f"error: --output-dir {tmp_path / 'afile'} is a file, not a directory"
    (tmp_path / "out" / "results.json").mkdir(parents=True)
    line = _one_error(capsys, "evaluate", "--tasks", "local_ll", "--output-dir", str(tmp_path / "out"))
    assert line.endswith("results.json is a directory, not a file")


def test_offline_hub_task_is_one_line(tmp_path):
    import os
    import subprocess
    import sys

    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "hub.yaml").write_text((write_tasks(tmp_path / "t") / "local_ll.yaml").read_text().replace(
        "task: local_ll", "task: hub_ll").replace("dataset_path: json", "dataset_path: nobody/kvp_no_such_dataset"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "kvp_mlx.cli", "evaluate", "--tasks", "hub_ll", "--include-path",
                           str(tmp_path / "hub")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "task 'hub_ll'" in errors[0] and "nobody/kvp_no_such_dataset" in errors[0], errors
    assert "HF_HUB_OFFLINE is set: the dataset must be in the local cache" in errors[0]
