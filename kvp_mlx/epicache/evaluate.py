"""Question answering over compressed conversation memories: greedy answers, token F1 (lower case,
no punctuation, no articles, as the paper's evaluation normalises), peak KV memory and time."""

from __future__ import annotations

import re
import string
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import mlx.core as mx
from mlx_lm.generate import generate_step

from kvp_mlx.epicache.episodes import Embedder, windows
from kvp_mlx.epicache.loaders import Conversation
from kvp_mlx.epicache.memory import ConversationMemory
from kvp_mlx.epicache.policies import get_policy
from kvp_mlx.model import KVPModel


def normalize_answer(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def f1_score(prediction: str, answer: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(answer).split()
    common = Counter(pred) & Counter(gold)
    same = sum(common.values())
    if not pred or not gold:
        return float(pred == gold)
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, answer: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(answer))


def prompt_parts(tokenizer: Any, history: str, question: str) -> tuple[list[int], list[int]]:
    """Token ids of the history (the same for every question) and of one question with the answer
    cue: a user turn holding both (chat template), or ``history`` then ``Question: ...`` raw."""
    cue = f"\nQuestion: {question}\nAnswer:"
    if getattr(tokenizer, "has_chat_template", False):
        marker = "\x00HISTORY-END\x00"
        text = tokenizer.apply_chat_template([{"role": "user", "content": history + marker + cue.lstrip("\n")}],
                                             tokenize=False, add_generation_prompt=True)
        head, tail = text.split(marker, 1)
        return (list(tokenizer.encode(head, add_special_tokens=False)),
                list(tokenizer.encode("\n" + tail, add_special_tokens=False)))
    return (list(tokenizer.encode(history, add_special_tokens=True)),
            list(tokenizer.encode(cue, add_special_tokens=False)))


def greedy_answer(model: KVPModel, cache: list, question_ids: Sequence[int], max_tokens: int = 50) -> str:
    """Greedy decoding with mlx-lm's loop from ``cache``; the text up to the first line break."""
    eos = set(getattr(model.tokenizer, "eos_token_ids", None) or [])
    out: list[int] = []
    for token, _ in generate_step(mx.array(list(question_ids), dtype=mx.int32), model.base, max_tokens=max_tokens,
                                  prompt_cache=cache):
        if int(token) in eos:
            break
        out.append(int(token))
    text = model.tokenizer.decode(out).strip()
    return text.split("\n", 1)[0].strip()


@dataclass
class QuestionResult:
    conversation: str
    question: str
    answer: str
    prediction: str
    f1: float
    em: float
    episode: int


@dataclass
class EvalReport:
    policy: str
    budget: int | None
    results: list[QuestionResult] = field(default_factory=list)
    build_seconds: float = 0.0
    answer_seconds: float = 0.0
    peak_kv_bytes: int = 0
    peak_memory_bytes: int = 0
    history_tokens: list[int] = field(default_factory=list)

    @property
    def mean_f1(self) -> float:
        return sum(r.f1 for r in self.results) / max(1, len(self.results))

    @property
    def mean_em(self) -> float:
        return sum(r.em for r in self.results) / max(1, len(self.results))


def evaluate(model: KVPModel, conversations: Sequence[Conversation], policy: str, budget: int | Sequence[int] | None,
             *, block: int = 2048, level: str = "pair", n_episodes: int = 4, n_medoids: int = 4, window: int = 4,
             embedder: Embedder | None = None, kvp_build: bool = False, max_tokens: int = 50,
             limit: int | None = None, on_result: Callable[[QuestionResult], None] | None = None) -> EvalReport:
    """Answer every question of every conversation from its compressed memory (questions are
    independent: each starts from a fresh copy of its episode's memory). ``policy``: a registered
    one (:func:`kvp_mlx.epicache.policies.available_policies`)."""
    get_policy(policy)
    report = EvalReport(policy, budget if isinstance(budget, int) or budget is None else max(budget))
    mx.reset_peak_memory()
    done = 0
    for conv in conversations:
        if limit is not None and done >= limit:
            break
        history = conv.history_text()
        history_ids, _ = prompt_parts(model.tokenizer, history, "")
        report.history_tokens.append(len(history_ids))
        memory = ConversationMemory(model, history_ids, policy, budget, block=block, level=level,
                                    windows=windows(conv.utterances, window), n_episodes=n_episodes,
                                    n_medoids=n_medoids, embedder=embedder, kvp_build=kvp_build)
        report.build_seconds += memory.stats.seconds
        report.peak_kv_bytes = max(report.peak_kv_bytes, memory.stats.peak_kv_bytes)
        tic = time.perf_counter()
        for qa in conv.questions:
            if limit is not None and done >= limit:
                break
            _, q_ids = prompt_parts(model.tokenizer, history, qa.question)
            episode = memory.route(qa.question)
            prediction = greedy_answer(model, memory.memories[episode].copy().cache, q_ids, max_tokens)
            result = QuestionResult(conv.id, qa.question, qa.answer, prediction, f1_score(prediction, qa.answer),
                                    exact_match(prediction, qa.answer), episode)
            report.results.append(result)
            done += 1
            if on_result is not None:
                on_result(result)
        report.answer_seconds += time.perf_counter() - tic
    report.peak_memory_bytes = int(mx.get_peak_memory())
    return report
