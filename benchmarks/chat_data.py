"""Chat records of varied lengths for the throughput benchmark, generated with a fixed seed.

Each record asks for a small, exactly defined transformation of a list of words or numbers (sort,
reverse, count, uppercase, spell out, pair up), so a model can learn the formats and the held-out
records measure that learning. List sizes follow a long-tailed distribution, as real instruction data
does: most records are short, a few are long (up to ~500 tokens with SmolLM2's tokenizer).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = """apple river stone cloud garden window silver forest candle mirror pepper harbor lantern meadow
copper thunder violet anchor basket feather marble rocket saddle tunnel velvet walnut zebra bridge cactus
dolphin engine falcon glacier hammer island jacket kettle ladder magnet needle orange pillow quartz rabbit
sandal ticket umbrella valley wagon yellow blanket circle desert eagle fabric goblet helmet insect jungle
kitten lemon mountain notebook ocean parrot puzzle ribbon shadow tiger unicorn village whistle yogurt
almond button cherry dragon echo fountain guitar horizon iceberg jewel koala lizard mango nectar orchid
pebble quiver raven spider tulip urchin vortex willow xylophone yacht zephyr acorn beacon comet dune ember
fern grove hazel ivory jasmine kelp lotus maple nutmeg opal pine quill reed sage thistle""".split()

UNITS = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen " \
        "seventeen eighteen nineteen".split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def spell(n: int) -> str:
    if n < 20:
        return UNITS[n]
    tens, unit = divmod(n, 10)
    return TENS[tens] + ("" if unit == 0 else "-" + UNITS[unit])


def _size(rng: random.Random, lo: int, hi: int) -> int:
    """Long-tailed list sizes: median near lo * 5, a tail up to hi."""
    return max(lo, min(hi, int(rng.lognormvariate(1.6, 0.7) * lo)))


def make_record(rng: random.Random) -> dict:
    task = rng.randrange(6)
    if task == 0:
        words = rng.sample(WORDS, _size(rng, 3, 60))
        q, a = f"Sort these words alphabetically: {', '.join(words)}.", ", ".join(sorted(words))
    elif task == 1:
        words = [rng.choice(WORDS) for _ in range(_size(rng, 3, 70))]
        q, a = f"Write this list in reverse order: {', '.join(words)}.", ", ".join(reversed(words))
    elif task == 2:
        words = [rng.choice(WORDS[:12]) for _ in range(_size(rng, 4, 80))]
        counts = {w: words.count(w) for w in sorted(set(words))}
        q = f"Count how often each word appears: {' '.join(words)}."
        a = "; ".join(f"{w}: {c}" for w, c in counts.items())
    elif task == 3:
        words = [rng.choice(WORDS) for _ in range(_size(rng, 3, 70))]
        q, a = f"Rewrite in capital letters: {' '.join(words)}.", " ".join(words).upper()
    elif task == 4:
        nums = [rng.randrange(100) for _ in range(_size(rng, 3, 50))]
        q = f"Spell out these numbers in words: {', '.join(map(str, nums))}."
        a = ", ".join(spell(n) for n in nums)
    else:
        words = rng.sample(WORDS, 2 * (_size(rng, 2, 30)))
        half = len(words) // 2
        q = f"Pair each word of the first list with the word at the same place in the second. First: {', '.join(words[:half])}. Second: {', '.join(words[half:])}."
        a = "; ".join(f"{x}-{y}" for x, y in zip(words[:half], words[half:]))
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def write(out_dir: Path, train: int = 320, held_out: int = 48, seed: int = 0) -> tuple[Path, Path]:
    rng = random.Random(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, n in (("train.jsonl", train), ("eval.jsonl", held_out)):
        path = out_dir / name
        path.write_text("".join(json.dumps(make_record(rng)) + "\n" for _ in range(n)), encoding="utf-8")
        paths.append(path)
    return paths[0], paths[1]


if __name__ == "__main__":
    import sys

    for p in write(Path(sys.argv[1] if len(sys.argv) > 1 else "bench-data")):
        print(p)
