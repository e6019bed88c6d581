"""Synthetic multi-session conversations from templates, in the ``synthetic`` format that
``kvp-mlx conv-eval --format synthetic`` reads: facts about people and events spread over topics, and
questions whose answers sit in one session. Also the default text of ``kvp-mlx epicache-profile``."""

from __future__ import annotations

import random
from typing import Any

NAMES = ["Alice", "Bruno", "Chen", "Dana", "Emeka", "Farah", "Goran", "Hana", "Ivan", "Jade"]
TOPICS: dict[str, list[tuple[str, str, list[str]]]] = {
    # topic: (statement template, question template, answers)
    "travel": [("I just booked a trip to {x} for next month.", "Where is {p} travelling next month?",
                ["Lisbon", "Kyoto", "Nairobi", "Oslo", "Lima", "Hanoi"])],
    "work": [("I started a new job as a {x} this week.", "What new job did {p} start?",
              ["nurse", "pilot", "baker", "teacher", "chemist", "lawyer"])],
    "family": [("My sister {x} is getting married in June.", "What is the name of {p}'s sister?",
                ["Maria", "Sofia", "Lena", "Priya", "Aiko", "Nora"])],
    "hobbies": [("Lately I spend my weekends playing the {x}.", "Which instrument does {p} play on weekends?",
                 ["violin", "cello", "drums", "flute", "piano", "guitar"])],
    "pets": [("We adopted a puppy and named it {x}.", "What did {p} name the puppy?",
              ["Biscuit", "Pepper", "Mochi", "Rocket", "Olive", "Ziggy"])],
}
FILLER = ["That sounds great!", "Really? Tell me more.", "I had no idea.", "How are you feeling about it?",
          "Nice, good for you.", "Let me know how it goes."]


def conversation(seed: int, sessions: int = 5, filler: int = 3) -> dict[str, Any]:
    """One conversation in the synthetic format: two speakers, one topic per session."""
    rng = random.Random(seed)
    a, b = rng.sample(NAMES, 2)
    topics = rng.sample(sorted(TOPICS), min(sessions, len(TOPICS)))
    out_sessions: list[dict[str, Any]] = []
    qa: list[dict[str, Any]] = []
    for s, topic in enumerate(topics):
        statement, question, answers = TOPICS[topic][0]
        speaker = rng.choice([a, b])
        other = b if speaker == a else a
        x = rng.choice(answers)
        turns = [{"speaker": other, "text": f"Hi {speaker}, what is new with you?"},
                 {"speaker": speaker, "text": statement.format(x=x)}]
        for _ in range(filler):
            turns.append({"speaker": other, "text": rng.choice(FILLER)})
            turns.append({"speaker": speaker, "text": rng.choice(FILLER)})
        out_sessions.append({"date": f"day {s + 1}", "turns": turns})
        qa.append({"question": question.format(p=speaker), "answer": x, "category": topic})
    return {"id": f"synthetic-{seed}", "sessions": out_sessions, "qa": qa}


def conversations(n: int, seed: int = 0, sessions: int = 5, filler: int = 3) -> list[dict[str, Any]]:
    return [conversation(seed * 1000 + i, sessions, filler) for i in range(n)]


def profile_text(chars: int, seed: int = 0) -> str:
    """At least ``chars`` characters of synthetic conversation text."""
    parts: list[str] = []
    i = 0
    while sum(len(p) for p in parts) < chars:
        for s in conversation(seed + i)["sessions"]:
            parts.extend(f'{t["speaker"]} said, "{t["text"]}"\n' for t in s["turns"])
        i += 1
    return "".join(parts)
