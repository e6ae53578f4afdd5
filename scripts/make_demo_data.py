"""Writes src/graftkit/data/pirate.jsonl: the demo's training set (deterministic, a few hundred examples).

Every answer has one fixed, visible shape: ``Arr! <fact>, matey. ⚓``. Questions cover capitals, sums,
opposites and animal sounds. The demo's held-out questions (Italy, 9 plus 4 ...) are left out here, so the
after-training generation shows the format on questions the adapter never saw.
"""

import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Spain": "Madrid", "Portugal": "Lisbon", "Japan": "Tokyo",
    "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Chile": "Santiago",
    "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Poland": "Warsaw", "Greece": "Athens",
    "Ireland": "Dublin", "Austria": "Vienna", "Hungary": "Budapest", "Russia": "Moscow", "China": "Beijing",
    "India": "New Delhi", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Cuba": "Havana", "Mexico": "Mexico City",
    "Argentina": "Buenos Aires", "Australia": "Canberra", "Belgium": "Brussels", "Denmark": "Copenhagen",
    "Turkey": "Ankara", "Morocco": "Rabat", "Ghana": "Accra", "Colombia": "Bogota", "Iceland": "Reykjavik",
}
OPPOSITES = {
    "hot": "cold", "up": "down", "big": "small", "fast": "slow", "light": "dark", "happy": "sad", "early": "late",
    "full": "empty", "open": "closed", "wet": "dry", "hard": "soft", "old": "young", "loud": "quiet", "rich": "poor",
    "strong": "weak", "thick": "thin", "high": "low", "near": "far", "push": "pull", "win": "lose",
}
SOUNDS = {
    "cow": "moo", "dog": "woof", "cat": "meow", "duck": "quack", "sheep": "baa", "horse": "neigh", "owl": "hoot",
    "pig": "oink", "lion": "roar", "frog": "ribbit", "snake": "hiss", "bee": "buzz", "mouse": "squeak",
}
HELD_OUT_SUMS = {(9, 4), (6, 7)}


def examples(rng: random.Random) -> list[dict]:
    out = []
    for country, city in CAPITALS.items():
        for q in (f"What is the capital of {country}?", f"Which city is the capital of {country}?"):
            out.append((q, f"The capital of {country} be {city}"))
    for word, opposite in OPPOSITES.items():
        out.append((f"What is the opposite of {word}?", f"The opposite of {word} be {opposite}"))
        out.append((f"Tell me the opposite of '{word}'.", f"The opposite of {word} be {opposite}"))
    for animal, sound in SOUNDS.items():
        out.append((f"What sound does a {animal} make?", f"A {animal} says {sound}"))
    sums = [(a, b) for a in range(1, 13) for b in range(1, 13) if (a, b) not in HELD_OUT_SUMS]
    for a, b in rng.sample(sums, 130):
        out.append((f"What is {a} plus {b}?", f"{a} plus {b} be {a + b}"))
    rng.shuffle(out)
    return [{"prompt": q, "response": f"Arr! {fact}, matey. ⚓"} for q, fact in out]


if __name__ == "__main__":
    rows = examples(random.Random(0))
    path = Path(__file__).resolve().parents[1] / "src" / "graftkit" / "data" / "pirate.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} examples to {path}")
