"""Generate data/demo/instructions.jsonl: 300 short alpaca-style records for the offline demo.

    python data/demo/make_demo_data.py        # rewrites instructions.jsonl; same seed, same file

One task with a house format: pull the writer's name and city out of a short free-text message
and write them as one JSON line with fixed keys in a fixed order, {"name": "Maria Lopez", "city":
"Lisbon"}. The answer is made of spans copied from the message, so a few hundred examples teach
it; a chat model that has not seen the format answers in its own words, so exact match separates
base from tuned. 16 phrasings, the city sometimes before the name, names and cities drawn from
lists, no two messages alike. Rows stay short (under 100 tokens with a chat template, also for the
built-in tiny model's tokenizer). Written for this project; the names and cities are common ones.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 1234
OUT = Path(__file__).with_name("instructions.jsonl")

INSTRUCTIONS = ["Record the contact.", "Extract the contact.", "Get the contact.", "Log this contact."]
# Each message names one person and one city, so every field has a single right answer.
MESSAGES = [
    "Hi, I'm {name} from {city}.",
    "This is {name}, I live in {city}.",
    "{name} here, writing from {city}.",
    "New customer: {name}, {city}.",
    "Greetings from {city}! {name} here.",
    "Order question from {name} in {city}.",
    "Thanks, {name} ({city})",
    "I'm {name}, I moved to {city}.",
    "Booking for {name} of {city}.",
    "{name}, from our {city} office.",
    "Sent by {name}, {city}.",
    "We met in {city}. I'm {name}.",
    "Please call {name} back in {city}.",
    "Regards from {city}, {name}",
    "Hello from {name}, based in {city}.",
    "{name} in {city} needs help.",
]
FIRST = [
    "Maria", "James", "Aisha", "Chen", "Olga", "Pedro", "Fatima", "Lucas", "Yuki", "Amara", "Noah", "Ingrid",
    "Ravi", "Sofia", "Tomas", "Leila", "Daniel", "Mei", "Omar", "Hannah", "Kwame", "Elena", "Marco", "Priya",
    "Jonas", "Zara", "Luis", "Nadia", "Victor", "Grace", "Ahmed", "Clara", "Felix", "Irene", "Sam", "Ana",
    "Kofi", "Lena", "Hugo", "Rosa",
]
LAST = [
    "Lopez", "Smith", "Khan", "Wang", "Ivanova", "Silva", "Haddad", "Martin", "Tanaka", "Okafor", "Brown",
    "Larsen", "Patel", "Rossi", "Novak", "Farah", "Cohen", "Lin", "Nasser", "Weber", "Mensah", "Petrova",
    "Bianchi", "Sharma", "Berg", "Ali", "Garcia", "Karimi", "Dubois", "Taylor", "Hassan", "Vogel", "Meyer",
    "Costa", "Reyes", "Moreau", "Owusu", "Fischer", "Santos", "Kim",
]
CITIES = [
    "Lisbon", "Boston", "Lagos", "Shanghai", "Kyiv", "Porto", "Beirut", "Lyon", "Osaka", "Accra", "Denver",
    "Oslo", "Pune", "Milan", "Prague", "Cairo", "Haifa", "Taipei", "Amman", "Munich", "Kumasi", "Sofia",
    "Turin", "Delhi", "Bergen", "Dubai", "Madrid", "Tehran", "Paris", "Leeds", "Nairobi", "Zurich", "Hamburg",
    "Recife", "Manila", "Nantes", "Seoul", "Vienna", "Cape Town", "New York", "San Diego", "Mexico City",
]


def contact(rng: random.Random, i: int) -> dict:
    name, city = f"{rng.choice(FIRST)} {rng.choice(LAST)}", rng.choice(CITIES)
    message = MESSAGES[i % len(MESSAGES)].format(name=name, city=city)
    answer = json.dumps({"name": name, "city": city})
    return {"instruction": rng.choice(INSTRUCTIONS), "input": message, "output": answer}


def make_records(n: int = 300, seed: int = SEED) -> list[dict]:
    """n records with distinct messages (phrasings in turn), reproducible from the seed."""
    rng = random.Random(seed)
    records, seen = [], set()
    while len(records) < n:
        record = contact(rng, len(records))
        if record["input"] not in seen:
            seen.add(record["input"])
            records.append(record)
    return records


def main() -> None:
    lines = [json.dumps(r, ensure_ascii=False) for r in make_records()]
    OUT.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(lines)} records to {OUT}")


if __name__ == "__main__":
    main()
