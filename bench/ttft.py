"""The TTFT benchmark (`python -m bench.ttft`, `make bench`): wall-clock TTFT of every prefill method
beside plain mlx-lm, with FLOPs."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from datetime import datetime
from pathlib import Path

from bench.command import run_command
from kvp_mlx import KVPError

PROFILES: dict[str, dict] = {
    # quick: `make bench`, at most 15 minutes on a 2-core CPU
    "quick": dict(pairs=["kvp-c-270m"], prompt_lengths=[128, 512], batch_sizes=[1], repetitions=5, warmup=1),
    "full": dict(pairs=["kvp-c-270m", "kvp-c-450m", "kvp-lp-0.50", "kvp-lp-0.25"],
                 prompt_lengths=[128, 512, 1024, 2048], batch_sizes=[1, 8], repetitions=5, warmup=1),
    # conversation: a warm turn over a long history (bench.conversation; its own options)
    "conversation": dict(pairs=["kvp-c-270m"], history_tokens=1024, new_tokens=[32, 256], repetitions=3, warmup=1),
}
PROFILE_NOTES = {
    "quick": "sizes chosen to fit 15 minutes on a 2-core CPU (float32): the 1.1B base with the 270M "
    "auxiliary only, prompts of 128 and 512 tokens, batch 1",
    "full": "the paper's 1.1B pairs (KVP-C 270M/450M, KVP-LP 0.50/0.25), prompts 128-2048, batch 1 and 8: "
    "hours on a 2-core CPU",
    "conversation": "TTFT of a warm turn (new message of 32 or 256 tokens over a 1024-token history): base with "
    "prefix reuse, kvp on the warm cache, both re-prefilling everything, and the cost of a repair; about 10 minutes "
    "on a quiet 2-core CPU",
}


def make_settings(
    *, profile: str = "quick", pairs: list[str] | None = None, models: list[str] | None = None,
    methods: list[str] | None = None, prompt_lengths: list[int] | None = None,
    batch_sizes: list[int] | None = None, devices: list[str] | None = None, dtype: str | None = None,
    repetitions: int | None = None, warmup: int | None = None, prefill_step_size: int = 256, seed: int = 0,
    calibrate: bool = True,
) -> dict:
    """Checked benchmark settings; options left as None take the profile's values."""
    from bench.cases import all_method_names

    if profile == "conversation":
        raise KVPError("the conversation profile has its own settings (bench.conversation.make_settings)")
    prof = PROFILES[profile]
    methods = methods or all_method_names()
    unknown = [m for m in methods if m not in all_method_names()]
    if unknown:
        raise KVPError(f"unknown method(s) {', '.join(unknown)} (available: {', '.join(all_method_names())})")
    from bench.models import PAIRS

    unknown = [p for p in pairs or [] if p not in PAIRS]
    if unknown:
        raise KVPError(f"unknown model pair(s) {', '.join(unknown)} (known: {', '.join(PAIRS)})")
    devices = devices or ["cpu"]
    bad_devices = [d for d in devices if d not in ("cpu", "gpu")]
    if bad_devices:
        raise KVPError(f"unknown device(s) {', '.join(bad_devices)} (cpu or gpu)")
    settings: dict = {
        "profile": profile,
        "pairs": pairs if pairs is not None else ([] if models else prof["pairs"]),
        "models": list(models or []),
        "methods": methods,
        "prompt_lengths": prompt_lengths or prof["prompt_lengths"],
        "batch_sizes": batch_sizes or prof["batch_sizes"],
        "devices": devices,
        "dtype": dtype,
        "repetitions": repetitions if repetitions is not None else prof["repetitions"],
        "warmup": max(1, warmup if warmup is not None else prof["warmup"]),
        "prefill_step_size": prefill_step_size,
        "seed": seed,
        "calibrate": calibrate,
    }
    check_common_settings(settings)
    return settings


def check_common_settings(settings: dict) -> None:
    """The checks every profile's settings share (repetitions, step size, something to run)."""

    if settings["repetitions"] < 1:
        raise KVPError("--repetitions must be at least 1")
    if settings["prefill_step_size"] < 1:
        raise KVPError("--prefill-step-size must be at least 1")
    if not settings["pairs"] and not settings["models"]:
        raise KVPError("nothing to benchmark: give --pairs or --model")


def equivalent_command(settings: dict) -> str:
    """A command line that reruns exactly these settings."""
    words = ["python", "-m", "bench.ttft", "--profile", settings["profile"]]
    if settings["pairs"]:
        words += ["--pairs", ",".join(settings["pairs"])]
    for path in settings["models"]:
        words += ["--model", path]
    words += ["--methods", ",".join(settings["methods"]),
              "--prompt-lengths", ",".join(map(str, settings["prompt_lengths"])),
              "--batch-sizes", ",".join(map(str, settings["batch_sizes"])),
              "--device", ",".join(settings["devices"])]
    if settings["dtype"]:
        words += ["--dtype", settings["dtype"]]
    words += ["--repetitions", str(settings["repetitions"]), "--warmup", str(settings["warmup"]),
              "--prefill-step-size", str(settings["prefill_step_size"]), "--seed", str(settings["seed"])]
    return shlex.join(words)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _add_predictions(calibration, group, run: dict) -> None:
    """Each timed case's TTFT as the calibrated model predicts it (bench.ttft_model)."""
    from bench.ttft_model import predict_seconds, workload

    for c in run["cases"]:
        model = group.variants.get(c.get("aux")) if c.get("aux") else group.base_only
        try:
            work = workload(c["method"], model, run["prompt_tokens"], run["prefill_step_size"], run["batch"],
                            c.get("info") or {}, flops=c.get("flops"), scores=c.get("attention_scores"))
        except KVPError:
            continue
        c["predicted_s"] = predict_seconds(calibration, work)


def _run_device(device: str, settings: dict, runs: list[dict], calibrate: bool = True) -> list[dict]:
    """Measure ``settings`` on ``device``, appending each finished configuration to ``runs`` (an
    interrupted run keeps what finished)."""
    import mlx.core as mx

    from bench.models import build_pairs, load_group
    from bench.cases import benchmark_config
    from kvp_mlx.runtime_env import dtype_name, resolve_dtype, set_device

    set_device(device)
    dtype = resolve_dtype(settings["dtype"])
    tic = time.perf_counter()
    groups = build_pairs(settings["pairs"], dtype, settings["seed"]) if settings["pairs"] else []
    groups += [load_group(path, settings["dtype"]) for path in settings["models"]]
    _log(f"[{device}] models ready in {time.perf_counter() - tic:.1f} s: "
         + "; ".join(f"{g.name} with {', '.join(g.variants) or 'no auxiliary'}" for g in groups))
    for group in groups:
        calibration = None
        if calibrate:
            from bench.ttft_model import calibrate_for, calibration_line

            auxes = tuple(v.aux for v in group.variants.values() if getattr(v, "aux", None) is not None)
            calibration = calibrate_for(group.base, chunk=settings["prefill_step_size"], dtype=dtype, also=auxes)
            _log(f"[{device}] {group.name}: {calibration_line(calibration)}")
        for batch in settings["batch_sizes"]:
            for length in settings["prompt_lengths"]:
                _log(f"[{device}] {group.name}: {length} prompt tokens, batch {batch}")
                run = benchmark_config(
                    group, length, batch, settings["prefill_step_size"], settings["methods"],
                    settings["warmup"], settings["repetitions"], settings["seed"], _log,
                )
                if calibration is not None:
                    _add_predictions(calibration, group, run)
                    run["calibration"] = calibration.to_dict()
                runs.append({"device": device, "dtype": dtype_name(dtype), **run})
    del groups
    mx.clear_cache()
    return runs


def rerender(path: Path, no_plots: bool = False) -> int:
    """Redo the checks, markdown and plots of an earlier run's JSON (nothing is measured)."""
    import json

    from bench import report
    from bench.cases import checks

    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise KVPError(f"cannot read {path}: {e}") from None
    from bench import conversation

    if result.get("schema") == conversation.SCHEMA:
        return conversation.rerender(result, path.parent, path.stem, no_plots)
    if result.get("schema") != report.SCHEMA:
        raise KVPError(f"{path} is not a bench.ttft result (schema {result.get('schema')!r})")
    for run in result["runs"]:
        run["checks"] = checks(run["cases"])
    return write_outputs(result, path.parent, path.stem, no_plots)


def run_benchmark(settings: dict, out: Path | None = None, name: str | None = None, no_plots: bool = False) -> int:
    """Measure every configuration of ``settings`` and write OUT/NAME.{json,md,png}."""
    from bench import report
    from kvp_mlx.runtime_env import gpu_available

    prof = PROFILES[settings["profile"]]
    as_profile = not settings["models"] and all(settings[k] == v for k, v in prof.items())
    _log((f"profile {settings['profile']}: {PROFILE_NOTES[settings['profile']]}" if as_profile
          else f"custom run (unset options from profile {settings['profile']})") + "; running: pairs "
         f"{','.join(settings['pairs']) or '-'}, models {','.join(settings['models']) or '-'}, prompt lengths "
         f"{settings['prompt_lengths']}, batch sizes {settings['batch_sizes']}, {settings['warmup']} warm-up + "
         f"{settings['repetitions']} repetitions, prefill step size {settings['prefill_step_size']}")
    started, load_before, tic = datetime.now(), report.load_average(), time.perf_counter()
    out = Path(out) if out else report.default_out_dir()  # named after the start date
    if out.exists() and not out.is_dir():
        raise KVPError(f"--out {out} is a file, not a directory")
    runs: list[dict] = []
    skipped = []
    interrupted = False
    try:
        for device in settings["devices"]:
            if device == "gpu" and not gpu_available():
                msg = ("no GPU is available to MLX on this machine (Metal on a Mac, CUDA elsewhere): skipping "
                       "--device gpu")
                print(msg)
                skipped.append({"label": "device gpu", "reason": msg})
                continue
            _run_device(device, settings, runs, calibrate=settings.get("calibrate", True))
    except KeyboardInterrupt:
        if not runs:
            raise
        interrupted = True
        _log(f"interrupted: writing the {len(runs)} finished configuration(s)")
    if not runs:
        print("nothing was benchmarked")
        return 0
    name = name or settings["profile"]
    result = report.result_envelope(report.SCHEMA, name, started, tic, equivalent_command(settings), load_before,
                                    settings, runs)
    result["skipped"] = skipped
    if interrupted:
        result["interrupted"] = True
    out.mkdir(parents=True, exist_ok=True)
    code = write_outputs(result, out, name, no_plots or interrupted)
    return 130 if interrupted else code


def write_outputs(result: dict, out: Path, name: str, no_plots: bool) -> int:
    """OUT/NAME.json, OUT/NAME.md and (unless no_plots) the PNG plots; the table goes to stdout."""
    from bench import report

    files = [report.write_json(result, out / f"{name}.json"), report.write_markdown(result, out / f"{name}.md")]
    if result.get("interrupted"):
        md_path = out / f"{name}.md"
        md_path.write_text(f"**interrupted**: only the {len(result['runs'])} configuration(s) that finished (plots: "
                      f"python -m bench.ttft --from-json {out / name}.json)\n\n" + md_path.read_text())
    predicted = predicted_markdown(result)
    if predicted:
        with open(out / f"{name}.md", "a") as md:
            md.write("\n" + predicted + "\n")
    note = None
    if not no_plots:
        plots, note = report.write_plots(result, out, name)
        files += plots
    print(report.markdown(result))
    if predicted:
        print(predicted)
    for f in files:
        print(f"wrote {f}")
    if note:
        print(f"note: {note}")
    return 0


def predicted_markdown(result: dict) -> str:
    """Predicted beside measured TTFT, when the run was calibrated (bench/ttft_model.py)."""
    from bench.ttft_model import Calibration, calibration_line, comparison_markdown

    rows = [
        {"model": run["model"], "prompt_tokens": run["prompt_tokens"], "batch": run["batch"], "label": c["label"],
         "measured_s": c["median_s"], "predicted_s": c["predicted_s"], "error": c["predicted_s"] / c["median_s"] - 1}
        for run in result["runs"] for c in run["cases"] if c.get("predicted_s") and c.get("median_s")
    ]
    if not rows:
        return ""
    cals = {(run["model"], run["device"]): run["calibration"] for run in result["runs"] if run.get("calibration")}
    lines = ["## Predicted vs measured TTFT", "",
             "Predicted by the calibrated TTFT model (bench/ttft_model.py: matmul FLOPs, attention scores, SwiGLU "
             "elements, weight bytes read per forward call, layer calls), calibrated just before the runs:", ""]
    lines += [f"- {model}: {calibration_line(Calibration.from_dict(c))}" for (model, _), c in cals.items()]
    return "\n".join(lines + ["", comparison_markdown(rows)])


def predict_only(pairs: list[str] | None, prompt_lengths: list[int] | None, batch_sizes: list[int] | None,
                 prefill_step_size: int = 256, profile: str = "quick", dtype: str | None = None) -> int:
    """`python -m bench.ttft --predict`: calibrate, then predict base/kvp/aux TTFT of OpenELM pairs (no model runs)."""
    from bench.ttft_model import calibrate_for, pair_shapes, predict_markdown, predict_table
    from kvp_mlx.runtime_env import resolve_dtype

    prof = PROFILES[profile]
    pairs = pairs or prof["pairs"]
    lengths = prompt_lengths or prof["prompt_lengths"]
    mxdtype = resolve_dtype(dtype)
    for pair in pairs:
        shapes = pair_shapes(pair, mxdtype)
        cal = calibrate_for(shapes.base, chunk=prefill_step_size, dtype=mxdtype, also=(shapes.aux,))
        rows = []
        for batch in batch_sizes or [1]:
            rows += predict_table(cal, [pair], lengths, prefill_step_size, batch)
        print(predict_markdown(cal, rows))
        print()
    return 0


DESCRIPTION = """\
Time to first token (prompt token ids ready -> first token sampled and evaluated) of every
registered prefill method (base, kvp and aux per auxiliary model, and the others), of plain
mlx-lm's prefill of the same base model, and of KV Prediction's parts (auxiliary prefill of T-1
tokens, one base step). Cases run interleaved, after warm-up, with the same prefill step size.
By default the models are the paper's OpenELM pairs with random weights, built in memory; --model
adds a model directory (or repo id). Writes JSON (every sample, the environment), a markdown
table and PNG plots to --out.

--profile conversation times a warm turn instead: a new message of --new-tokens tokens over a
history of --history-tokens tokens already in a session (base with prefix reuse, kvp on the warm
cache), both re-prefilling everything (cold), and the cost of session.repair() after the kvp turn."""

def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers, got '{text}'") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got '{text}'")
    return values


def _names(text: str) -> list[str]:
    return [v for v in text.replace(",", " ").split() if v]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from bench.cases import method_listing
    from bench.models import PAIRS

    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick",
                        help="defaults for the options below: quick (make bench), full (make bench-full) or "
                        "conversation (warm turns over a long history)")
    parser.add_argument("--pairs", type=_names,
                        help=f"random-weight OpenELM pairs, comma-separated: {', '.join(PAIRS)} "
                        "(default: the profile's; none when --model is given)")
    parser.add_argument("--model", action="append", default=[],
                        help="a KV Prediction or mlx-lm model directory or repo id (repeatable)")
    parser.add_argument("--methods", type=_names,
                        help="methods to time, comma-separated (default: all registered ones and plain mlx-lm; "
                        f"method options take their defaults): {method_listing()}")
    parser.add_argument("--prompt-lengths", type=_ints, help="prompt lengths in tokens, e.g. 128,512")
    parser.add_argument("--batch-sizes", type=_ints, help="batch sizes, e.g. 1,8")
    parser.add_argument("--history-tokens", type=int,
                        help="conversation profile: tokens of history already in the session (default: 1024)")
    parser.add_argument("--new-tokens", type=_ints,
                        help="conversation profile: new message lengths in tokens, e.g. 32,256 (default: 32,256)")
    parser.add_argument("--device", type=_names, default=["cpu"], help="cpu, gpu or cpu,gpu (default: cpu)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                        help="compute dtype (default: float32 on cpu; on gpu float16 for the random-weight pairs, "
                             "the checkpoint's own dtype for --model)")
    parser.add_argument("--repetitions", "-n", type=int, help="timed repetitions per case (default: 5)")
    parser.add_argument("--warmup", type=int, help="untimed warm-up runs per case (default: 1; at least 1)")
    parser.add_argument("--prefill-step-size", type=int, default=256,
                        help="prompt tokens per prefill chunk, the same for every method (default: 256)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompts")
    parser.add_argument("--out", help="output folder (default: bench/results/<date>-<host>)")
    parser.add_argument("--name", help="file name stem of the outputs (default: the profile name)")
    parser.add_argument("--no-plots", action="store_true", help="write JSON and markdown only")
    parser.add_argument("--from-json", metavar="FILE",
                        help="measure nothing: redo the checks, markdown and plots of an earlier run's JSON")
    parser.add_argument("--no-calibrate", action="store_true",
                        help="skip the calibration of the TTFT model (and the predicted column) before the runs")
    parser.add_argument("--predict", action="store_true",
                        help="run no model: calibrate this machine (under a minute) and print the predicted TTFT "
                        "of base, kvp and aux for --pairs at --prompt-lengths (choose an auxiliary before training)")



def run(args: argparse.Namespace) -> int:
    if args.from_json:
        return rerender(Path(args.from_json), args.no_plots)
    if args.predict:
        return predict_only(args.pairs, args.prompt_lengths, args.batch_sizes, args.prefill_step_size,
                                 args.profile, args.dtype)
    out = Path(args.out) if args.out else None
    if args.profile == "conversation":
        from bench import conversation

        _refuse(args, "the conversation profile", ["methods", "prompt_lengths", "batch_sizes"])
        if args.device != ["cpu"]:
            raise KVPError("the conversation profile runs on the cpu only (--device cpu)")
        settings = conversation.make_settings(
            pairs=args.pairs, models=args.model, history_tokens=args.history_tokens, new_tokens=args.new_tokens,
            dtype=args.dtype, repetitions=args.repetitions, warmup=args.warmup,
            prefill_step_size=args.prefill_step_size, seed=args.seed,
        )
        return conversation.run_benchmark(settings, out, args.name, args.no_plots)
    _refuse(args, f"profile {args.profile} (only --profile conversation)", ["history_tokens", "new_tokens"])
    settings = make_settings(
        profile=args.profile, pairs=args.pairs, models=args.model, methods=args.methods,
        prompt_lengths=args.prompt_lengths, batch_sizes=args.batch_sizes, devices=args.device,
        dtype=args.dtype, repetitions=args.repetitions, warmup=args.warmup,
        prefill_step_size=args.prefill_step_size, seed=args.seed, calibrate=not args.no_calibrate,
    )
    return run_benchmark(settings, out, args.name, args.no_plots)


def _refuse(args: argparse.Namespace, what: str, names: list[str]) -> None:
    given = [n for n in names if getattr(args, n) is not None]
    if given:
        flags = ", ".join("--" + n.replace("_", "-") for n in given)
        raise KVPError(f"{flags}: not used by {what}")


def main(argv: list[str] | None = None) -> int:
    return run_command("python -m bench.ttft", DESCRIPTION, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
