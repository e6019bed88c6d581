"""The toy world: a reproducible, CPU-sized KV Prediction setup built from scratch.

    python -m bench.toyworld [--out models/toyworld] [--profile full|smoke]   (make toyworld)

1. corpus: this interpreter's standard library sources, split by file into train / held-out (seed 0);
2. a SentencePiece BPE tokenizer (vocab 4096) trained on the train split;
3. an OpenELM-architecture base (~7M parameters) and a smaller auxiliary, each pretrained alone;
4. KVP-C: base + pretrained auxiliary; KVP-LP: base + its layers {0, 2, 4}; both trained with
   `kvp-mlx train` (ridge init, then corenet's loss). Baselines with the same token budget as
   their KVP counterpart: aux-only (the auxiliary trained on alone) and LP-only (the layer-pruned
   model fine-tuned alone). Also a ridge-only (--steps 0) and a random-init predictor for KVP-C.
   KVP-C-mixed: KVP-C trained with --exact-prefix-fraction 0.5 (half the sequences see the base's
   exact K/V before a random split), for warm sessions after a repair.
5. the KVP-C model is exported (float16) as the package's embedded demo model.

--base-from DIR takes the base from DIR instead of pretraining it (the longest stage, about 52 of
the 80 minutes): e.g. the embedded demo's base (kvp_mlx/default_model/base), which is this world's
base exported in float16. Its tokenizer must be the world's (same fingerprint); results.json says so.

Every stage is skipped when its output exists (delete it, or --force, to redo); a stage that was
interrupted resumes from its checkpoint. Held-out losses of every stage go to `results.json`.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import kvp_mlx  # noqa: F401  (optimized BLAS before mlx.core)

from kvp_mlx import building as mb
from kvp_mlx.model import DEFAULT_MODEL_DIR, KVPModel, load, load_lm
from kvp_mlx.training.data import Batches, pack, read_documents, tokenize_documents
from kvp_mlx.training.loop import TrainConfig, train
from kvp_mlx.training.losses import cross_entropy, lm_loss

SEED = 0
VOCAB = 4096
SEQ_LEN = 256
BATCH = 8
LP_LAYERS = [0, 2, 4]
SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "__pycache__", "lib2to3", "tkinter",
             "turtledemo", "ensurepip"}


def openelm_config(n_layers: int, dim: int, q_heads: int, kv_heads: int, ffn_mult: float, vocab: int = VOCAB,
                   max_context: int = SEQ_LEN) -> dict:
    return {
        "model_type": "openelm", "head_dim": 64, "num_transformer_layers": n_layers, "model_dim": dim,
        "vocab_size": vocab, "ffn_dim_divisor": 256, "num_query_heads": [q_heads] * n_layers,
        "num_kv_heads": [kv_heads] * n_layers, "ffn_multipliers": [ffn_mult] * n_layers,
        "normalize_qk_projections": True, "share_input_output_layers": True,
        "rope_freq_constant": 10000, "rms_norm_eps": 1e-6,
        "max_context_length": max_context,  # trained on sequences this long: longer prompts get a warning
    }


BASE_CONFIG = openelm_config(6, 256, 4, 2, 4.0)  # 7.0M parameters (1.0M of them embeddings)
AUX_CONFIG = openelm_config(3, 128, 2, 1, 2.0)  # ~1.0M parameters (0.5M embeddings)


@dataclass
class Profile:
    base_steps: int  # base pretraining
    aux_steps: int  # auxiliary pretraining
    kvp_steps: int  # KVP training, and the baselines' extra training on the same tokens


PROFILES = {
    "full": Profile(base_steps=1200, aux_steps=300, kvp_steps=100),
    "smoke": Profile(base_steps=4, aux_steps=2, kvp_steps=2),
}


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if not set(p.relative_to(root).parts[:-1]) & SKIP_DIRS)


def build_corpus(out: Path, heldout_fraction: float = 0.05) -> tuple[Path, Path]:
    """train.jsonl / heldout.jsonl, one record per stdlib file, split by file with a fixed seed."""
    out.mkdir(parents=True, exist_ok=True)
    train_path, held_path = out / "train.jsonl", out / "heldout.jsonl"
    if train_path.exists() and held_path.exists():
        return train_path, held_path
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files()
    order = list(range(len(files)))
    random.Random(SEED).shuffle(order)
    n_held = max(1, int(len(files) * heldout_fraction))
    held = set(order[:n_held])
    with open(train_path, "w") as ft, open(held_path, "w") as fh:
        for i, f in enumerate(files):
            text = f.read_text(encoding="utf-8", errors="replace")
            record = json.dumps({"name": str(f.relative_to(root)), "text": text})
            (fh if i in held else ft).write(record + "\n")
    return train_path, held_path


def train_tokenizer(train_jsonl: Path, out: Path, vocab: int = VOCAB, split_by_script: bool = True) -> Path:
    """SentencePiece BPE (byte fallback) on the train split, turned into files mlx-lm loads; without
    ``split_by_script``, pieces may join letters and punctuation (``Answer:``)."""
    import sentencepiece as spm

    from kvp_mlx.tokenizer_files import write_tokenizer_files

    if (out / "tokenizer.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    texts = [json.loads(line)["text"] for line in train_jsonl.read_text().splitlines()]
    lines = [ln for t in texts for ln in t.splitlines() if ln.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(out / "sp"), vocab_size=vocab, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, split_digits=True, remove_extra_whitespaces=False,
        max_sentence_length=100000, num_threads=1, input_sentence_size=2_000_000, shuffle_input_sentence=False,
        split_by_unicode_script=split_by_script, user_defined_symbols=["    ", "\t"], seed_sentencepiece_size=200_000,
        minloglevel=2, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
    )
    shutil.move(str(out / "sp.model"), out / "tokenizer.model")
    (out / "sp.vocab").unlink()
    write_tokenizer_files(out / "tokenizer.model", out)
    return out


def tokenizer_fingerprint(model_file: Path) -> str:
    """SHA-256 of the pieces and scores (the .model file itself also records its output path)."""
    import hashlib

    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    pieces = [f"{sp.id_to_piece(i)}\t{sp.get_score(i)!r}" for i in range(sp.get_piece_size())]
    return hashlib.sha256("\n".join(pieces).encode()).hexdigest()


def packed(jsonl: Path, tokenizer) -> Batches:
    return Batches(pack(tokenize_documents(tokenizer, read_documents([jsonl])), SEQ_LEN), BATCH, SEED)


def heldout_ce(model, held: Batches, max_batches: int = 8) -> float:
    values = [float(cross_entropy(model(b[:, :-1]), b[:, 1:])) for b in held.in_order(max_batches)]
    return sum(values) / len(values)


def train_lm(model, config: dict, data: Batches, held: Batches, steps: int, lr: float, out: Path,
             tokenizer_dir: Path, desc: str) -> dict:
    """Plain language-model training (pretraining and the baselines), then an mlx-lm directory."""
    cfg = TrainConfig(steps=steps, learning_rate=lr, warmup_steps=min(50, steps), eval_every=max(steps, 1),
                      save_every=50, seed=SEED)
    work = out.with_name(out.name + ".train")
    resume = (work / "checkpoint" / "state.json").is_file()
    history = train(model, lambda b: lm_loss(model, b), data, cfg, checkpoint_dir=work, resume=resume, desc=desc)
    result = {"steps": steps, "tokens": steps * BATCH * SEQ_LEN, "final_loss": history[-1]["loss"] if history else None,
              "heldout_ce": heldout_ce(model, held)}
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    mb.save_lm_dir(tmp, model, config, tokenizer_dir)
    (tmp / "train_history.json").write_text(json.dumps(history))
    tmp.rename(out)
    shutil.rmtree(work, ignore_errors=True)
    return result


def kvp_train(base: Path, out: Path, data: Path, steps: int, init: str = "ridge", aux: Path | None = None,
              aux_layers: list[int] | None = None, exact_prefix_fraction: float = 0.0, batch: int = BATCH,
              seq_len: int = SEQ_LEN, lr: float = 1e-3) -> None:
    from kvp_mlx.training import KVPRunConfig, LossWeights, TrainConfig, run_kvp_training

    run_kvp_training(
        KVPRunConfig(base=str(base), aux=str(aux) if aux is not None else None, aux_layers=aux_layers,
                     data=[str(data)], out=str(out), init=init, batch_size=batch, seq_len=seq_len,
                     heldout_fraction=0.0, loss=LossWeights(exact_prefix_fraction=exact_prefix_fraction),
                     train=TrainConfig(steps=steps, learning_rate=lr, warmup_steps=min(20, max(steps, 1)),
                                       seed=SEED, save_every=50, eval_every=max(steps, 1))),
        resume=(out.with_name(out.name + ".train") / "checkpoint" / "state.json").is_file(),
    )


def kvp_heldout_ce(directory: Path, held: Batches, max_batches: int = 8) -> float:
    from kvp_mlx.training.losses import KVPTrainable, kvp_eval_ce

    model = load(directory)
    assert model.aux is not None and model.predictor is not None  # a KV Prediction directory
    trainable = KVPTrainable(model.aux, model.predictor)
    values = [float(kvp_eval_ce(model.base, trainable, b)) for b in held.in_order(max_batches)]
    return sum(values) / len(values)


def reuse_base(source: Path, out: Path, tok_dir: Path, held: Batches) -> dict:
    """The base taken from ``source`` (cast to float32) instead of pretrained, with the world's tokenizer."""
    import mlx.core as mx

    if not (source / "config.json").is_file() or not (source / "tokenizer.model").is_file():
        raise SystemExit(f"--base-from {source}: not a model directory with a SentencePiece tokenizer "
                         "(config.json and tokenizer.model)")
    if tokenizer_fingerprint(source / "tokenizer.model") != tokenizer_fingerprint(tok_dir / "tokenizer.model"):
        raise SystemExit(f"--base-from {source}: its tokenizer is not this world's (different fingerprint)")
    model, _, config = load_lm(source)
    model.set_dtype(mx.float32)
    config = {k: v for k, v in config.items() if k != "torch_dtype"}
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    mb.save_lm_dir(tmp, model, config, tok_dir)
    tmp.rename(out)
    return {"reused_from": str(source), "heldout_ce": heldout_ce(model, held)}


def export_demo(kvp_dir: Path, dest: Path) -> None:
    """The KVP-C model in float16 (cast back to float32 on CPU at load): the embedded default.

    The export is checked before it replaces ``dest``: the written directory, loaded in float16,
    gives exactly the first-token logits of the source model cast to float16 (kvp and base
    prefill of a fixed prompt)."""
    model = load(kvp_dir, dtype="float16")
    assert model.aux is not None and model.predictor is not None  # a KV Prediction directory
    _, _, base_cfg = load_lm(kvp_dir / "base")
    _, _, aux_cfg = load_lm(kvp_dir / "aux")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    mb.save_kvp_dir(tmp, model.base, base_cfg, model.aux, aux_cfg, model.predictor, kvp_dir / "base",
                    source="toy-world KVP-C demo (python -m bench.toyworld)")
    shutil.copy(kvp_dir / "training.json", tmp / "training.json")
    check_export(model, load(tmp, dtype="float16"))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def check_export(source: KVPModel, written: KVPModel) -> None:
    """Refuse an export whose first-token logits differ from its source's (same dtype)."""
    import mlx.core as mx

    prompt = mx.array([list(source.tokenizer.encode("def fibonacci(n):\n    return"))])
    for method in ("kvp", "base"):
        want = source.prefill(prompt, method=method).logits
        got = written.prefill(prompt, method=method).logits
        if not mx.array_equal(want, got).item():
            raise SystemExit(f"export check failed: the written model's {method} logits differ from its source's")


def open_stages(out: Path, state_file: str, force: bool) -> tuple[dict, Callable[[str, Callable[[], Any]], Any]]:
    """A world's working folder (emptied with ``force``), its state (``out/state_file``, kept across
    runs; ``state["seconds"]`` times each stage the first time it runs) and ``stage(name, fn)``, which
    runs ``fn`` and saves the state."""
    if force:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    path = out / state_file
    state = json.loads(path.read_text()) if path.exists() else {}
    timings = state.setdefault("seconds", {})

    def stage(name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        value = fn()
        if name not in timings:
            timings[name] = round(time.perf_counter() - t0, 1)
        path.write_text(json.dumps(state, indent=2))
        return value

    return state, stage


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="models/toyworld", help="working directory (default: models/toyworld)")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="full")
    parser.add_argument("--export-demo", default=str(DEFAULT_MODEL_DIR),
                        help="where to write the embedded demo model ('' to skip)")
    parser.add_argument("--force", action="store_true", help="rebuild every stage")
    parser.add_argument("--base-from", metavar="DIR",
                        help="take the base from DIR (an mlx-lm directory with this world's tokenizer, e.g. "
                             "kvp_mlx/default_model/base) instead of pretraining it")
    parser.add_argument("--compare-with", metavar="RESULTS_JSON",
                        help="after building, compare with another run's results.json (e.g. the committed "
                             "bench/results/toyworld/results.json): same tokenizer, held-out losses within "
                             "--tolerance; exit 1 otherwise")
    parser.add_argument("--tolerance", type=float, default=0.02, help="nats per token (default 0.02)")
    args = parser.parse_args(argv)
    out, prof = Path(args.out), PROFILES[args.profile]
    results, stage = open_stages(out, "results.json", args.force)
    results.update(profile=args.profile, seed=SEED, vocab=VOCAB, seq_len=SEQ_LEN, batch=BATCH,
                   base_config=BASE_CONFIG, aux_config=AUX_CONFIG, lp_layers=LP_LAYERS)
    results_path = out / "results.json"
    timings = results["seconds"]

    train_jsonl, held_jsonl = stage("corpus", lambda: build_corpus(out / "corpus"))
    tok_dir = stage("tokenizer", lambda: train_tokenizer(train_jsonl, out / "tokenizer"))
    results["tokenizer_fingerprint"] = tokenizer_fingerprint(tok_dir / "tokenizer.model")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    data, held = packed(train_jsonl, tokenizer), packed(held_jsonl, tokenizer)
    results["train_tokens"], results["heldout_tokens"] = data.sequences.size, held.sequences.size

    def pretrain(name: str, config: dict, steps: int, lr: float, seed: int, init=None):
        if (out / name / "config.json").exists():
            return
        model, cfg = init() if init else (mb.build_model(config, seed=seed), config)
        results[name] = train_lm(model, cfg, data, held, steps, lr, out / name, tok_dir, name)

    def make_base() -> None:
        if args.base_from and not (out / "base" / "config.json").exists():
            results["base"] = reuse_base(Path(args.base_from), out / "base", tok_dir, held)
        pretrain("base", BASE_CONFIG, prof.base_steps, 2e-3, SEED)  # nothing to do once the base exists

    stage("base", make_base)
    stage("aux-pretrained", lambda: pretrain("aux-pretrained", AUX_CONFIG, prof.aux_steps, 3e-3, SEED + 1))
    corpus = out / "corpus" / "train.jsonl"
    for name, kw in (
        ("kvp-c", {"aux": out / "aux-pretrained", "steps": prof.kvp_steps}),
        ("kvp-c-ridge-only", {"aux": out / "aux-pretrained", "steps": 0}),
        ("kvp-c-random-init", {"aux": out / "aux-pretrained", "steps": 0, "init": "random"}),
        ("kvp-lp", {"aux_layers": LP_LAYERS, "steps": prof.kvp_steps}),
        ("kvp-c-mixed", {"aux": out / "aux-pretrained", "steps": prof.kvp_steps, "exact_prefix_fraction": 0.5}),
    ):
        def run_kvp(name=name, kw=kw):
            if not (out / name / "kvp_config.json").exists():
                kvp_train(out / "base", out / name, corpus, **kw)
            results[name] = {"steps": kw["steps"], "heldout_ce": kvp_heldout_ce(out / name, held)}
        stage(name, run_kvp)

    def aux_only_init():
        model, _, cfg = load_lm(out / "aux-pretrained")
        return model, cfg

    def lp_only_init():
        base, _, cfg = load_lm(out / "base")
        return mb.layer_pruned(base, cfg, LP_LAYERS)

    stage("aux-only", lambda: pretrain("aux-only", AUX_CONFIG, prof.kvp_steps, 1e-3, SEED, aux_only_init))
    stage("lp-only", lambda: pretrain("lp-only", BASE_CONFIG, prof.kvp_steps, 1e-3, SEED, lp_only_init))
    if args.export_demo:
        stage("export-demo", lambda: export_demo(out / "kvp-c", Path(args.export_demo)))
    results_path.write_text(json.dumps(results, indent=2))
    summary = {k: v.get("heldout_ce") for k, v in results.items() if isinstance(v, dict) and "heldout_ce" in v}
    print(json.dumps({"heldout_ce": summary, "seconds": timings}, indent=2))
    if args.compare_with:
        return 0 if compare_runs(results, json.loads(Path(args.compare_with).read_text()), args.tolerance) else 1
    return 0


def compare_runs(run: dict, reference: dict, tolerance: float) -> bool:
    """Print how a rebuild's tokenizer and held-out losses compare with a reference run's."""
    same_tokenizer = run.get("tokenizer_fingerprint") == reference.get("tokenizer_fingerprint")
    ok = same_tokenizer and run.get("profile") == reference.get("profile")
    print(f"profile {run.get('profile')} vs {reference.get('profile')}; tokenizer fingerprint "
          f"{'identical' if same_tokenizer else 'DIFFERENT'}")
    for stage, ref in reference.items():
        if not (isinstance(ref, dict) and "heldout_ce" in ref):
            continue
        new = run.get(stage, {}).get("heldout_ce")
        diff = None if new is None else new - ref["heldout_ce"]
        passed = diff is not None and abs(diff) <= tolerance
        ok &= passed
        shown = "missing" if diff is None else f"{new:.4f} (reference {ref['heldout_ce']:.4f}, diff {diff:+.2e})"
        print(f"  {stage:20s} held-out CE {shown} {'ok' if passed else 'OUTSIDE TOLERANCE'}")
    print(f"rebuild {'matches' if ok else 'does NOT match'} the reference (tolerance {tolerance} nats)")
    return ok


if __name__ == "__main__":
    raise SystemExit(main())
