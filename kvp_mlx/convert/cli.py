"""``kvp-mlx convert``: a corenet checkpoint + training YAML -> a kvp-mlx (or mlx-lm) directory.

A KV Prediction checkpoint becomes ``kvp_config.json``, ``predictor.json``,
``predictor.safetensors`` and two mlx-lm OpenELM directories ``base/`` and ``aux/``; a single
``general_gpt`` checkpoint becomes one mlx-lm directory. Every key and shape is checked before any
tensor data is read; tensors are then read one at a time, so memory stays near one model's output.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import mlx.core as mx
from tqdm import tqdm

from kvp_mlx.errors import KVPError
from kvp_mlx.model import check_tokenizer_covers_vocab, write_kvp_config
from kvp_mlx.predictor import KVPredictor
from kvp_mlx.tokenizer_files import vocab_size, write_tokenizer_files

from .corenet_config import OpenELMConfig, read_training_yaml, resolve_config
from .state_dict import KVP_PREFIXES, model_tensors, openelm_weights, predictor_weights, split_kvp
from .torch_zip import LazyTensor, TorchArchive
from .writer import Quantization, atomic_output_dir, write_mlx_model

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
_PROGRESS_MIN_BYTES = 64 << 20  # show a progress bar for checkpoints above 64 MiB


def _default_dtype(tensors: dict[str, LazyTensor]) -> mx.Dtype:
    """The checkpoint's own float dtype (the one holding most bytes)."""
    by_bytes: Counter[str] = Counter()
    for t in tensors.values():
        if t.dtype in DTYPES:
            by_bytes[t.dtype] += t.nbytes
    return DTYPES[by_bytes.most_common(1)[0][0]] if by_bytes else mx.float32


def _materialize(tensors: dict[str, LazyTensor], dtype: mx.Dtype, bar: tqdm) -> dict[str, mx.array]:
    out = {}
    for name, t in tensors.items():
        out[name] = t.to_mlx(dtype)
        bar.update(t.nbytes)
    return out


def _write_model(
    directory: Path,
    cfg: OpenELMConfig,
    weights: dict[str, LazyTensor],
    dtype: mx.Dtype,
    bar: tqdm,
    tokenizer: Path | None,
    quantization: Quantization | None,
    label: str,
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    config = cfg.to_mlx_config()
    if tokenizer is not None:
        config.update(write_tokenizer_files(tokenizer, directory))
    write_mlx_model(directory, config, _materialize(weights, dtype, bar), quantization, label)


def convert_checkpoint(
    checkpoint: str | Path,
    config: str | Path,
    out: str | Path,
    *,
    tokenizer: str | Path | None = None,
    dtype: str | None = None,
    quantization: Quantization | None = None,
    force: bool = False,
    base_config: str | Path | None = None,
    aux_config: str | Path | None = None,
    model_config: str | Path | None = None,
) -> Path:
    """Convert a corenet checkpoint; returns the output directory. Raises `KVPError` on bad input."""
    checkpoint, out = Path(checkpoint), Path(out)
    train = read_training_yaml(config)
    kvp = train.kind == "kv_prediction"
    if kvp and model_config is not None:
        raise KVPError("--model-config is for single-model checkpoints; use --base-config / --aux-config")
    if not kvp and (base_config is not None or aux_config is not None):
        raise KVPError(f"{config} describes a single model; use --model-config, not --base-config / --aux-config")
    tokenizer = Path(tokenizer) if tokenizer is not None else None
    if tokenizer is not None and not tokenizer.is_file():
        raise KVPError(f"tokenizer not found: {tokenizer}")
    if dtype is not None and dtype not in DTYPES:
        raise KVPError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")

    with TorchArchive(checkpoint) as archive:
        tensors = model_tensors(archive.load(), str(checkpoint))
        target = DTYPES[dtype] if dtype else _default_dtype(tensors)
        # Resolve configs and check every key and shape before reading any tensor data.
        if kvp:
            parts = split_kvp(tensors)
            base = resolve_config(train.models["base"], "base", base_config, "--base-config")
            aux = resolve_config(train.models["aux"], "auxiliary", aux_config, "--aux-config")
            base, base_w = openelm_weights(parts["base"], base, "base model", KVP_PREFIXES["base"])
            aux, aux_w = openelm_weights(parts["aux"], aux, "auxiliary model", KVP_PREFIXES["aux"])
            pred_cfg, pred_w = predictor_weights(parts["predictor"], train.mapping or [], base, aux)
        else:
            single = resolve_config(train.models["model"], "single", model_config, "--model-config")
            single, single_w = openelm_weights(tensors, single, "model")

        if tokenizer is not None:
            vocabs = [c.vocab_size for c in ((base, aux) if kvp else (single,))]
            pieces = vocab_size(tokenizer)
            if pieces > min(vocabs):
                raise KVPError(
                    f"tokenizer {tokenizer} has {pieces} pieces, more than the model's vocabulary of {min(vocabs)}"
                )
            # the rule `kvp-mlx generate` applies when loading (padded embeddings are fine)
            check_tokenizer_covers_vocab(pieces, max(vocabs), f"tokenizer {tokenizer}")

        total = sum(t.nbytes for t in tensors.values())
        with atomic_output_dir(out, force) as tmp, tqdm(
            total=total, unit="B", unit_scale=True, desc="converting", file=sys.stderr,
            disable=total < _PROGRESS_MIN_BYTES,
        ) as bar:
            if kvp:
                _write_model(tmp / "base", base, base_w, target, bar, tokenizer, quantization, "base")
                _write_model(tmp / "aux", aux, aux_w, target, bar, tokenizer, quantization, "aux")
                predictor = KVPredictor(pred_cfg)  # stays unquantized
                predictor.load_weights(list(_materialize(pred_w, target, bar).items()))
                predictor.save(tmp)
                source = (
                    f"corenet checkpoint {checkpoint.name}: base {train.models['base'].model_name}, "
                    f"auxiliary {train.models['aux'].model_name}"
                )
                write_kvp_config(tmp, source)
            else:
                _write_model(tmp, single, single_w, target, bar, tokenizer, quantization, "model")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="corenet checkpoint (.pt, torch.save zip format)")
    parser.add_argument("--config", required=True, help="the corenet training YAML of that checkpoint")
    parser.add_argument("--out", required=True, help="output directory (must not exist unless --force)")
    parser.add_argument("--tokenizer", help="SentencePiece tokenizer.model to ship with the model(s)")
    parser.add_argument("--dtype", choices=list(DTYPES), help="weight dtype (default: the checkpoint's)")
    parser.add_argument("-q", "--quantize", action="store_true", help="quantize base and aux linear layers")
    parser.add_argument("--q-bits", type=int, choices=(4, 8), help="bits per weight with -q (default 4)")
    parser.add_argument("--q-group-size", type=int, choices=(32, 64, 128),
                        help="quantization group size with -q (default 64)")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")
    parser.add_argument("--base-config", help="OpenELM config.json for a base model not in corenet's tables")
    parser.add_argument("--aux-config", help="OpenELM config.json for an auxiliary model not in corenet's tables")
    parser.add_argument("--model-config", help="OpenELM config.json for a single-model checkpoint")


def check_inputs(args: argparse.Namespace) -> None:
    """Input files that are directories, and an --out that is a file, as one line before any work."""
    from kvp_mlx.commands.output_paths import check_output_dir

    for flag in ("checkpoint", "config", "tokenizer", "base_config", "aux_config", "model_config"):
        path = getattr(args, flag)
        if path is not None and Path(path).is_dir():
            raise KVPError(f"--{flag.replace('_', '-')} {path} is a directory, not a file")
    check_output_dir(args.out, "--out")


def run(args: argparse.Namespace) -> int:
    """Run a parsed ``convert`` command; prints ``error: ...`` and returns 1 on bad input."""
    quantization = None
    if args.quantize:
        quantization = Quantization(args.q_bits or 4, args.q_group_size or 64)
    elif args.q_bits is not None or args.q_group_size is not None:
        print("error: --q-bits and --q-group-size need -q / --quantize", file=sys.stderr)
        return 1
    try:
        check_inputs(args)
        out = convert_checkpoint(
            args.checkpoint,
            args.config,
            args.out,
            tokenizer=args.tokenizer,
            dtype=args.dtype,
            quantization=quantization,
            force=args.force,
            base_config=args.base_config,
            aux_config=args.aux_config,
            model_config=args.model_config,
        )
    except (KVPError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.tokenizer is None:
        where = f"{out}/base and {out}/aux" if (Path(out) / "kvp_config.json").is_file() else str(out)
        print(
            f"note: no --tokenizer given, so {where} has no tokenizer and cannot be loaded yet: copy the model's "
            "tokenizer.json and tokenizer_config.json there, or convert again with --tokenizer tokenizer.model",
            file=sys.stderr,
        )
    print(f"wrote {out}", file=sys.stderr)
    return 0


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvp-mlx convert")
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(setup_arg_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
