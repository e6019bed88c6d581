"""The conversation world: EpiCache and its baselines on a model trained to answer from a history.

    python -m bench.convworld [--out models/convworld] [--profile full|smoke] [--results DIR]

1. data: synthetic multi-session conversations between two speakers (``bench.conversation_world``): each
   session on one topic, facts (names, places, dates, possessions, plans) stated once among filler,
   one question per fact (one- or two-word answers) in cloze form (``Finish what Chen said: My new
   boss``: the statement up to its value, whose cue word occurs once in the history), asked in
   random order. Train, dev (stopping rule) and test splits in the ``synthetic`` format; the train
   split as text too;
2. a SentencePiece BPE tokenizer (toyworld's recipe) on the train text, with pieces that join letters
   and punctuation, so that ``conv-eval``'s answer cue ``Answer:`` is one token;
3. an OpenELM base trained with the project's loop (``training.loop.train`` + ``targeted_lm_loss``:
   LM CE plus ``answer_weight`` x the CE of the answer tokens) on one conversation per sequence (the
   history, then every question with its answer and EOS, tokenised as ``kvp-mlx conv-eval`` prompts
   them), first on short conversations (two sessions, no filler lines), then on the world's own,
   until full-KV exact match on dev reaches the target or the step limit; a smaller auxiliary
   pretrained alone on the same curriculum, then KV Prediction (``kvp-mlx train``: auxiliary and
   predictor together, through the frozen base);
4. evaluation on the test split with ``kvp_mlx.epicache.evaluate``: full KV, then every policy at
   budgets of 1/8, 1/4, 1/2 of the mean history length (entries per KV head per layer): exact match,
   F1, peak KV bytes, build (offline) and answer time; EpiCache with KV-Prediction-built episodes
   next to base-built ones.

Every stage is skipped when its output exists; the base's training resumes from its checkpoint.
Outputs: ``convworld.json``, ``convworld.md`` and ``convworld.png`` in ``--results``.
"""

from __future__ import annotations

import argparse
import json
import sys
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import kvp_mlx  # noqa: F401  (optimized BLAS before mlx.core)

import numpy as np

from kvp_mlx import building as mb
from bench.toyworld import kvp_train, open_stages, openelm_config, train_tokenizer
from kvp_mlx.epicache.evaluate import EvalReport, evaluate, prompt_parts
from kvp_mlx.epicache.loaders import Conversation, load_synthetic
from bench.conversation_world import world_conversations
from kvp_mlx.epicache.policies import available_policies
from kvp_mlx.model import KVPModel, load
from kvp_mlx.training.data import Batches, BatchSource, Curriculum
from kvp_mlx.training.loop import TrainConfig, train
from kvp_mlx.training.losses import targeted_lm_loss

SEED = 0
FRACTIONS = (0.125, 0.25, 0.5)
BASELINES = tuple(p for p in available_policies(evicting=True) if p != "epicache")


@dataclass
class Profile:
    train_convs: int
    dev_convs: int
    test_convs: int
    sessions: int
    filler: int
    vocab: int
    seq_len: int  # one conversation (history + questions + answers) per sequence, padded with EOS
    base: tuple[int, int, int, int, float]  # openelm_config(n_layers, dim, q_heads, kv_heads, ffn_mult)
    aux: tuple[int, int, int, int, float]
    batch: int
    base_steps: int  # at most
    base_lr: float
    check_every: int  # dev exact match every this many steps (the stopping rule)
    target_em: float  # stop the base's training once dev full-KV exact match reaches this
    aux_steps: int
    kvp_steps: int
    kvp_lr: float  # kvp-mlx train's peak learning rate (the auxiliary and the predictor, through the base)
    block: int  # block-wise prefill
    episodes: int
    medoids: int
    window: int
    # the base's curriculum: its first ``short_steps`` steps on short conversations (``short_sessions``
    # sessions without filler lines, ``short_batch`` rows of ``short_seq_len`` tokens), then the world's own
    short_steps: int
    short_sessions: int
    short_seq_len: int
    short_batch: int
    answer_weight: float = 5.0  # the base's loss: LM CE + this x CE on the answer tokens
    cloze: bool = True  # questions quote the fact's statement up to its value (conversation_world.cloze_question)


PROFILES = {
    # three sessions per conversation (histories of ~230 tokens; ~310 with the questions and answers)
    "full": Profile(train_convs=12000, dev_convs=16, test_convs=40, sessions=3, filler=2, vocab=1536, seq_len=384,
                    base=(4, 128, 2, 1, 4.0), aux=(2, 64, 1, 1, 2.0), batch=8, base_steps=2000, base_lr=3e-3,
                    check_every=100, target_em=0.9, aux_steps=1800, kvp_steps=300, kvp_lr=1e-2,
                    block=32, episodes=3, medoids=2, window=4,
                    short_steps=1500, short_sessions=2, short_seq_len=192, short_batch=16),
    "smoke": Profile(train_convs=40, dev_convs=2, test_convs=2, sessions=2, filler=1, vocab=400, seq_len=512,
                     # a tiny learning rate: the smoke models stay near their random init, whose answers are
                     # not all an immediate EOS (so comparing decodes means something)
                     base=(2, 64, 1, 1, 2.0), aux=(1, 64, 1, 1, 1.0), batch=2, base_steps=4, base_lr=1e-5,
                     check_every=2, target_em=1.01, aux_steps=2, kvp_steps=2, kvp_lr=1e-3,
                     block=32, episodes=2, medoids=1, window=4,
                     short_steps=2, short_sessions=1, short_seq_len=192, short_batch=2),
}


# --- data -----------------------------------------------------------------------------------------

def conversation_text(conv: Conversation) -> str:
    """A conversation as training text (tokenizer and KV Prediction): history, then each Q/A."""
    return conv.history_text() + "".join(f"\nQuestion: {qa.question}\nAnswer: {qa.answer}" for qa in conv.questions)


def build_data(out: Path, prof: Profile) -> dict[str, Path]:
    """train/dev/test ``.json`` (synthetic format), ``short.json`` (the curriculum's short
    conversations) and ``train.jsonl`` (text); disjoint seeds."""
    paths = {name: out / f"{name}.json" for name in ("train", "dev", "test", "short")}
    paths["text"] = out / "train.jsonl"
    if all(p.exists() for p in paths.values()):
        return paths
    out.mkdir(parents=True, exist_ok=True)
    sizes = {"train": prof.train_convs, "dev": prof.dev_convs, "test": prof.test_convs}
    for seed, (name, n) in enumerate(sizes.items(), start=1):
        convs = world_conversations(n, seed=seed, sessions=prof.sessions, filler=prof.filler, cloze=prof.cloze)
        paths[name].write_text(json.dumps(convs))
    short = world_conversations(prof.train_convs, seed=len(sizes) + 1, sessions=prof.short_sessions, filler=0,
                                cloze=prof.cloze)
    paths["short"].write_text(json.dumps(short))
    with open(paths["text"], "w") as f:
        for conv in load_synthetic(paths["train"]):
            f.write(json.dumps({"text": conversation_text(conv)}) + "\n")
    return paths


def conversation_ids(tokenizer: Any, conv: Conversation) -> tuple[list[int], list[int]]:
    """The history as ``conv-eval`` prompts it, then each question's prompt, answer and EOS; with a
    0/1 mark per token: 1 on the answers and their EOS."""
    history = conv.history_text()
    ids, _ = prompt_parts(tokenizer, history, "")
    marks = [0] * len(ids)
    for qa in conv.questions:
        _, q_ids = prompt_parts(tokenizer, "", qa.question)  # the question's ids do not depend on the history
        answer = list(tokenizer.encode(qa.answer, add_special_tokens=False)) + [tokenizer.eos_token_id]
        ids += q_ids + answer
        marks += [0] * len(q_ids) + [1] * len(answer)
    return ids, marks


def sequences(tokenizer: Any, convs: list[Conversation], seq_len: int) -> np.ndarray:
    """[N, 2, seq_len + 1]: one conversation per row (ids, then the answer marks), padded with EOS
    (marked 0); longer conversations are skipped."""
    eos, rows = tokenizer.eos_token_id, []
    for conv in convs:
        ids, marks = conversation_ids(tokenizer, conv)
        pad = seq_len + 1 - len(ids)
        if pad >= 0:
            rows.append([ids + [eos] * pad, marks + [0] * pad])
    if not rows:
        raise SystemExit(f"no conversation fits in {seq_len + 1} tokens")
    return np.asarray(rows, dtype=np.int32)


# --- models ---------------------------------------------------------------------------------------

def dev_exact_match(model: Any, tokenizer: Any, dev: list[Conversation], prof: Profile) -> float:
    """Full-KV exact match on the dev split (the base's stopping rule)."""
    report = evaluate(KVPModel(base=model, tokenizer=tokenizer), dev, "full", None, block=prof.block, max_tokens=8)
    return report.mean_em


def train_until(name: str, out: Path, config: dict, data: BatchSource, prof: Profile, steps: int, lr: float, seed: int,
                tokenizer: Any, tok_dir: Path, dev: list[Conversation] | None) -> dict:
    """Train a fresh model with the project's loop; with ``dev``, check full-KV exact match every
    ``check_every`` steps and stop at ``target_em``. Resumes from ``<name>.train/checkpoint``."""
    model = mb.build_model(config, seed=seed)

    def loss(batch):
        return targeted_lm_loss(model, batch, prof.answer_weight)

    every = prof.check_every if dev is not None else max(steps, 1)
    cfg = TrainConfig(steps=steps, learning_rate=lr, warmup_steps=min(100, steps), eval_every=max(steps, 1),
                      save_every=every, seed=SEED)
    work = out / f"{name}.train"
    log_path = work / "dev_em.json"
    log: list[dict] = json.loads(log_path.read_text()) if log_path.exists() else []
    step, history = 0, []
    while True:
        ckpt = work / "checkpoint" / "state.json"
        resume = ckpt.is_file()
        if resume:
            step = int(json.loads(ckpt.read_text())["step"])
        if step >= steps or (log and log[-1]["em"] >= prof.target_em):
            if resume:  # load the last checkpoint's weights
                history = train(model, loss, data, cfg, checkpoint_dir=work, resume=True,
                                desc=name, stop_after=step)
            break
        tic = time.perf_counter()
        history = train(model, loss, data, cfg, checkpoint_dir=work, resume=resume, desc=name,
                        stop_after=min(steps, step + every))
        seconds = time.perf_counter() - tic
        step = min(steps, step + every)
        if dev is not None:
            log.append({"step": step, "em": dev_exact_match(model, tokenizer, dev, prof), "train_seconds": seconds,
                        "loss": history[-1]["loss"]})
            log_path.write_text(json.dumps(log, indent=1))
            print(f"{name}: step {step} loss {history[-1]['loss']:.3f} dev full-KV EM {log[-1]['em']:.3f}", flush=True)
    tmp = out / f"{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    mb.save_lm_dir(tmp, model, config, tok_dir)
    (tmp / "train_history.json").write_text(json.dumps(history))
    (tmp / "dev_em.json").write_text(json.dumps(log, indent=1))
    tmp.rename(out / name)
    shutil.rmtree(work, ignore_errors=True)
    return {"steps": step, "final_loss": history[-1]["loss"] if history else None, "dev_em": log}


# --- evaluation -----------------------------------------------------------------------------------

def summary(report: EvalReport) -> dict:
    return {"policy": report.policy, "budget": report.budget, "em": report.mean_em, "f1": report.mean_f1,
            "questions": len(report.results), "peak_kv_bytes": report.peak_kv_bytes,
            "build_seconds": round(report.build_seconds, 3), "answer_seconds": round(report.answer_seconds, 3),
            "answers": [[r.prediction, r.answer, r.episode] for r in report.results]}


def run_eval(model: KVPModel, test: list[Conversation], prof: Profile, path: Path, aux: KVPModel) -> dict:
    """Every policy at each budget; EpiCache also KV-Prediction-built; ``aux`` (the pretrained
    auxiliary, as a plain model) answers from its own full KV. Resumes from ``path``."""
    results: dict = json.loads(path.read_text()) if path.exists() else {}
    hist = [len(prompt_parts(model.tokenizer, c.history_text(), "")[0]) for c in test]
    mean_hist = float(np.mean(hist))
    results.update(history_tokens={"mean": mean_hist, "min": min(hist), "max": max(hist)},
                   budgets={str(f): max(1, round(f * mean_hist)) for f in FRACTIONS})
    runs = results.setdefault("runs", {})
    opts = dict(block=prof.block, n_episodes=prof.episodes, n_medoids=prof.medoids, window=prof.window,
                max_tokens=8)
    # full-kvp: the whole history's cache from KV Prediction, no eviction (what KVP-built episodes start from)
    # aux-full: the auxiliary alone, its own full KV (what KV Prediction improves on)
    todo: list[tuple[str, KVPModel, str, int | None, bool]] = [
        ("full", model, "full", None, False), ("full-kvp", model, "full", None, True),
        ("aux-full", aux, "full", None, False)]
    for f in FRACTIONS:
        budget = results["budgets"][str(f)]
        todo += [(f"{p}@{f}", model, p, budget, False) for p in ("epicache",) + BASELINES]
        todo.append((f"epicache-kvp@{f}", model, "epicache", budget, True))
    for key, who, policy, budget, kvp in todo:
        if key in runs:
            continue
        report = evaluate(who, test, policy, budget, kvp_build=kvp, **opts)  # type: ignore[arg-type]
        runs[key] = {**summary(report), "fraction": None if budget is None else float(key.split("@")[1]),
                     "kvp_build": kvp}
        print(f"{key:24s} budget {budget}  EM {report.mean_em:.3f}  F1 {report.mean_f1:.3f}  "
              f"peak KV {report.peak_kv_bytes / 2**10:.0f} KiB  build {report.build_seconds:.1f} s", flush=True)
        path.write_text(json.dumps(results, indent=1))
    return results


def standing(results: dict) -> list[str]:
    """EpiCache vs the best baseline at each budget, as measured."""
    runs, lines = results["runs"], []
    for f in FRACTIONS:
        epi = runs[f"epicache@{f}"]
        best = max(BASELINES, key=lambda p: (runs[f"{p}@{f}"]["em"], runs[f"{p}@{f}"]["f1"]))
        b = runs[f"{best}@{f}"]
        diff = epi["em"] - b["em"]
        verdict = "beats" if diff > 0 else "ties with" if diff == 0 else "trails"
        lines.append(f"At 1/{round(1 / f)} of the history (M = {epi['budget']}), EpiCache {verdict} the best baseline "
                     f"({best}): EM {epi['em']:.3f} vs {b['em']:.3f}, F1 {epi['f1']:.3f} vs {b['f1']:.3f}.")
    return lines


def markdown(results: dict) -> str:
    runs = results["runs"]
    full = runs["full"]
    h = results["history_tokens"]
    out = [f"# Conversation world ({results['profile']} profile)", "",
           f"{full['questions']} held-out questions over {results['test_conversations']} conversations; histories "
           f"of {h['min']}-{h['max']} tokens (mean {h['mean']:.0f}); block {results['profile_settings']['block']}; "
           f"budgets M per KV head per layer. Full KV: EM {full['em']:.3f}, F1 {full['f1']:.3f}, "
           f"peak KV {full['peak_kv_bytes'] / 2**10:.0f} KiB.", "",
           "| policy | " + " | ".join(f"1/{round(1 / f)} (M={results['budgets'][str(f)]}) EM / F1" for f in FRACTIONS)
           + " | peak KV at 1/8 (KiB) |", "|---|" + "---|" * (len(FRACTIONS) + 1)]
    for p in ("epicache", "epicache-kvp") + BASELINES:
        cells = [f"{runs[f'{p}@{f}']['em']:.3f} / {runs[f'{p}@{f}']['f1']:.3f}" for f in FRACTIONS]
        out.append(f"| {p} | " + " | ".join(cells) + f" | {runs[f'{p}@{FRACTIONS[0]}']['peak_kv_bytes'] / 2**10:.0f} |")
    out.append("| full | " + " | ".join(f"{full['em']:.3f} / {full['f1']:.3f}" for _ in FRACTIONS)
               + f" | {full['peak_kv_bytes'] / 2**10:.0f} |")
    out += ["", *standing(results), "", "EpiCache episodes built with the base vs with KV Prediction (offline time "
            "over all test conversations):", "",
            "| budget | base-built EM / F1 | build s | KVP-built EM / F1 | build s |", "|---|---|---|---|---|"]
    for f in FRACTIONS:
        b, k = runs[f"epicache@{f}"], runs[f"epicache-kvp@{f}"]
        out.append(f"| 1/{round(1 / f)} | {b['em']:.3f} / {b['f1']:.3f} | {b['build_seconds']:.1f} | "
                   f"{k['em']:.3f} / {k['f1']:.3f} | {k['build_seconds']:.1f} |")
    fk = runs["full-kvp"]
    out.append(f"| full KV | {full['em']:.3f} / {full['f1']:.3f} | {full['build_seconds']:.1f} | "
               f"{fk['em']:.3f} / {fk['f1']:.3f} | {fk['build_seconds']:.1f} |")
    ax = runs["aux-full"]
    out += ["", f"The auxiliary alone, from its own full KV: EM {ax['em']:.3f}, F1 {ax['f1']:.3f}, build "
            f"{ax['build_seconds']:.1f} s."]
    return "\n".join(out) + "\n"


def plot(results: dict, path: Path) -> bool:
    """The accuracy-vs-budget plot; False (nothing written) without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("em", "f1")):
        for p in ("epicache", "epicache-kvp") + BASELINES:
            ax.plot(FRACTIONS, [runs[f"{p}@{f}"][metric] for f in FRACTIONS], marker="o", label=p)
        ax.axhline(runs["full"][metric], color="black", linestyle="--", label="full KV")
        ax.set_xscale("log", base=2)
        ax.set_xticks(FRACTIONS, [f"1/{round(1 / f)}" for f in FRACTIONS])
        ax.set_xlabel("KV budget (fraction of the history)")
        ax.set_ylabel("exact match" if metric == "em" else "token F1")
        ax.set_ylim(0, 1.02)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Conversation world ({results['profile']} profile)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="models/convworld", help="working directory (default: models/convworld)")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="full")
    parser.add_argument("--results", default="bench/results/convworld",
                        help="where convworld.json/.md/.png go (default: bench/results/convworld)")
    parser.add_argument("--force", action="store_true", help="rebuild every stage")
    args = parser.parse_args(argv)
    out, prof = Path(args.out), PROFILES[args.profile]
    state, stage = open_stages(out, "state.json", args.force)
    state.update(profile=args.profile, seed=SEED, profile_settings=asdict(prof))

    paths = stage("data", lambda: build_data(out / "data", prof))
    tok_dir = stage("tokenizer", lambda: train_tokenizer(paths["text"], out / "tokenizer", vocab=prof.vocab,
                                                         split_by_script=False))
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    tokenizer = load_tokenizer(tok_dir)
    train_convs, dev = load_synthetic(paths["train"]), load_synthetic(paths["dev"])
    rows = sequences(tokenizer, train_convs, prof.seq_len)
    state["train_sequences"] = len(rows)
    data = Batches(rows, prof.batch, SEED)
    short = sequences(tokenizer, load_synthetic(paths["short"]), prof.short_seq_len)
    state["short_sequences"] = len(short)
    base_cfg = openelm_config(*prof.base, vocab=prof.vocab, max_context=prof.seq_len)
    aux_cfg = openelm_config(*prof.aux, vocab=prof.vocab, max_context=prof.seq_len)
    state.update(base_config=base_cfg, aux_config=aux_cfg)

    def model_stage(name: str, cfg: dict, source: BatchSource, steps: int, lr: float, seed: int, dev_set):
        if not (out / name / "config.json").exists():
            state[name] = train_until(name, out, cfg, source, prof, steps, lr, seed, tokenizer, tok_dir, dev_set)

    curriculum = Curriculum(Batches(short, prof.short_batch, SEED), data, prof.short_steps)
    stage("base", lambda: model_stage("base", base_cfg, curriculum, prof.base_steps, prof.base_lr, SEED, dev))
    # the auxiliary learns on the same curriculum (its own dev exact match is logged, as the base's)
    stage("aux-pretrained", lambda: model_stage("aux-pretrained", aux_cfg, curriculum, prof.aux_steps, prof.base_lr,
                                                SEED + 1, dev))

    def kvp_stage():
        if not (out / "kvp" / "kvp_config.json").exists():
            kvp_train(out / "base", out / "kvp", paths["text"], prof.kvp_steps, aux=out / "aux-pretrained",
                      batch=prof.batch, seq_len=prof.seq_len, lr=prof.kvp_lr)

    stage("kvp", kvp_stage)
    model = load(out / "kvp")
    test = load_synthetic(paths["test"])
    aux_alone = load(out / "aux-pretrained")
    results = stage("eval", lambda: run_eval(model, test, prof, out / "eval.json", aux_alone))
    results.update(profile=args.profile, test_conversations=len(test), profile_settings=asdict(prof),
                   base_config=base_cfg, aux_config=aux_cfg, train_sequences=state["train_sequences"],
                   training={k: state.get(k) for k in ("base", "aux-pretrained")}, seconds=state["seconds"])
    dest = Path(args.results)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "convworld.json").write_text(json.dumps(results, indent=1))
    (dest / "convworld.md").write_text(markdown(results))
    if not plot(results, dest / "convworld.png"):
        print("note: no plot (it needs matplotlib: pip install 'kvp-mlx[bench]')", file=sys.stderr)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
