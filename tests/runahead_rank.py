"""One rank of a runahead test run (started by test_runahead.py with MLX_HOSTFILE / MLX_RANK).

usage: runahead_rank.py OUT_DIR SPLIT STEP DECODE_TOKENS TIMEOUT MODEL_DIR... ; for each model and
each test prompt it prefills with `runahead` and writes the first-token logits (where the rank
has them: the last rank, or every rank for the prompts run with share_logits) and the greedy
continuation (the decoding rank) to OUT_DIR/rank{r}.npz. Then it runs `kvp-mlx generate --method
runahead --prompt CLI_PROMPT` on the first model (when the CLI_PROMPT variable is set), its standard
output going to OUT_DIR/rank{r}.cli.txt.
"""

import contextlib
import io
import os
import sys

import kvp_mlx  # noqa: F401  (optimized BLAS before mlx.core)
import mlx.core as mx
import numpy as np

from kvp_mlx.methods import run_prefill
from kvp_mlx.model import load

from decoding import decode_greedy

PROMPTS = [(1, 1, 0), (1, 2, 1), (1, 23, 2), (2, 37, 3)]  # (batch, length, seed)
if os.environ.get("RUNAHEAD_PROMPTS"):  # one prompt only: "batch,length,seed"
    PROMPTS = [tuple(int(x) for x in os.environ["RUNAHEAD_PROMPTS"].split(","))]  # type: ignore[misc]
SHARED = {1, 3}  # indices of the prompts run with share_logits=True


def main() -> None:
    out_dir, split, step, n_decode, timeout = sys.argv[1:6]
    arrays = {}
    rank = None
    for model_index, model_dir in enumerate(sys.argv[6:]):
        model = load(model_dir)
        vocab = model.base.args.vocab_size
        for index, (batch, length, seed) in enumerate(PROMPTS):
            tokens = mx.random.randint(0, vocab, (batch, length), key=mx.random.key(seed))
            result = run_prefill(model, tokens, method="runahead", split=split, prefill_step_size=int(step),
                                   timeout_s=float(timeout), share_logits=index in SHARED)
            rank = result.info["rank"]
            key = f"m{model_index}_b{batch}_t{length}"
            if result.logits is not None:
                arrays[f"{key}_logits"] = np.array(result.logits)
            arrays[f"{key}_bounds"] = np.array(result.info["bounds"])
            if result.info["decodes"]:
                arrays[f"{key}_tokens"] = np.array(decode_greedy(result, int(n_decode)))
    np.savez(f"{out_dir}/rank{rank}.npz", **arrays)
    if "CLI_PROMPT" in os.environ:
        from kvp_mlx.cli import main as cli

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = cli(["generate", "--model", sys.argv[6], "--method", "runahead", "--max-tokens", "6",
                        "--prompt", os.environ["CLI_PROMPT"]])
        with open(f"{out_dir}/rank{rank}.cli.txt", "w") as f:
            f.write(f"exit {code}\n{out.getvalue()}")


if __name__ == "__main__":
    main()
