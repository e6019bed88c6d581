"""The conversation world's generator: multi-session conversations in the ``synthetic`` format with
facts of five kinds (names, places, dates, possessions, plans), one cue word per fact, and cloze
questions whose answers sit in one place of the history (``python -m bench.convworld``)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Sequence

from kvp_mlx.epicache.synthetic import NAMES


CITIES = ["Lisbon", "Kyoto", "Nairobi", "Oslo", "Lima", "Hanoi", "Dublin", "Cairo", "Quito", "Vienna", "Seoul",
          "Perth", "Tunis", "Bergen", "Porto", "Riga"]
PEOPLE = ["Maria", "Sofia", "Lena", "Priya", "Aiko", "Nora", "Omar", "Felix", "Hugo", "Ines", "Jonas", "Kira",
          "Luca", "Mila", "Nils", "Rosa"]
PET_NAMES = ["Biscuit", "Pepper", "Mochi", "Rocket", "Olive", "Ziggy", "Bean", "Pickle", "Noodle", "Maple",
             "Pixel", "Waffle"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
SKILLS = ["Spanish", "Italian", "pottery", "welding", "chess", "sailing", "Arabic", "knitting", "juggling", "Greek",
          "salsa", "archery"]
DISHES = ["paella", "lasagna", "curry", "ramen", "tacos", "risotto", "goulash", "sushi", "dumplings", "falafel",
          "pancakes", "chili"]
FURNITURE = ["sofa", "piano", "rug", "lamp", "bookshelf", "armchair", "aquarium", "television", "clock", "mirror",
             "desk", "heater"]
GEAR = ["kayak", "bicycle", "racket", "helmet", "skateboard", "surfboard", "treadmill", "tent", "compass", "camera",
        "drone", "telescope"]
SUBJECTS = ["biology", "history", "physics", "drawing", "economics", "poetry", "geology", "astronomy", "law",
            "music", "statistics", "robotics"]
DATES = "dates"  # a pool drawn as "<early|mid|late> <Month>"
DATE_PARTS = ["early", "mid", "late"]


@dataclass(frozen=True)
class FactTemplate:
    kind: str  # name, place, date, possession, plan
    statement: str  # with {x}; the word before {x} (its cue) occurs nowhere else in the world's text
    question: str  # with {p} (the speaker)
    pool: list[str] | str  # answers, or DATES


@dataclass(frozen=True)
class Topic:
    facts: list[FactTemplate]
    filler: list[str]  # topic talk that states no fact


WORLD_TOPICS: dict[str, Topic] = {
    "travel": Topic([
        FactTemplate("place", "This spring I am touring {x} with friends.", "Where is {p} travelling in the spring?",
                     CITIES),
        FactTemplate("date", "My flight departs {x} at noon.", "When does {p}'s flight leave?", DATES),
    ], ["I love the window seat on long flights.", "The hotel has a pool on the roof.",
        "I still need to buy a good suitcase.", "The museums there are supposed to be great.",
        "Trains are my favourite way to travel.", "Did you get travel insurance last time?"]),
    "work": Topic([
        FactTemplate("name", "My new boss {x} seems nice.", "What is the name of {p}'s new boss?", PEOPLE),
        FactTemplate("place", "Our office is relocating toward {x} soon.", "Where is {p}'s office moving?", CITIES),
        FactTemplate("date", "My big presentation happens {x} this year.", "When is {p}'s big presentation?", DATES),
    ], ["The meetings this week were endless.", "I finally finished that report.",
        "My team is small but very friendly.", "Work has been busy since the summer.",
        "I might ask for a raise soon.", "The new project starts next month."]),
    "family": Topic([
        FactTemplate("name", "My sister {x} is getting married.", "What is the name of {p}'s sister?", PEOPLE),
        FactTemplate("place", "My parents now live near {x} these days.", "Where do {p}'s parents live?", CITIES),
        FactTemplate("date", "My grandmother turns ninety {x} this year.", "When does {p}'s grandmother turn ninety?",
                     DATES),
    ], ["My cousins visit us every winter.", "We had a big family dinner on Sunday.",
        "My brother still calls me every week.", "Family holidays are always a bit chaotic.",
        "My aunt tells the best stories.", "We are planning a reunion."]),
    "hobbies": Topic([
        FactTemplate("plan", "Next year I plan to learn {x} properly.", "What does {p} plan to learn next year?",
                     SKILLS),
        FactTemplate("name", "My chess partner {x} always wins.", "What is the name of {p}'s chess partner?",
                     PEOPLE),
    ], ["I spend most evenings reading novels.", "Painting helps me relax after work.",
        "I joined a club that meets on Thursdays.", "My garden takes up most of my weekends.",
        "I have been baking bread a lot recently.", "Hobbies are the best part of the week."]),
    "pets": Topic([
        FactTemplate("name", "We adopted a puppy named {x} last week.", "What did {p} name the puppy?", PET_NAMES),
        FactTemplate("name", "Our cat {x} is very lazy.", "What is the name of {p}'s cat?", PET_NAMES),
    ], ["The vet says the dog is very healthy.", "Walking the dog twice a day is tiring.",
        "Pets make a home feel warm.", "The kitten sleeps on my keyboard all day.",
        "We need a bigger garden for the dog.", "Dog food is getting expensive."]),
    "food": Topic([
        FactTemplate("plan", "For the party I want to cook {x} for everyone.",
                     "What does {p} want to cook for the party?",
                     DISHES),
        FactTemplate("place", "The best meal I ever had was in a city called {x} years ago.",
                     "Where did {p} have the best meal ever?", CITIES),
    ], ["I have been trying new recipes every week.", "Fresh herbs make everything taste better.",
        "The local market has great vegetables.", "I burned the rice again yesterday.",
        "Spicy food is my weakness.", "We should have dinner together soon."]),
    "home": Topic([
        FactTemplate("possession", "We finally bought a lovely {x} for the living room.",
                     "What did {p} buy for the living room?", FURNITURE),
        FactTemplate("date", "We move into the new flat {x} at last.", "When does {p} move into the new flat?", DATES),
    ], ["The neighbours are quite noisy.", "I painted the bedroom a light blue.",
        "The kitchen needs a lot of work.", "Our landlord fixed the heating at last.",
        "I love the big windows in the hall.", "Cleaning the house takes forever."]),
    "health": Topic([
        FactTemplate("name", "My doctor {x} is very kind.", "What is the name of {p}'s doctor?", PEOPLE),
        FactTemplate("plan", "To stay fit I will attend {x} classes.", "What classes will {p} take to stay fit?",
                     SKILLS),
    ], ["I have been sleeping much better.", "I drink more water these days.",
        "My back hurts after long days at the desk.", "Walking to work helps a lot.",
        "I gave up sugar for a month.", "Stretching in the morning feels great."]),
    "school": Topic([
        FactTemplate("plan", "My new course covers {x} in depth.", "What does {p}'s new course cover?", SUBJECTS),
        FactTemplate("date", "I sit my final exam {x} in the hall.", "When is {p}'s final exam?", DATES),
    ], ["The library stays open longer now.", "My classmates are very helpful.",
        "The lectures begin at eight in the morning.", "I study best in the afternoon.",
        "Homework takes up my evenings.", "Our teacher gives great feedback."]),
    "sports": Topic([
        FactTemplate("possession", "I just bought a shiny {x} for training.", "What did {p} buy for training?",
                     GEAR),
        FactTemplate("place", "The tournament will be hosted by {x} this summer.",
                     "Where will {p}'s tournament be held?",
                     CITIES),
    ], ["Our team lost the last match.", "I train three times a week.", "The coach is strict but fair.",
        "My legs were sore for days.", "Watching the final was so exciting.", "I need new running shoes."]),
}
OPENERS = ["Hi {o}, how was your week?", "Hey {o}, what is new with you?", "Good to see you, {o}!",
           "Hello {o}, how are things?"]
REPLIES = ["Pretty good, thanks for asking.", "Busy as always, but fine.", "Great, I have news to share.",
           "Not bad at all."]
GENERIC = ["That sounds great!", "Really? Tell me more.", "I had no idea.", "Nice, good for you.",
           "Let me know how it goes.", "Wow, that is exciting.", "Oh, interesting.", "I am happy for you."]
CLOSERS = ["Talk to you soon!", "See you next week.", "Take care!", "Bye for now."]


def _value(rng: random.Random, pool: list[str] | str) -> str:
    if pool == DATES:
        return f"{rng.choice(DATE_PARTS)} {rng.choice(MONTHS)}"
    return rng.choice(list(pool))


def cloze_question(statement: str, speaker: str) -> str:
    """The fill-in form of a fact's question, ending with the statement's words up to the value
    (``Finish what Chen said: My new boss``)."""
    return f"Finish what {speaker} said: {statement.split('{x}', 1)[0].strip()}"


def world_conversation(seed: int, sessions: int = 6, facts_per_session: int = 2, filler: int = 5,
                       topics: Sequence[str] | None = None, cloze: bool = False) -> dict[str, Any]:
    """One conversation of the world in the ``synthetic`` format: two speakers, ``sessions`` sessions
    each on its own topic, ``facts_per_session`` facts stated once among ``filler`` topic or generic
    lines; one question per fact (a one- or two-word answer), with its ``category`` (the fact's kind)
    and ``session``. With ``cloze`` each question quotes its statement up to the value instead.

    A fact is found by the word before its value (its cue), which occurs nowhere else in the world's
    text, and no two facts of a conversation share a word of their values (two dates differ in both
    words), so the history holds one place that answers each question, token for token. The
    questions come in random order."""
    rng = random.Random(seed)
    a, b = rng.sample(NAMES, 2)
    names = sorted(WORLD_TOPICS) if topics is None else list(topics)
    used: set[str] = set()  # the words of the values stated so far
    out_sessions: list[dict[str, Any]] = []
    qa: list[dict[str, Any]] = []
    for s, topic in enumerate(rng.sample(names, min(sessions, len(names)))):
        t = WORLD_TOPICS[topic]
        opener = rng.choice([a, b])
        other = b if opener == a else a
        lines: list[tuple[str, str]] = []
        for fact in rng.sample(t.facts, min(facts_per_session, len(t.facts))):
            speaker = rng.choice([a, b])
            for _ in range(100):  # a value whose words are all new (dates run out after three)
                x = _value(rng, fact.pool)
                if used.isdisjoint(x.split()):
                    break
            used.update(x.split())
            lines.append((speaker, fact.statement.format(x=x)))
            question = cloze_question(fact.statement, speaker) if cloze else fact.question.format(p=speaker)
            qa.append({"question": question, "answer": x, "category": fact.kind, "session": s})
        talk = rng.sample(t.filler, min(filler, len(t.filler)))
        for line in talk:
            lines.insert(rng.randint(0, len(lines)), (rng.choice([a, b]), line))
        turns = [{"speaker": opener, "text": rng.choice(OPENERS).format(o=other)},
                 {"speaker": other, "text": rng.choice(REPLIES)}]
        for speaker, text in lines:
            turns.append({"speaker": speaker, "text": text})
            if rng.random() < 0.35:
                turns.append({"speaker": b if speaker == a else a, "text": rng.choice(GENERIC)})
        turns.append({"speaker": rng.choice([a, b]), "text": rng.choice(CLOSERS)})
        out_sessions.append({"date": f"day {1 + s * 7 + rng.randint(0, 6)}", "turns": turns})
    rng.shuffle(qa)  # a model trained on all of them in a row cannot answer by their order
    return {"id": f"world-{seed}", "sessions": out_sessions, "qa": qa}


def world_conversations(n: int, seed: int = 0, **kwargs: Any) -> list[dict[str, Any]]:
    """``n`` world conversations; ``seed`` picks a disjoint range of per-conversation seeds."""
    return [world_conversation(seed * 1_000_003 + i, **kwargs) for i in range(n)]
