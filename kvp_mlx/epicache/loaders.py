"""Conversation sets: LoCoMo (``locomo10.json``), LongMemEval (``longmemeval_s.json``), Realtalk
(``Chat_*.json``) and this project's ``synthetic`` format, read into :class:`Conversation`.

A malformed file is refused with one line naming the file and the field.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from kvp_mlx.epicache.episodes import Utterance, utterance_line
from kvp_mlx.errors import KVPError

FORMATS = ("locomo", "longmemeval", "realtalk", "synthetic")

# Each --format's schema in a line or two (``kvp-mlx conv-eval --help``); fields with ? are optional.
SCHEMAS = {
    "locomo": '[{"sample_id"?, "conversation": {"session_N": [{"speaker", "text", "blip_caption"?}], '
              '"session_N_date_time"?}, "qa": [{"question", "answer", "category"?}]}] (locomo10.json)',
    "longmemeval": '[{"question_id"?, "haystack_sessions": [[{"role", "content"}]], "haystack_dates"?, '
                   '"question", "answer", "question_date"?, "question_type"?}] (longmemeval_s.json)',
    "realtalk": '{"session_N": [{"speaker", "clean_text" or "text"}], "session_N_date_time"?, '
                '"qa": [{"question", "answer"}]} (one Chat_*.json; the sessions may sit under "conversation")',
    "synthetic": '[{"id"?, "sessions": [{"date"?, "turns": [{"speaker", "text"}]}], '
                 '"qa": [{"question", "answer", "category"?}]}] (this project\'s format)',
}


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    category: str | None = None


@dataclass
class Conversation:
    id: str
    utterances: list[Utterance]
    dates: list[str | None] = field(default_factory=list)  # per session
    questions: list[QA] = field(default_factory=list)

    def history_text(self) -> str:
        """The history as the model reads it: sessions in order, one utterance a line."""
        parts, session = [], None
        for u in self.utterances:
            if u.session != session:
                session = u.session
                date = self.dates[session] if session < len(self.dates) else None
                parts.append(f"Session {session + 1}" + (f" ({date})" if date else "") + ":\n")
            parts.append(utterance_line(u))
        return "".join(parts)


class _Reader:
    """Field access that fails with one line naming the file and the field's path."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, where: str, what: str) -> KVPError:
        return KVPError(f"{self.path}: field '{where}' {what}")

    def get(self, obj: Any, key: str, where: str, kind: type | tuple = str, optional: bool = False) -> Any:
        if not isinstance(obj, dict):
            raise self.fail(where.rsplit(".", 1)[0] or where, "is not an object")
        if key not in obj or obj[key] is None:
            if optional:
                return None
            raise self.fail(f"{where}", "is missing")
        value = obj[key]
        if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # answers that are numbers (years, counts)
        if not isinstance(value, kind):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise self.fail(where, f"should be {names}, got {type(value).__name__}")
        return value

    def load(self) -> Any:
        if self.path.is_dir():
            raise KVPError(f"{self.path} is a directory: give one conversation file (--data FILE)")
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise KVPError(f"{self.path}: no such file") from None
        except OSError as e:
            raise KVPError(f"{self.path}: cannot read it ({e.strerror or e})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise KVPError(f"{self.path}: not valid JSON ({e})") from None


def _numbered_sessions(r: _Reader, conv: dict, where: str) -> list[tuple[int, str]]:
    keys = [(int(m.group(1)), k) for k in conv if (m := re.fullmatch(r"session_(\d+)", k))]
    if not keys:
        raise r.fail(f"{where}.session_1", "is missing (no sessions)")
    return sorted(keys)


def _dialogue(r: _Reader, conv: dict, where: str, text_keys: tuple[str, ...]) -> tuple[list[Utterance], list]:
    utterances: list[Utterance] = []
    dates: list[str | None] = []
    for s, (_, key) in enumerate(_numbered_sessions(r, conv, where)):
        turns = r.get(conv, key, f"{where}.{key}", list)
        dates.append(r.get(conv, f"{key}_date_time", f"{where}.{key}_date_time", optional=True))
        for t, turn in enumerate(turns):
            w = f"{where}.{key}[{t}]"
            speaker = r.get(turn, "speaker", f"{w}.speaker")
            text = next((turn[k] for k in text_keys if isinstance(turn, dict) and isinstance(turn.get(k), str)), None)
            if text is None:
                raise r.fail(f"{w}.{text_keys[0]}", "is missing")
            caption = turn.get("blip_caption")
            if isinstance(caption, str) and caption:
                text = f"{text} [shares {caption}]"
            utterances.append(Utterance(speaker, text, s))
    return utterances, dates


def _qa_list(r: _Reader, items: list, where: str, skip_without_answer: bool) -> list[QA]:
    out = []
    for i, qa in enumerate(items):
        w = f"{where}[{i}]"
        question = r.get(qa, "question", f"{w}.question")
        if skip_without_answer and isinstance(qa, dict) and "answer" not in qa:
            continue  # LoCoMo's adversarial questions (category 5) carry 'adversarial_answer' only
        answer = r.get(qa, "answer", f"{w}.answer")
        category = qa.get("category")
        out.append(QA(question, answer, None if category is None else str(category)))
    return out


def load_locomo(path: Path) -> list[Conversation]:
    r = _Reader(path)
    data = r.load()
    if not isinstance(data, list):
        raise r.fail("(top level)", "should be a list of samples")
    out = []
    for i, sample in enumerate(data):
        w = f"[{i}]"
        conv = r.get(sample, "conversation", f"{w}.conversation", dict)
        utterances, dates = _dialogue(r, conv, f"{w}.conversation", ("text",))
        qa = _qa_list(r, r.get(sample, "qa", f"{w}.qa", list), f"{w}.qa", skip_without_answer=True)
        out.append(Conversation(str(sample.get("sample_id", i)), utterances, dates, qa))
    return out


def load_longmemeval(path: Path) -> list[Conversation]:
    r = _Reader(path)
    data = r.load()
    if not isinstance(data, list):
        raise r.fail("(top level)", "should be a list of questions")
    out = []
    for i, item in enumerate(data):
        w = f"[{i}]"
        sessions = r.get(item, "haystack_sessions", f"{w}.haystack_sessions", list)
        dates = r.get(item, "haystack_dates", f"{w}.haystack_dates", list, optional=True) or []
        utterances = []
        for s, session in enumerate(sessions):
            if not isinstance(session, list):
                raise r.fail(f"{w}.haystack_sessions[{s}]", "should be a list of turns")
            for t, turn in enumerate(session):
                tw = f"{w}.haystack_sessions[{s}][{t}]"
                role = r.get(turn, "role", f"{tw}.role")
                utterances.append(Utterance(role.capitalize(), r.get(turn, "content", f"{tw}.content"), s))
        question = r.get(item, "question", f"{w}.question")
        date = r.get(item, "question_date", f"{w}.question_date", optional=True)
        if date:
            question = f"(Current date: {date}) {question}"
        qa = QA(question, r.get(item, "answer", f"{w}.answer"), r.get(item, "question_type", f"{w}.question_type",
                                                                       optional=True))
        out.append(Conversation(str(item.get("question_id", i)), utterances, [str(d) for d in dates], [qa]))
    return out


def load_realtalk(path: Path) -> list[Conversation]:
    r = _Reader(path)
    data = r.load()
    if not isinstance(data, dict):
        raise r.fail("(top level)", "should be an object")
    conv = data.get("conversation", data) if isinstance(data.get("conversation"), dict) else data
    where = "conversation" if conv is not data else ""
    utterances, dates = _dialogue(r, conv, where, ("clean_text", "text"))
    qa = _qa_list(r, r.get(data, "qa", "qa", list), "qa", skip_without_answer=False)
    return [Conversation(path.stem, utterances, dates, qa)]


def load_synthetic(path: Path) -> list[Conversation]:
    """This project's format: ``[{"id", "sessions": [{"date"?, "turns": [{"speaker", "text"}]}],
    "qa": [{"question", "answer"}]}]``."""
    r = _Reader(path)
    data = r.load()
    if not isinstance(data, list):
        raise r.fail("(top level)", "should be a list of conversations")
    out = []
    for i, item in enumerate(data):
        w = f"[{i}]"
        utterances, dates = [], []
        for s, session in enumerate(r.get(item, "sessions", f"{w}.sessions", list)):
            sw = f"{w}.sessions[{s}]"
            dates.append(r.get(session, "date", f"{sw}.date", optional=True))
            for t, turn in enumerate(r.get(session, "turns", f"{sw}.turns", list)):
                tw = f"{sw}.turns[{t}]"
                speaker = r.get(turn, "speaker", f"{tw}.speaker")
                utterances.append(Utterance(speaker, r.get(turn, "text", f"{tw}.text"), s))
        qa = _qa_list(r, r.get(item, "qa", f"{w}.qa", list), f"{w}.qa", skip_without_answer=False)
        out.append(Conversation(str(item.get("id", i)), utterances, dates, qa))
    return out


LOADERS: dict[str, Callable[[Path], list[Conversation]]] = {
    "locomo": load_locomo, "longmemeval": load_longmemeval, "realtalk": load_realtalk, "synthetic": load_synthetic,
}


def load_conversations(path: str | Path, fmt: str) -> list[Conversation]:
    if fmt not in LOADERS:
        raise KVPError(f"unknown conversation format '{fmt}' (choose from {', '.join(FORMATS)})")
    convs = LOADERS[fmt](Path(path))
    for c in convs:
        if not c.utterances:
            raise KVPError(f"{path}: conversation '{c.id}' has no utterances")
    return convs
