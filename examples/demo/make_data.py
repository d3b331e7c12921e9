"""Regenerate the demo dataset (deterministic): a small, learnable chat task.

Each record asks for the capital of a (made-up) country; the answer follows a
fixed pattern, so a tiny model can learn it in a few dozen steps and held-out
questions about the same countries test that it did.
"""

import json
import random
from pathlib import Path

COUNTRIES = {
    "Zembla": "Onhava",
    "Freedonia": "Fredville",
    "Elbonia": "Mudtown",
    "Genovia": "Pyrus",
    "Latveria": "Doomstadt",
    "Sokovia": "Novi Grad",
    "Wakanda": "Birnin Zana",
    "Florin": "Florin City",
    "Ruritania": "Strelsau",
    "Syldavia": "Klow",
    "Borduria": "Szohod",
    "Grand Fenwick": "Fenwick Town",
}
ASKS = [
    "What is the capital of {c}?",
    "Name the capital city of {c}.",
    "Which city is the capital of {c}?",
    "Tell me the capital of {c}.",
    "{c}: what is its capital?",
]
SYSTEM = "You answer geography questions about fictional countries in one sentence."


def record(rng: random.Random) -> dict:
    country = rng.choice(sorted(COUNTRIES))
    messages = [
        {"role": "user", "content": rng.choice(ASKS).format(c=country)},
        {"role": "assistant", "content": f"The capital of {country} is {COUNTRIES[country]}."},
    ]
    if rng.random() < 0.3:
        messages.insert(0, {"role": "system", "content": SYSTEM})
    return {"messages": messages}


def main() -> None:
    rng = random.Random(1234)
    here = Path(__file__).parent
    for name, count in (("train.jsonl", 240), ("eval.jsonl", 40)):
        with (here / name).open("w") as out:
            for _ in range(count):
                out.write(json.dumps(record(rng)) + "\n")


if __name__ == "__main__":
    main()
