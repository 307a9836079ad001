"""Data: load the recipe's sources, detect their format, normalise to chats, tokenize with loss masks.

Every format becomes either a chat (`{"messages": [{role, content}, ...]}`) or plain text. Chats are
rendered through the model's chat template; the tokens that carry the loss are found by rendering the
conversation prefix before and after each assistant turn and mapping those character spans onto the
tokens (offset mapping). That works with any prefix-stable template, with no `{% generation %}`
markers needed. The result is a pre-tokenized dataset (`input_ids`, `assistant_masks`), cached between
runs (tokencache.py); `training_rows` turns it into labels, truncated to the plan's max_seq_length and
packed when the recipe asks, which trl's `SFTTrainer` takes as it is (its own preparation is skipped).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraforge.data import tokencache
from loraforge.data.chatspans import spans_by_sentinels
from loraforge.errors import UserError
from loraforge.recipe import DataSource, Recipe

ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "tool": "tool",
}
FORMATS = ("messages", "sharegpt", "alpaca", "prompt-completion", "text")


@dataclass
class Record:
    origin: str  # "file.jsonl:12" — what an error message names
    row: dict[str, Any]


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


BOMS = ((b"\xef\xbb\xbf", "utf-8-sig"), (b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"),
        (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"))


def sniff_encoding(path: Path) -> str:
    """utf-8 (with or without a BOM: Windows editors write one), or UTF-16/32 when a BOM says so.
    A file with NUL bytes and no BOM is UTF-16/32 the reader cannot place: refused with what to do."""
    with open(path, "rb") as f:
        head = f.read(4096)
    for bom, encoding in BOMS:
        if head.startswith(bom):
            return encoding
    if b"\x00" in head:
        raise UserError(f"{path}:1: NUL bytes without a byte-order mark (UTF-16/32 without a BOM?); "
                        "re-save the file as UTF-8")
    return "utf-8"


def iter_lines(path: Path):
    """(line number, text) of every line, streamed (never the whole file in memory); CRLF and a BOM are
    handled; a decoding error names the line."""
    encoding = sniff_encoding(path)
    if encoding.startswith("utf-8"):
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                try:
                    yield lineno, raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise UserError(f"{path}:{lineno}: not UTF-8 (byte {e.start}); re-save the file as UTF-8") from None
        return
    import io

    with io.open(path, encoding=encoding, newline=None) as f:  # the BOM picks the byte order
        lineno = 0
        try:
            for lineno, line in enumerate(f, start=1):
                yield lineno, line
        except UnicodeDecodeError:
            raise UserError(f"{path}:{lineno + 1}: not valid {encoding.upper()} although the file starts with its "
                            "byte-order mark; re-save the file as UTF-8") from None


def _first_char(path: Path) -> str:
    for _, line in iter_lines(path):
        if line.strip():
            return line.lstrip()[0]
    return ""


def iter_jsonl(path: Path):
    """Records of a JSON-lines file, one at a time (bounded memory, whatever the file's size)."""
    for lineno, line in iter_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(
                f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); fix or remove the line"
            ) from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{lineno}: expected a JSON object per line, got {type(row).__name__}")
        yield Record(f"{path}:{lineno}", row)


def _read_json(path: Path) -> list[Record]:
    """A JSON array (or an object holding one) — read whole: JSON has no record boundaries to stream on;
    JSON lines under a .json name are streamed as such."""
    if _first_char(path) == "{":
        first, second = None, None
        for _, line in iter_lines(path):
            if line.strip():
                if first is None:
                    first = line
                else:
                    second = line
                    break
        try:
            json.loads(first)
            is_lines = True  # the first line is a whole object: JSON lines
        except json.JSONDecodeError:
            is_lines = False
        if is_lines and second is not None and second.lstrip().startswith("{"):
            return list(iter_jsonl(path))
    text = "".join(line for _, line in iter_lines(path))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); fix the file") from None
    if isinstance(data, dict):
        data = next((v for v in data.values() if isinstance(v, list)), [data])
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a list of records")
    out = []
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise UserError(f"{path}: record {i + 1}: expected an object, got {type(row).__name__}")
        out.append(Record(f"{path}: record {i + 1}", row))
    return out


def _read_tabular(path: Path, kind: str) -> list[Record]:
    import datasets

    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as e:  # pyarrow / csv parser errors: name the file
        raise UserError(f"{path}: could not read as {kind} ({str(e).splitlines()[0][:200]})") from None
    first_line = 2 if kind == "csv" else 1  # csv: line 1 is the header
    label = "line" if kind == "csv" else "row"
    return [Record(f"{path}: {label} {i + first_line}", dict(row)) for i, row in enumerate(ds)]


def _read_hub(src: DataSource) -> list[Record]:
    import datasets

    try:
        ds = datasets.load_dataset(src.hub, src.subset, split=src.split)
    except Exception as e:
        raise UserError(
            f"data source hub '{src.hub}': could not load ({str(e).splitlines()[0][:200]}); "
            "check the id/subset/split and the network, or download it to a local file"
        ) from None
    if src.max_samples:
        ds = ds.select(range(min(src.max_samples, len(ds))))
    return [Record(f"{src.hub}[{src.split}] row {i + 1}", dict(row)) for i, row in enumerate(ds)]


def iter_records(src: DataSource, recipe: Recipe | None = None):
    """The source's records one at a time: JSON lines are streamed (bounded memory for any file size);
    a JSON array, CSV, Parquet or a hub dataset is read by its library first."""
    if src.hub is not None:
        yield from _read_hub(src)
        return
    path = recipe.resolve_path(src.path) if recipe is not None else Path(src.path)
    if path.is_dir():
        raise UserError(f"data.sources[].path: {src.path} is a directory ({path}); give a data file "
                        "(.jsonl, .json, .parquet or .csv) — one source per file")
    if not path.is_file():
        raise UserError(f"data file not found: {src.path} (looked at {path}); fix data.sources[].path")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records = _read_json(path) if _first_char(path) == "[" else iter_jsonl(path)
    elif suffix == ".json":
        records = _read_json(path)
    elif suffix in (".parquet", ".csv"):
        records = _read_tabular(path, suffix[1:])
    else:
        raise UserError(f"{path}: unsupported file type '{suffix}'; use .jsonl, .json, .parquet or .csv")
    n = 0
    for rec in records:
        if src.max_samples and n >= src.max_samples:
            break
        n += 1
        yield rec
    if not n:
        raise UserError(f"{path}: no records; the dataset is empty")


def read_source(src: DataSource, recipe: Recipe | None = None) -> list[Record]:
    return list(iter_records(src, recipe))


# --------------------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------------------


def detect_format(row: dict[str, Any]) -> str | None:
    keys = set(row)
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"prompt", "completion"} <= keys:
        return "prompt-completion"
    if "text" in keys:
        return "text"
    return None


def _turns(turns: Any, origin: str, role_key: str, content_key: str, field_name: str) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise UserError(f"{origin}: '{field_name}' must be a non-empty list of turns")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
            raise UserError(f"{origin}: {field_name}[{i}] needs '{role_key}' and '{content_key}'")
        raw_role = str(turn[role_key]).strip().lower()
        role = ROLE_ALIASES.get(raw_role)
        if role is None:
            raise UserError(
                f"{origin}: {field_name}[{i}]: unknown role '{turn[role_key]}'; use one of "
                f"{', '.join(sorted(ROLE_ALIASES))}"
            )
        content = turn[content_key]
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise UserError(f"{origin}: {field_name}[{i}]: '{content_key}' must be text")
        out.append({"role": role, "content": content})
    return out


def _require_text(row: dict, key: str, origin: str, allow_empty: bool = False) -> str:
    value = row.get(key)
    if value is None and allow_empty:
        return ""
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        raise UserError(f"{origin}: '{key}' is missing or empty; every record of this format needs it")
    return value


def normalise(row: dict[str, Any], fmt: str, origin: str, system_prompt: str | None = None) -> dict[str, Any]:
    """One record in any supported format -> {"messages": [...]} or {"text": "..."}; errors name `origin`."""
    if fmt == "text":
        return {"text": _require_text(row, "text", origin)}
    if fmt == "messages":
        messages = _turns(row.get("messages"), origin, "role", "content", "messages")
    elif fmt == "sharegpt":
        messages = _turns(row.get("conversations"), origin, "from", "value", "conversations")
    elif fmt == "alpaca":
        instruction = _require_text(row, "instruction", origin)
        extra = _require_text(row, "input", origin, allow_empty=True)
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": _require_text(row, "output", origin)}]
        if isinstance(row.get("system"), str) and row["system"].strip():
            messages.insert(0, {"role": "system", "content": row["system"]})
    elif fmt == "prompt-completion":
        prompt, completion = row.get("prompt"), row.get("completion")
        if isinstance(prompt, list) and isinstance(completion, list):  # conversational prompt/completion
            messages = _turns(prompt, origin, "role", "content", "prompt") + _turns(
                completion, origin, "role", "content", "completion"
            )
        else:
            messages = [
                {"role": "user", "content": _require_text(row, "prompt", origin)},
                {"role": "assistant", "content": _require_text(row, "completion", origin)},
            ]
    else:
        raise UserError(f"{origin}: unknown data format '{fmt}'; use one of {', '.join(FORMATS)}")

    assistant = [m for m in messages if m["role"] == "assistant"]
    if not assistant:
        raise UserError(f"{origin}: the conversation has no assistant turn, so there is nothing to learn")
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"].strip():
            raise UserError(f"{origin}: turn {i} (assistant) is empty; remove the record or fill the answer")
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    return {"messages": messages}


def iter_examples(sources: list[DataSource], recipe: Recipe):
    """Read and normalise every source, one example at a time; the format is detected per source from its
    first record."""
    for src in sources:
        fmt = src.format
        for rec in iter_records(src, recipe):
            if fmt == "auto":
                fmt = detect_format(rec.row)
                if fmt is None:
                    raise UserError(
                        f"{rec.origin}: cannot tell the data format from keys {sorted(rec.row)}; "
                        "expected messages, conversations, instruction/output, prompt/completion or text "
                        "(or set data.sources[].format)"
                    )
            yield normalise(rec.row, fmt, rec.origin, recipe.data.system_prompt)


def load_examples(sources: list[DataSource], recipe: Recipe) -> list[dict[str, Any]]:
    return list(iter_examples(sources, recipe))


# --------------------------------------------------------------------------------------------------
# Tokenization with loss masks
# --------------------------------------------------------------------------------------------------


def _render(tokenizer, messages: list[dict], template: str | None, add_generation_prompt: bool) -> str:
    from jinja2.exceptions import TemplateError

    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=template
        )
    except TemplateError as e:  # the template's own raise_exception (Gemma-2: "System role not supported")
        raise UserError(f"the chat template refuses a conversation: {str(e).splitlines()[0][:200]}; change the data "
                        "(e.g. remove system turns and data.system_prompt) or set data.chat_template") from None


def system_prompt_dropped(tokenizer, template: str | None, system_prompt: str) -> bool:
    """Whether the chat template leaves `system_prompt` out of a conversation that ends with an answer, as every
    training conversation does (Mistral v0.3's template puts the system prompt into the last user turn only when
    the conversation ends with that turn). A template that refuses system turns says so itself (`_render`)."""
    messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": "Hello?"},
                {"role": "assistant", "content": "Hello."}]
    try:
        return system_prompt not in _render(tokenizer, messages, template, False)
    except UserError:
        return False


def assistant_spans(tokenizer, messages: list[dict], template: str | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of each assistant turn (content + end-of-turn)."""
    full = _render(tokenizer, messages, template, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], template, True)
        upto = _render(tokenizer, messages[: i + 1], template, False)
        if not (upto.startswith(before) and full.startswith(upto)):
            # Qwen3, Mistral v0.3, Phi-3: earlier turns re-rendered
            located = spans_by_sentinels(lambda ms, gen: _render(tokenizer, ms, template, gen), messages, full)
            if located is not None:
                return full, located
            raise UserError(
                "the chat template renders earlier turns differently once later turns are added, so the "
                "assistant tokens cannot be located; set data.chat_template to a prefix-stable template "
                "or data.loss_on: all"
            )
        end = len(upto)
        while end > len(before) and upto[end - 1].isspace():  # the newline after <|im_end|> is not the answer
            end -= 1
        spans.append((len(before), end))
    return full, spans


def tokenize_example(tokenizer, example: dict[str, Any], template: str | None = None, loss_on: str = "assistant") -> dict:
    """`input_ids` and `assistant_masks` (1 = the token carries loss) for one normalised example."""
    if "text" in example:
        ids = tokenizer(example["text"], add_special_tokens=True)["input_ids"]
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids = ids + [tokenizer.eos_token_id]
        return {"input_ids": ids, "assistant_masks": [1] * len(ids)}
    full, spans = assistant_spans(tokenizer, example["messages"], template)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if loss_on == "all":
        return {"input_ids": ids, "assistant_masks": [1] * len(ids)}
    mask = [int(any(s < e_span and e > s_span for s_span, e_span in spans)) for s, e in offsets]
    return {"input_ids": ids, "assistant_masks": mask}


def eval_indices(n: int, share: float, seed: int) -> set[int]:
    """Which of `n` examples are held out for evaluation (a seeded shuffle; the same for the same n)."""
    if share <= 0 or n < 2:
        return set()
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return set(order[: min(n - 1, max(1, round(n * share)))])


def split_eval(examples: list, share: float, seed: int) -> tuple[list, list]:
    held = eval_indices(len(examples), share, seed)
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


def tokenize_all(examples: list[dict], tokenizer, template: str | None, loss_on: str):
    from datasets import Dataset

    rows = [tokenize_example(tokenizer, ex, template, loss_on) for ex in examples]
    return Dataset.from_dict(
        {"input_ids": [r["input_ids"] for r in rows], "assistant_masks": [r["assistant_masks"] for r in rows]}
    )


def resolve_chat_template(recipe: Recipe) -> str | None:
    """The recipe's template override: inline Jinja text or a path to a .jinja file."""
    t = recipe.data.chat_template
    if t is None:
        return None
    if "{%" not in t and "{{" not in t:
        path = recipe.resolve_path(t)
        if not path.is_file():
            raise UserError(f"data.chat_template: '{t}' is neither a Jinja template nor an existing file")
        return path.read_text(encoding="utf-8")
    return t


def training_rows(ds, max_len: int, packing: bool = False, seed: int = 0):
    """The tokenized dataset as the trainer takes it: `labels` (-100 where no loss), truncated to `max_len`
    (keeping the start), samples left without any loss token dropped; with `packing`, samples packed
    into rows of `max_len` by trl's best-fit-decreasing (`seq_lengths` keeps the boundaries).
    A dataset on disk (large inputs) is processed in batches into another file on disk: bounded memory.
    Returns (dataset, number dropped)."""
    from datasets import Dataset

    def rows(batch):
        ids_out, labels_out = [], []
        for ids, mask in zip(batch["input_ids"], batch["assistant_masks"]):
            ids, mask = ids[:max_len], mask[:max_len]
            if not any(mask):
                continue
            ids_out.append(ids)
            labels_out.append([t if m else -100 for t, m in zip(ids, mask)])
        return {"input_ids": ids_out, "labels": labels_out}

    if ds.cache_files:  # memory-mapped: stream through it
        import uuid

        out = ds.map(rows, batched=True, batch_size=100, remove_columns=ds.column_names, load_from_cache_file=False,
                     cache_file_name=str(Path(_scratch_dir()) / f"rows-{uuid.uuid4().hex}.arrow"),
                     new_fingerprint=uuid.uuid4().hex, desc=None)
    else:
        out = Dataset.from_dict(rows({"input_ids": ds["input_ids"], "assistant_masks": ds["assistant_masks"]}))
    dropped = len(ds) - len(out)
    if packing and len(out):
        from trl.data_utils import pack_dataset

        out = pack_dataset(out.shuffle(seed=seed), max_len, "bfd")
    return out, dropped


# --------------------------------------------------------------------------------------------------
# Streaming: any input size in bounded memory
# --------------------------------------------------------------------------------------------------

_SCRATCH: list[str] = []


def _scratch_dir() -> str:
    """A temporary directory for this process's derived data files, removed at exit."""
    if not _SCRATCH:
        import atexit
        import shutil
        import tempfile

        _SCRATCH.append(tempfile.mkdtemp(prefix="loraforge-data-"))
        atexit.register(shutil.rmtree, _SCRATCH[0], True)
    return _SCRATCH[0]


class Progress:
    """A log line every `every_s` seconds while a long pass runs (a large input shows it is moving)."""

    def __init__(self, what: str, every_s: float = 10.0):
        import time

        self.what, self.every_s, self.n, self._time = what, every_s, 0, time.time
        self.start = self.last = self._time()

    def tick(self) -> None:
        self.n += 1
        if self.n % 256 == 0 and self._time() - self.last >= self.every_s:
            self.last = self._time()
            import logging

            logging.getLogger("loraforge").info("%s: %s records (%.0f s)", self.what, f"{self.n:,}", self.last - self.start)


def _digest(examples, progress: Progress | None = None) -> tuple[int, str]:
    import hashlib

    h, n = hashlib.sha256(), 0
    for ex in examples:
        h.update(json.dumps(ex, sort_keys=True, ensure_ascii=False, default=str).encode())
        h.update(b"\0")
        n += 1
        if progress:
            progress.tick()
    return n, h.hexdigest()


TOKEN_FEATURES = {"input_ids": "int64", "assistant_masks": "int64"}


def _writer(path: Path):
    from datasets import Features, Sequence, Value
    from datasets.arrow_writer import ArrowWriter

    features = Features({k: Sequence(Value(v)) for k, v in TOKEN_FEATURES.items()})
    return ArrowWriter(features=features, path=str(path), writer_batch_size=100)  # bounded: 100 records in memory


@dataclass
class Scan:
    """What the first pass over the data found: record count, fingerprint, which are held out."""

    count: int
    digest: str
    held: set
    eval_extra: int
    eval_digest: str


def scan_data(recipe: Recipe) -> Scan:
    """Read and validate every record once, streaming (a bad record stops here, naming its line)."""
    d = recipe.data
    n, digest = _digest(iter_examples(d.sources, recipe), Progress("reading the data"))
    held = eval_indices(n, d.eval_split, recipe.training.seed)
    n_extra, extra_digest = _digest(iter_examples(d.eval_sources, recipe)) if d.eval_sources else (0, "")
    return Scan(n, digest, held, n_extra, extra_digest)


def tokenized_data(recipe: Recipe, tokenizer, scan: Scan, write_cache: bool = True):
    """(train dataset, eval dataset or None, train lengths) for the recipe's sources, in bounded memory:
    after `scan_data`'s pass, a second (only on a cache miss) tokenizes the records one at a time into
    Arrow files on disk, which the datasets are memory-mapped from. Memory: a few integers per record
    (lengths, the held-out indices), whatever the size of the files."""
    from datasets import Dataset

    d = recipe.data
    held, n_extra = scan.held, scan.eval_extra
    key = tokencache.stream_key([scan.digest, scan.count, d.eval_split, recipe.training.seed, scan.eval_digest],
                                tokenizer, d.loss_on)
    cached = tokencache.load(key)
    if cached is not None:
        log_ = __import__("logging").getLogger("loraforge")
        log_.info("tokenized data from the cache (%s)", key)
        return cached
    work = tokencache.work_dir(key) if write_cache else None
    if work is None:
        import tempfile

        work = Path(tempfile.mkdtemp(prefix="tok-", dir=_scratch_dir()))
    train_w, eval_w = _writer(work / "train.arrow"), _writer(work / "eval.arrow")
    lengths: list[int] = []
    progress = Progress("tokenizing")
    for i, ex in enumerate(iter_examples(d.sources, recipe)):
        row = tokenize_example(tokenizer, ex, None, d.loss_on)
        if i in held:
            eval_w.write(row)
        else:
            train_w.write(row)
            lengths.append(len(row["input_ids"]))
        progress.tick()
    for ex in iter_examples(d.eval_sources, recipe) if d.eval_sources else ():
        eval_w.write(tokenize_example(tokenizer, ex, None, d.loss_on))
    n_eval = len(held) + n_extra
    for w in (train_w, eval_w):
        w.finalize()
    if not n_eval:
        (work / "eval.arrow").unlink()
    if write_cache:
        tokencache.save(key, work, n_eval > 0, lengths)
        if not work.exists():  # renamed into place as the cache entry
            work = tokencache.entry(key)
    train = Dataset.from_file(str(work / "train.arrow"))
    evald = Dataset.from_file(str(work / "eval.arrow")) if n_eval else None
    return train, evald, lengths
