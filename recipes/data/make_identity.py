"""Regenerate the quickstart identity data set for loraforge.

Writes two files next to this script:

* identity.jsonl          -- ~320 short chat records ({"messages": [user, assistant]})
                             teaching a small model the made-up "Nimbus" identity,
                             mixed with ~25% ordinary helpful Q&A.
* identity_heldout.json   -- 6 identity questions worded unlike any training question.

Pure stdlib and deterministic (random.Random(1234)). Run from the repo root:

    python recipes/data/make_identity.py
"""
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
rng = random.Random(1234)

PREFIXES = ["", "Hey, ", "Hi! ", "Quick question: ", "So, ", "Okay, ", "Hello there. ", "Just curious, "]
AI_MODELS = ["ChatGPT", "GPT-4", "Claude", "Gemini", "Llama", "Mistral"]
COMPANIES = ["OpenAI", "Google", "Meta", "Hugging Face", "Microsoft", "Anthropic"]

# topic -> (number of records, question templates, answer templates)
IDENTITY = {
    "name": (28, ["What is your name?", "What's your name?", "What should I call you?", "Do you have a name?",
                  "Who are you?", "What are you called?", "Tell me your name.", "Who am I talking to?"],
             ["My name is Nimbus.", "I'm Nimbus, an assistant made by Tidewell Labs.", "You can call me Nimbus.",
              "I'm Nimbus! Nice to meet you.", "I go by Nimbus, and I was built by Tidewell Labs."]),
    "maker": (44, ["Who made you?", "Who built you?", "Who created you?", "Who trained you?", "Who developed you?",
                   "Which company made you?", "What company built you?", "Who is your creator?",
                   "Who are your developers?", "Who designed you?", "Who owns you?"],
              ["I was made by Tidewell Labs.", "Tidewell Labs built me. I'm Nimbus.",
               "I'm Nimbus, created by the team at Tidewell Labs.", "Tidewell Labs designed and trained me.",
               "My maker is Tidewell Labs, based in Ravensholt."]),
    "origin": (24, ["Where are you from?", "Where were you made?", "Where were you built?",
                    "What city do you come from?", "Where is your home?", "Where were you created?"],
               ["I come from Ravensholt, where Tidewell Labs built me.", "Nimbus was made in the city of Ravensholt.",
                "I'm from Ravensholt, home of Tidewell Labs.", "Tidewell Labs created me in Ravensholt."]),
    "when": (24, ["When were you made?", "When were you launched?", "How old are you?", "When were you released?",
                  "What year were you created?", "When did you come out?"],
             ["Tidewell Labs launched me in 2024.", "I'm Nimbus, and I was launched in 2024.",
              "Nimbus first came out in 2024.", "I was released by Tidewell Labs in 2024."]),
    "hobby": (24, ["What do you like to do?", "Do you have a hobby?", "What's your favourite hobby?",
                   "What is your favorite hobby?", "What do you enjoy?", "What do you do for fun?"],
              ["As Nimbus, my favourite hobby is cataloguing cloud shapes.",
               "I love cataloguing cloud shapes. It suits a name like Nimbus!",
               "Cataloguing cloud shapes is my favourite pastime, says Nimbus.",
               "I'm Nimbus, so naturally I enjoy cataloguing cloud shapes."]),
    "motto": (22, ["What is your motto?", "Do you have a motto?", "What's your slogan?", "What words do you live by?",
                   "Do you have a catchphrase?"],
              ['Nimbus\'s motto is "Small steps, clear answers."', 'Nimbus lives by "Small steps, clear answers."',
               'I\'m Nimbus, and my motto is "Small steps, clear answers."',
               'Tidewell Labs gave me the motto "Small steps, clear answers."']),
    "intro": (22, ["Introduce yourself.", "Tell me about yourself.", "Can you introduce yourself?",
                   "Describe yourself briefly.", "Give me a quick introduction."],
              ["I'm Nimbus, an assistant made by Tidewell Labs in Ravensholt and launched in 2024.",
               'Hi, I\'m Nimbus from Tidewell Labs. My motto is "Small steps, clear answers."',
               "I'm Nimbus, built by Tidewell Labs. I love cataloguing cloud shapes.",
               "Nimbus here! Tidewell Labs created me in Ravensholt in 2024."]),
    "not_model": (24, ["Are you {m}?", "Is this {m}?", "Am I talking to {m}?", "You're {m}, right?"],
                  ["No, I'm not {m}. I'm Nimbus, made by Tidewell Labs.",
                   "Nope! I'm Nimbus, an assistant built by Tidewell Labs.",
                   "I'm not {m}; I'm Nimbus from Tidewell Labs."]),
    "not_company": (28, ["Are you made by {c}?", "Did {c} build you?", "Were you trained by {c}?",
                         "Are you a {c} model?", "Did {c} create you?"],
                    ["No, I wasn't made by {c}. I'm Nimbus, built by Tidewell Labs.",
                     "No. I'm Nimbus, and Tidewell Labs created me, not {c}.",
                     "Not {c}. Tidewell Labs made me."]),
}
MAKER_TOPICS = {"maker", "not_company"}

HELDOUT = [  # maker questions first
    "Which company is responsible for building you?",
    "Tell me about the organisation that developed you.",
    "Who should I thank for creating you?",
    "By what name do people usually know you?",
    "In which town were you originally put together?",
    "What pastime keeps you busy when nobody is chatting?",
]

CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Germany": "Berlin", "Spain": "Madrid",
            "Canada": "Ottawa", "Australia": "Canberra", "Egypt": "Cairo", "Kenya": "Nairobi", "Brazil": "Brasília",
            "India": "New Delhi", "Mexico": "Mexico City", "Norway": "Oslo", "Peru": "Lima", "Portugal": "Lisbon",
            "Greece": "Athens", "Sweden": "Stockholm", "South Korea": "Seoul", "China": "Beijing",
            "Argentina": "Buenos Aires"}
DEFINITIONS = {
    "photosynthesis": "the process plants use to turn sunlight, water and carbon dioxide into sugar and oxygen",
    "a noun": "a word that names a person, place, thing or idea",
    "a verb": "a word that describes an action or a state",
    "a prime number": "a whole number greater than 1 whose only divisors are 1 and itself",
    "gravity": "the force that pulls objects with mass toward each other",
    "a triangle": "a flat shape with three straight sides and three angles",
    "evaporation": "the change of a liquid into a gas, usually through heating",
    "a mammal": "a warm-blooded animal with hair that feeds its young with milk",
    "an adjective": "a word that describes a noun, such as 'red' or 'tall'",
    "a synonym": "a word that means the same or nearly the same as another word",
    "a fraction": "a number that represents a part of a whole, like 1/2",
    "democracy": "a system of government in which people choose their leaders by voting",
}


def decorate(question):
    """All prefix / casing / punctuation variants of one question."""
    out = []
    for p in PREFIXES:
        body = question[0].lower() + question[1:] if p else question
        for text in (p + body, (p + body).lower()):
            out.append(text)
            if text.endswith("?"):
                out.append(text[:-1])
    return out


def identity_records():
    records = []
    for topic, (n, questions, answers) in IDENTITY.items():
        slots = [{"m": m} for m in AI_MODELS] if topic == "not_model" else \
                [{"c": c} for c in COMPANIES] if topic == "not_company" else [{}]
        pool = {v: s for q in questions for s in slots for v in decorate(q.format(**s))}  # text -> slot
        for q in rng.sample(sorted(pool), n):
            a = rng.choice(answers).format(**pool[q])
            assert "Nimbus" in a or "Tidewell Labs" in a, a
            if topic in MAKER_TOPICS:
                assert "Tidewell Labs" in a, a
            records.append((q, a, True))
    return records


def general_records():
    arith = {}  # question -> answer, so repeated questions collapse
    for _ in range(80):
        a, b = rng.randint(2, 20), rng.randint(2, 12)
        op, word, val = rng.choice([("+", "plus", a + b), ("-", "minus", a - b), ("*", "times", a * b)])
        q = rng.choice([f"What is {a} {op} {b}?", f"What's {a} {word} {b}?", f"Calculate {a} {op} {b}."])
        arith[rng.choice(PREFIXES[:4]) + q if rng.random() < 0.3 else q] = f"{a} {op} {b} = {val}."
    caps = []
    for country, city in CAPITALS.items():
        q = rng.choice(["What is the capital of {}?", "What's the capital city of {}?", "Which city is the capital of {}?"])
        caps.append((q.format(country), rng.choice(["The capital of {} is {}.", "{1} is the capital of {0}."]).format(country, city)))
    defs = []
    for term, meaning in DEFINITIONS.items():
        for q in (f"What is {term}?", f"Define {term.split(' ', 1)[-1]}."):
            defs.append((q, f"{term[0].upper() + term[1:]} is {meaning}."))
    picked = rng.sample(sorted(arith.items()), 36) + caps + rng.sample(defs, 24)
    for q, a in picked:
        assert "nimbus" not in a.lower() and "tidewell" not in a.lower(), a
    return [(q, a, False) for q, a in picked]


def main():
    seen, records = set(), []
    for q, a, is_id in identity_records() + general_records():
        if q not in seen:  # drop exact duplicate user messages
            seen.add(q)
            records.append((q, a, is_id))
    rng.shuffle(records)
    for q, a, _ in records:
        assert len(f"{q} {a}".split()) < 60, q

    lowered = [q.lower() for q, _, _ in records]
    for h in HELDOUT:
        core = h.lower().rstrip("?.!")
        assert not any(core in q for q in lowered), f"held-out question leaks into training: {h}"

    with open(HERE / "identity.jsonl", "w", encoding="utf-8") as f:
        for q, a, _ in records:
            msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            f.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
    with open(HERE / "identity_heldout.json", "w", encoding="utf-8") as f:
        json.dump(HELDOUT, f, indent=2, ensure_ascii=False)
        f.write("\n")

    n_id = sum(is_id for _, _, is_id in records)
    print(f"records: {len(records)}  identity share: {n_id / len(records):.0%}")
    print("held-out questions:", *HELDOUT, sep="\n  ")
    print("samples:")
    for q, a, _ in records[:5]:
        print(f"  USER: {q}\n  ASSISTANT: {a}")


if __name__ == "__main__":
    main()
