"""Generate data/demo/instructions.jsonl: ~300 short alpaca-style records for the offline demo.

    python data/demo/make_demo_data.py        # rewrites instructions.jsonl; same seed, same file

Simple tasks a tiny model can start to pick up: arithmetic facts, capitals, antonyms, plurals and
small rewrites. Written for this project; the word lists are common knowledge.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 1234
OUT = Path(__file__).with_name("instructions.jsonl")

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Canada": "Ottawa", "Mexico": "Mexico City",
    "Brazil": "Brasilia", "Argentina": "Buenos Aires", "Peru": "Lima", "Chile": "Santiago", "Egypt": "Cairo",
    "Kenya": "Nairobi", "Nigeria": "Abuja", "Ghana": "Accra", "Norway": "Oslo", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw", "Austria": "Vienna", "Greece": "Athens",
    "Ireland": "Dublin", "Belgium": "Brussels", "Netherlands": "Amsterdam", "Hungary": "Budapest",
    "Czechia": "Prague", "Russia": "Moscow", "Turkey": "Ankara", "Iran": "Tehran", "Thailand": "Bangkok",
    "Vietnam": "Hanoi", "Indonesia": "Jakarta", "Australia": "Canberra", "New Zealand": "Wellington",
    "South Korea": "Seoul", "Cuba": "Havana",
}
ANTONYMS = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark", "open": "closed",
    "early": "late", "full": "empty", "high": "low", "old": "new", "hard": "soft", "wet": "dry",
    "strong": "weak", "rich": "poor", "loud": "quiet", "thick": "thin", "long": "short", "clean": "dirty",
    "easy": "difficult", "near": "far", "first": "last", "true": "false", "up": "down", "win": "lose",
    "begin": "end", "push": "pull", "give": "take", "buy": "sell", "above": "below", "inside": "outside",
    "day": "night", "brave": "afraid", "sharp": "dull", "heavy": "light", "young": "old", "always": "never",
    "remember": "forget", "accept": "refuse", "arrive": "leave", "wide": "narrow",
}
PLURALS = {
    "cat": "cats", "dog": "dogs", "box": "boxes", "bus": "buses", "city": "cities", "baby": "babies",
    "leaf": "leaves", "knife": "knives", "child": "children", "mouse": "mice", "tooth": "teeth",
    "foot": "feet", "man": "men", "woman": "women", "person": "people", "sheep": "sheep", "fish": "fish",
    "goose": "geese", "tomato": "tomatoes", "potato": "potatoes", "church": "churches", "dish": "dishes",
    "key": "keys", "day": "days", "story": "stories", "wolf": "wolves", "life": "lives", "photo": "photos",
    "piano": "pianos", "glass": "glasses", "class": "classes", "book": "books", "tree": "trees",
    "apple": "apples", "idea": "ideas", "wish": "wishes", "half": "halves", "hero": "heroes",
    "ox": "oxen", "cactus": "cacti",
}
SENTENCES = [
    "the cat sat on the mat", "we like green apples", "the sun is very bright today",
    "my brother plays the piano", "rain fell all night", "the train leaves at noon",
    "she reads a book every week", "birds sing in the morning", "the river runs to the sea",
    "he painted the door blue", "our team won the game", "the shop opens at nine",
    "a small dog barked twice", "they planted three trees", "the soup is too hot",
    "I forgot my keys at home", "the moon rose over the hill", "cold wind blew from the north",
    "the children built a sandcastle", "a red kite flew above the park",
]
NUMBER_WORDS = "zero one two three four five six seven eight nine ten eleven twelve".split()


def arithmetic(rng: random.Random) -> dict:
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    op = rng.choice(["plus", "minus", "times"])
    if op == "minus" and b > a:
        a, b = b, a
    value = {"plus": a + b, "minus": a - b, "times": a * b}[op]
    form = rng.randrange(3)
    if form == 0:
        return {"instruction": f"What is {a} {op} {b}?", "input": "", "output": f"{a} {op} {b} is {value}."}
    if form == 1:
        symbol = {"plus": "+", "minus": "-", "times": "*"}[op]
        return {"instruction": "Compute the result.", "input": f"{a} {symbol} {b}", "output": str(value)}
    return {"instruction": f"Add {a} and {b}.", "input": "", "output": f"The sum is {a + b}."}


def capital(rng: random.Random) -> dict:
    country, city = rng.choice(sorted(CAPITALS.items()))
    if rng.random() < 0.5:
        return {"instruction": f"What is the capital of {country}?", "input": "", "output": f"The capital of {country} is {city}."}
    return {"instruction": "Name the capital city of the country.", "input": country, "output": city}


def antonym(rng: random.Random) -> dict:
    word, opposite = rng.choice(sorted(ANTONYMS.items()))
    if rng.random() < 0.5:
        return {"instruction": "Give the opposite of the word.", "input": word, "output": opposite}
    return {"instruction": f"What is the opposite of \"{word}\"?", "input": "", "output": f"The opposite of \"{word}\" is \"{opposite}\"."}


def plural(rng: random.Random) -> dict:
    word, many = rng.choice(sorted(PLURALS.items()))
    if rng.random() < 0.5:
        return {"instruction": "Write the plural of the noun.", "input": word, "output": many}
    return {"instruction": f"What is the plural of \"{word}\"?", "input": "", "output": f"The plural of \"{word}\" is \"{many}\"."}


def rewrite(rng: random.Random) -> dict:
    sentence = rng.choice(SENTENCES)
    task = rng.randrange(4)
    if task == 0:
        return {"instruction": "Rewrite the sentence in capital letters.", "input": sentence, "output": sentence.upper()}
    if task == 1:
        return {"instruction": "Start the sentence with a capital letter and end it with a period.", "input": sentence,
                "output": sentence[0].upper() + sentence[1:] + "."}
    if task == 2:
        words = sentence.split()
        return {"instruction": "How many words are in the sentence?", "input": sentence,
                "output": f"{NUMBER_WORDS[len(words)] if len(words) < len(NUMBER_WORDS) else len(words)}"}
    return {"instruction": "Write the last word of the sentence.", "input": sentence, "output": sentence.split()[-1]}


def make_records(n: int = 300, seed: int = SEED) -> list[dict]:
    """n distinct records, tasks mixed evenly, reproducible from the seed."""
    rng = random.Random(seed)
    tasks = [arithmetic, capital, antonym, plural, rewrite]
    records, seen = [], set()
    while len(records) < n:
        record = tasks[len(records) % len(tasks)](rng)
        key = json.dumps(record, sort_keys=True)
        if key not in seen:
            seen.add(key)
            records.append(record)
    return records


def main() -> None:
    lines = [json.dumps(r, ensure_ascii=False) for r in make_records()]
    OUT.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(lines)} records to {OUT}")


if __name__ == "__main__":
    main()
