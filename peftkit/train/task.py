"""The embedded default task: turn an order written in prose into one fixed-format JSON line.

peftkit generates the data itself (seeded, no download) so that ``peftkit train`` with no
arguments has something real to learn. Each example is a chat: the user pastes a customer's
message, the assistant answers with exactly

    {"name": "Maria Lopez", "item": "lamp", "quantity": 3, "city": "Denver", "day": "Friday"}

The message is written in one of several styles, the quantity as digits or as an English word,
the item in the plural when more than one is ordered. So the answer needs the field names and
their order, the item in the singular and the quantity as an integer: an instruction-tuned base
model that has never seen this format gets almost none exactly right, while a LoRA learns it in a
few hundred examples. The metric is exact match of the parsed JSON object against the truth, so
spacing is forgiven but every field, type and value must be right.
"""
from __future__ import annotations

import json
import random
from typing import Optional

SYSTEM = "You convert customer orders into JSON."
INSTRUCTION = "Order as JSON (keys: name, item, quantity, city, day):\n"

FIRST = ["Maria", "James", "Aisha", "Kenji", "Olga", "Pedro", "Fatima", "Liam", "Chen", "Sofia",
         "Noah", "Priya", "Lucas", "Amara", "Ivan", "Elena", "Omar", "Hannah", "Mateo", "Yuki",
         "Grace", "Diego", "Zara", "Felix", "Nina", "Tomas", "Leila", "Oscar", "Mei", "Samuel"]
LAST = ["Lopez", "Smith", "Khan", "Tanaka", "Petrova", "Silva", "Haddad", "Murphy", "Wang", "Rossi",
        "Brown", "Patel", "Martin", "Okafor", "Novak", "Garcia", "Farouk", "Schmidt", "Torres", "Sato",
        "Kim", "Costa", "Ali", "Weber", "Jensen", "Moreau", "Nasser", "Berg", "Lin", "Cohen"]
ITEMS = [("lamp", "lamps"), ("chair", "chairs"), ("kettle", "kettles"), ("backpack", "backpacks"),
         ("mirror", "mirrors"), ("blanket", "blankets"), ("toaster", "toasters"), ("umbrella", "umbrellas"),
         ("notebook", "notebooks"), ("candle", "candles"), ("bookshelf", "bookshelves"), ("box", "boxes"),
         ("watch", "watches"), ("knife", "knives"), ("battery", "batteries"), ("bench", "benches")]
CITIES = ["Denver", "Lisbon", "Osaka", "Nairobi", "Toronto", "Munich", "Austin", "Dublin", "Seoul",
          "Lima", "Oslo", "Cairo", "Perth", "Porto", "Quebec", "Madrid", "Boston", "Vienna"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]

TEMPLATES = [
    "Hi, this is {name}. Please send {qty} {items} to {city} by {day}.",
    "{name} here - I need {qty} {items} delivered in {city} on {day}, thanks!",
    "Order from {name}: {qty} {items}, shipping to {city}, arriving {day}.",
    "Could you deliver {qty} {items} to my place in {city} this {day}? Regards, {name}",
    "Hello! {day} works best. {qty} {items} for {name} in {city}, please.",
    "Ship to {city}: {qty} {items}. Name on the order is {name}. Needed by {day}.",
]


def _example(rng: random.Random) -> tuple[str, dict]:
    name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    singular, plural = rng.choice(ITEMS)
    qty = rng.randint(1, 12)
    qty_text = WORDS[qty - 1] if rng.random() < 0.5 else str(qty)
    if qty == 1 and rng.random() < 0.5:
        qty_text = "a" if singular[0] not in "aeiou" else "an"
    city, day = rng.choice(CITIES), rng.choice(DAYS)
    text = rng.choice(TEMPLATES).format(name=name, qty=qty_text, items=plural if qty > 1 else singular,
                                        city=city, day=day)
    return text, {"name": name, "item": singular, "quantity": qty, "city": city, "day": day}


def answer_text(fields: dict) -> str:
    """The one accepted spelling of an answer (what the model is trained to write)."""
    return json.dumps(fields, ensure_ascii=False)


def generate(n_train: int = 800, n_eval: int = 100, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Deterministic train and held-out splits as chat records ``{"messages": [...], "target"}``.

    The held-out split never repeats a training message, so exact recall cannot pass for skill.
    """
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: list[list[dict]] = [[], []]
    for split, n in ((0, n_train), (1, n_eval)):
        while len(splits[split]) < n:
            text, fields = _example(rng)
            if text in seen:
                continue
            seen.add(text)
            splits[split].append({
                "messages": [{"role": "system", "content": SYSTEM},
                             {"role": "user", "content": INSTRUCTION + text},
                             {"role": "assistant", "content": answer_text(fields)}],
                "target": fields,
            })
    return splits[0], splits[1]


def parse_answer(text: str) -> Optional[dict]:
    """The first JSON object in a model's reply, or None when there is none."""
    start = text.find("{")
    if start < 0:
        return None
    try:
        obj, _ = json.JSONDecoder().raw_decode(text[start:])
    except json.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def score(replies: list[str], targets: list[dict]) -> float:
    """Exact-match accuracy: the parsed reply equals the target object (keys, types, values)."""
    if len(replies) != len(targets):
        raise ValueError(f"{len(replies)} replies for {len(targets)} targets")
    if not targets:
        return 0.0
    hits = sum(parse_answer(r) == t for r, t in zip(replies, targets))
    return hits / len(targets)
