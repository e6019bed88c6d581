"""`kvp-mlx train`: make a KV predictor for a base/auxiliary pair on your own text."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Train a KV Prediction model. The base model is frozen; the predictor (per-layer linear maps
from the auxiliary model's raw K/V to the base's) and, by default, the auxiliary model are
trained with corenet's loss: CE of the base attending only to predicted K/V + lambda_A CE of the
auxiliary + lambda_C L1 consistency of the predicted K/V (+ z-loss). --aux takes a separate
smaller model with the same tokenizer (KVP-C); --aux-layers derives a layer-pruned auxiliary
from the base (KVP-LP). --init ridge fits every map in closed form first; --steps 0 then gives a
calibration-only predictor in minutes. Writes a KV Prediction directory to --out; checkpoints
go to OUT.train/ (--resume continues from there). With --aux-train none, --predictor-only writes
just the predictor (a few MB) and names --base and --aux (or --aux-layers) in kvp_config.json
instead of copying the models."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--base", required=True, help="base model: mlx-lm directory or Hugging Face repo id")
    aux = parser.add_mutually_exclusive_group(required=True)
    aux.add_argument("--aux", help="auxiliary model directory or repo id (same tokenizer) for KVP-C")
    aux.add_argument("--aux-layers", help="comma-separated base layers to keep as the auxiliary (KVP-LP), e.g. 0,2,4")
    parser.add_argument("--data", nargs="+", required=True, help="text files, directories, or .jsonl files")
    parser.add_argument("--text-field", default="text", help="jsonl field holding the text (default: text)")
    parser.add_argument("--out", required=True, help="output KV Prediction directory")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    parser.add_argument("--predictor-only", action="store_true",
                        help="write only the predictor and name --base/--aux (absolute path or repo id as given) "
                             "instead of copying them; loading then needs those models; requires --aux-train none")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in OUT.train/")
    parser.add_argument("--mapping", help="layer mapping, one aux layer per base layer (default: the paper's rule)")
    parser.add_argument("--aux-train", choices=["full", "lora", "none"], default="full",
                        help="train the auxiliary model fully, with LoRA, or not at all (default: full)")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--init", choices=["ridge", "random"], default="ridge",
                        help="predictor initialisation (default: ridge regression on calibration data)")
    parser.add_argument("--ridge-lambda", type=float, default=1e-2, help="relative ridge penalty (default: 0.01)")
    parser.add_argument("--calibration-batches", type=int, default=16, help="batches for the ridge fit")
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps (0: calibration only)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--learning-rate", "--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--lambda-aux", type=float, default=1.0, help="weight of the auxiliary CE (lambda_A)")
    parser.add_argument("--lambda-consistency", type=float, default=1.0, help="weight of the L1 consistency (lambda_C)")
    parser.add_argument("--consistency-reduce", choices=["sum", "mean"], default="sum",
                        help="consistency over layers: summed (released configs) or averaged (paper's preference)")
    parser.add_argument("--z-loss", type=float, default=1e-4)
    parser.add_argument("--exact-prefix-fraction", type=float, default=0.0, metavar="P",
                        help="share of training sequences whose first positions (a random split) hold the "
                             "base's exact K/V, the rest predicted: trains for warm sessions after "
                             "`repair` (exact history, predicted new message). 0 (default): every "
                             "position predicted, as corenet trains")
    parser.add_argument("--heldout-fraction", type=float, default=0.05, help="documents held out for eval loss")
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--save-every", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)


def config_from_args(args: argparse.Namespace):
    from kvp_mlx.training.kvp_run import KVPRunConfig, parse_int_list
    from kvp_mlx.training.loop import TrainConfig
    from kvp_mlx.training.losses import LossWeights

    return KVPRunConfig(
        base=args.base, aux=args.aux, aux_layers=parse_int_list(args.aux_layers), data=args.data, out=args.out,
        mapping=parse_int_list(args.mapping), aux_train=args.aux_train, lora_rank=args.lora_rank,
        init=args.init, ridge_lambda=args.ridge_lambda, calibration_batches=args.calibration_batches,
        batch_size=args.batch_size, seq_len=args.seq_len, heldout_fraction=args.heldout_fraction,
        text_field=args.text_field, predictor_only=args.predictor_only,
        loss=LossWeights(aux_ce=args.lambda_aux, consistency=args.lambda_consistency,
                         average_layers=args.consistency_reduce == "mean", z_loss=args.z_loss,
                         exact_prefix_fraction=args.exact_prefix_fraction),
        train=TrainConfig(steps=args.steps, learning_rate=args.learning_rate, warmup_steps=args.warmup_steps,
                          weight_decay=args.weight_decay, grad_clip=args.grad_clip, eval_every=args.eval_every,
                          save_every=args.save_every, seed=args.seed),
    )


def run(args: argparse.Namespace) -> int:
    from kvp_mlx.training.jsonsafe import dumps_json
    from kvp_mlx.training.kvp_run import run_kvp_training
    from kvp_mlx.commands.output_paths import check_output_dir

    check_output_dir(args.out, "--out")
    summary = run_kvp_training(config_from_args(args), force=args.force, resume=args.resume)
    history = summary.pop("history")
    if history:
        summary["final_loss"] = history[-1]["loss"]
    print(dumps_json(summary, indent=2, default=str))
    print(f"KV Prediction directory written to {args.out}")
    return 0
