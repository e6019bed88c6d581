"""`kvp-mlx generate --method runahead` as one rank of a launched group (mlx.launch, or
MLX_HOSTFILE + MLX_RANK): reading the prompt, loading under the watchdog, and the ranks that help
the prefill without decoding. Only the last rank decodes and prints."""

from __future__ import annotations

import os
import select
import sys
from typing import Any

import mlx.core as mx

from kvp_mlx.errors import KVPError
from kvp_mlx.prompting import decode_utf8, read_prompt_arg
from kvp_mlx.runahead.group import barrier, join_group, launched_as_ranks, share_text, watchdog

STDIN_QUIET_S = 1.0  # under a launch, the prompt on standard input ends after this long without data


def read_prompt(text: str, timeout_s: float) -> str:
    """``--prompt``, or standard input for ``-``.

    Under a distributed launch standard input cannot be read to its end: mlx.launch forwards its
    own input to every rank but never closes theirs. So rank 0 alone reads it, waiting at most
    ``timeout_s`` for the first data and ending the prompt once input has been quiet for
    ``STDIN_QUIET_S``, and shares it with the other ranks (MPI gives standard input to rank 0 only).
    """
    if text != "-" or not launched_as_ranks():
        return read_prompt_arg(text)
    group = join_group(timeout_s)
    prompt, error = None, None
    if group.rank() == 0:
        try:
            prompt = _read_launched_stdin(timeout_s)
        except KVPError as e:
            error = e
    # rank 0 may spend the whole timeout waiting for input, then the quiet period
    prompt = share_text(group, prompt, 2 * timeout_s + STDIN_QUIET_S + 10)
    if error is not None:
        raise error
    if prompt is None:
        raise KVPError("rank 0 received no prompt on standard input; pass the prompt as --prompt TEXT, "
                       'e.g. --prompt "$(cat FILE)"')
    return prompt


def _read_launched_stdin(timeout_s: float) -> str:
    nothing = (f"no prompt arrived on standard input within {timeout_s:g} s (--runahead-timeout); under "
               "mlx.launch standard input is the launcher's and never ends: pass the prompt as --prompt TEXT, "
               'e.g. --prompt "$(cat FILE)"')
    if sys.stdin is None:
        raise KVPError(nothing)
    fd, wait = sys.stdin.fileno(), timeout_s
    chunks: list[bytes] = []
    while True:
        if not select.select([fd], [], [], wait)[0]:
            if chunks:
                break  # quiet after some input: the launcher never closes it, take what came
            raise KVPError(nothing)
        data = os.read(fd, 1 << 16)
        if not data:
            break
        chunks.append(data)
        wait = STDIN_QUIET_S
    return decode_utf8(b"".join(chunks), "standard input")


def is_output_rank(timeout_s: float, compare: bool = False) -> bool:
    """Under a launch only the rank that decodes (the last) prints; alone, this process does."""
    from kvp_mlx.runahead.prefill import decoding_rank

    group = join_group(timeout_s)
    if compare and group.size() > 1:
        raise KVPError("--compare runs in one process; to compare runahead over several ranks with base "
                       "prefill use `python -m bench.runahead`")
    return group.rank() == decoding_rank(group)


def ranks_ready(timeout_s: float, verbose: bool = False) -> None:
    """Every rank has loaded the model before the timed prefill starts."""
    group = join_group(timeout_s)
    barrier(group, timeout_s)
    if verbose:
        print(f"runahead: rank {group.rank()} of {group.size()} starts the prefill", file=sys.stderr, flush=True)


def load_on_rank(path: str | None, dtype: str | None, timeout_s: float) -> Any:
    """Load the model under the watchdog: a rank never hangs in set-up (its peers wait in a barrier)."""
    from kvp_mlx.model import load

    rank = join_group(timeout_s).rank()
    with watchdog.guard(f"runahead rank {rank}: loading the model", timeout_s,
                        cause="loading is stuck or slow (raise --runahead-timeout for a slow disk)"):
        return load(path, dtype=dtype)


def help_prefill(model: Any, ids: mx.array, prefill_step_size: int, options: dict[str, Any],
                 verbose: bool = False) -> None:
    """A rank that does not decode: take part in the prefill (``options``: the method's), print nothing."""
    from kvp_mlx.methods import run_prefill
    from kvp_mlx.runahead.group import DEFAULT_TIMEOUT_S

    ranks_ready(options.get("timeout_s", DEFAULT_TIMEOUT_S), verbose)
    run_prefill(model, ids[None], method="runahead", prefill_step_size=prefill_step_size, **options)
