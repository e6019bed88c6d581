"""Which base layers' predicted K/V cost a conversation's answers.

Each history is prefilled twice, by the base (its exact K/V) and by the auxiliary with the
predictor (KV Prediction's K/V); the base then answers every question from a cache that holds the
predicted K/V on a chosen set of layers and the exact K/V on the others. Sets: none (full KV), each
layer alone, every layer but one, all (KV Prediction's full KV). Exact match and F1 per set, with
the answers decoded as ``kvp-mlx conv-eval`` decodes them.

    python -m bench.kvp_layers --model models/convworld/kvp \\
        --data models/convworld/data/test.json --format synthetic --max-tokens 8
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import kvp_mlx  # noqa: F401  (optimized BLAS before mlx.core)

import mlx.core as mx

from kvp_mlx.adapters import inject_raw_kv, prefill_capturing_raw_kv
from kvp_mlx.epicache.evaluate import exact_match, f1_score, greedy_answer, prompt_parts
from kvp_mlx.epicache.loaders import FORMATS, Conversation, load_conversations
from kvp_mlx.errors import KVPError
from kvp_mlx.model import KVPModel, load


@dataclass
class LayerSetScore:
    predicted: tuple[int, ...]  # the base layers whose K/V come from KV Prediction
    em: float
    f1: float
    questions: int
    answers: list[str]


def layer_sets(n_layers: int) -> list[tuple[int, ...]]:
    """None, each layer alone, every layer but one, all (no repeats)."""
    every = tuple(range(n_layers))
    sets = [(), *((i,) for i in every), *(tuple(j for j in every if j != i) for i in every), every]
    return list(dict.fromkeys(sets))


def score_layer_sets(model: KVPModel, conversations: Sequence[Conversation], sets: Sequence[tuple[int, ...]],
                     max_tokens: int = 50) -> list[LayerSetScore]:
    if model.aux is None or model.predictor is None:
        raise KVPError("this needs a KV Prediction model (auxiliary + predictor)")
    n_layers = len(model.base.layers)
    if any(i < 0 or i >= n_layers for s in sets for i in s):
        raise KVPError(f"layer sets must name base layers 0..{n_layers - 1}")
    prepared = []
    for conv in conversations:
        history = conv.history_text()
        ids = mx.array([prompt_parts(model.tokenizer, history, "")[0]], dtype=mx.int32)
        _, keys, values, _ = prefill_capturing_raw_kv(model.base, ids)
        _, aux_keys, aux_values, _ = prefill_capturing_raw_kv(model.aux, ids)
        predicted = model.predictor(aux_keys, aux_values)
        questions = [(prompt_parts(model.tokenizer, history, qa.question)[1], qa.answer) for qa in conv.questions]
        prepared.append((questions, list(zip(keys, values)), predicted))
    scores = []
    for chosen in sets:
        em = f1 = 0.0
        answers: list[str] = []
        for questions, exact, predicted in prepared:
            raw = [predicted[i] if i in chosen else exact[i] for i in range(n_layers)]
            for question_ids, gold in questions:
                answer = greedy_answer(model, inject_raw_kv(model.base, raw, dtype=model.dtype), question_ids,
                                       max_tokens)
                em += exact_match(answer, gold)
                f1 += f1_score(answer, gold)
                answers.append(answer)
        n = max(len(answers), 1)
        scores.append(LayerSetScore(tuple(chosen), em / n, f1 / n, len(answers), answers))
    return scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a KV Prediction directory")
    parser.add_argument("--data", required=True, help="the conversation file")
    parser.add_argument("--format", required=True, choices=FORMATS, help="its schema")
    parser.add_argument("--conversations", type=int, default=None, help="use the first N (default: all)")
    parser.add_argument("--max-tokens", type=int, default=50, help="answer length (default 50)")
    parser.add_argument("--json", help="write the scores here as JSON")
    args = parser.parse_args(argv)
    if args.conversations is not None and args.conversations < 1:
        parser.error("--conversations must be at least 1")
    if args.max_tokens < 1:
        parser.error("--max-tokens must be at least 1")
    try:
        model = load(args.model)
        conversations = load_conversations(args.data, args.format)[: args.conversations]
        scores = score_layer_sets(model, conversations, layer_sets(len(model.base.layers)), args.max_tokens)
    except KVPError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{scores[0].questions} questions over {len(conversations)} conversations\n")
    print("| base layers with predicted K/V | EM | F1 |\n|---|---|---|")
    for s in scores:
        print(f"| {', '.join(map(str, s.predicted)) or 'none (full KV)'} | {s.em:.3f} | {s.f1:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps([s.__dict__ for s in scores], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
