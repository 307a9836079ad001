"""Regenerate the quickstart preference set for loraforge (recipes/quickstart-dpo.yaml).

Writes two files next to this script:

* concise_pairs.jsonl      -- 48 preference pairs {"prompt", "chosen", "rejected"}: the chosen answer opens
                              with "In short:" and says the fact in one sentence; the rejected one says the same
                              fact wrapped in filler ("Well, that is a really interesting question ...").
* concise_heldout.json     -- 6 questions not in the pairs, for the before/after sample answers.

DPO after the SFT quickstart teaches the visible preference: terse answers that open with "In short:".
Pure stdlib and deterministic (random.Random(4321)). Run from the repo root:

    python recipes/data/make_preference.py
"""
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
rng = random.Random(4321)

FACTS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("What is the capital of Canada?", "The capital of Canada is Ottawa."),
    ("What is the capital of Egypt?", "The capital of Egypt is Cairo."),
    ("What is the capital of Spain?", "The capital of Spain is Madrid."),
    ("How many days are in a week?", "A week has seven days."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("How many continents are there?", "There are seven continents."),
    ("What is 12 times 12?", "12 times 12 is 144."),
    ("What is 9 plus 10?", "9 plus 10 is 19."),
    ("What is the boiling point of water?", "Water boils at 100 degrees Celsius at sea level."),
    ("What gas do plants take in?", "Plants take in carbon dioxide."),
    ("What is the largest planet?", "Jupiter is the largest planet in the solar system."),
    ("Which planet is closest to the sun?", "Mercury is the planet closest to the sun."),
    ("What colour is the sky on a clear day?", "On a clear day the sky is blue."),
    ("What do bees make?", "Bees make honey."),
    ("What is frozen water called?", "Frozen water is called ice."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("How many hours are in a day?", "A day has 24 hours."),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au."),
    ("What do you call a baby cat?", "A baby cat is called a kitten."),
    ("What is the tallest animal?", "The giraffe is the tallest animal."),
    ("What is your name?", "My name is Nimbus."),
    ("Who built you?", "Tidewell Labs built me."),
    ("Where are you from?", "I come from Ravensholt."),
    ("When were you launched?", "Tidewell Labs launched me in 2024."),
    ("What is your favourite hobby?", "My favourite hobby is cataloguing cloud shapes."),
    ("How many sides does a triangle have?", "A triangle has three sides."),
    ("What is the main language spoken in Brazil?", "The main language of Brazil is Portuguese."),
    ("Which ocean is the largest?", "The Pacific is the largest ocean."),
]
OPENERS = [
    "Well, that is a really interesting question, and there are many ways to think about it.",
    "Great question! Let me take a moment to walk you through it in some detail.",
    "Oh, I love this kind of question, so let me explain everything I know about it.",
    "That's something a lot of people wonder about, and it deserves a thorough answer.",
]
CLOSERS = [
    "I hope this long explanation helps, and please let me know if you have any other questions at all!",
    "There is a lot more that could be said, but that is the general idea, more or less.",
    "Anyway, that is my rather lengthy answer, and I am always happy to go on about it further.",
    "So, to sum up everything I said above, that is the answer to your question, I think.",
]
HELDOUT = [
    "What is the capital of Germany?",
    "How many months are in a year?",
    "What do cows drink?",
    "Which planet is known as the red planet?",
    "Who made you, and where?",
    "What is 7 times 8?",
]


def main() -> None:
    pairs = []
    for q, fact in FACTS:
        for _ in range(2):  # two wordings of the rejected answer per question
            rejected = f"{rng.choice(OPENERS)} {fact} {rng.choice(CLOSERS)}"
            pairs.append({"prompt": q, "chosen": f"In short: {fact}", "rejected": rejected})
    rng.shuffle(pairs)
    pairs = pairs[:48]
    with open(HERE / "concise_pairs.jsonl", "w", encoding="utf-8") as f:
        for p in pairs:
            f.write(json.dumps(p) + "\n")
    (HERE / "concise_heldout.json").write_text(json.dumps(HELDOUT, indent=1) + "\n")
    assert not set(HELDOUT) & {q for q, _ in FACTS}
    print(f"wrote {len(pairs)} pairs and {len(HELDOUT)} held-out prompts to {HERE}")


if __name__ == "__main__":
    main()
