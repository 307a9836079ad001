"""Tokenized data cached between runs, keyed by what decides it: data + tokenizer + settings.

The records are still read and validated on every run (cheap; a bad line is reported as before); what
is cached is their tokenization, the slow part. The key hashes the normalised records themselves (so
the data files, formats, system prompt and eval split are all in it), the tokenizer's full definition
(vocabulary, merges, normalisers, special tokens) and chat template, `loss_on`, and the versions of
loraforge, transformers and tokenizers. Settings that act after tokenization (max_seq_length, packing)
are applied to the cached tokens on every run, so changing them reuses the entry.

Entries are written to a temporary directory and renamed into place, so a killed run never leaves a
half-written entry; a damaged entry is ignored and rewritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import loraforge
from loraforge.model.modeling import cache_root

log = logging.getLogger("loraforge")

FORMAT = 2  # bump when what is stored changes (2: train.arrow / eval.arrow written while streaming)


def tokenizer_digest(tokenizer) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    h.update(json.dumps(
        {"template": tokenizer.chat_template, "special": tokenizer.special_tokens_map, "class": type(tokenizer).__name__},
        sort_keys=True, default=str,
    ).encode())
    return h.hexdigest()


def entry(key: str) -> Path:
    return _entry(key)


def _entry(key: str) -> Path:
    return cache_root() / "tokenized" / key


def stream_key(data_fingerprint: list, tokenizer, loss_on: str) -> str:
    """The key for data read as a stream (data.tokenized_data): a digest of the normalised records in
    order, their count, the eval split and seed, and the eval sources' digest, instead of the records."""
    from importlib.metadata import version

    h = hashlib.sha256(json.dumps({
        "format": FORMAT, "data": data_fingerprint, "tokenizer": tokenizer_digest(tokenizer), "loss_on": loss_on,
        "versions": [loraforge.__version__, version("transformers"), version("tokenizers")],
    }, sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


def load(key: str | None):
    """(train, eval or None, train lengths) from the cache, or None on a miss."""
    if key is None or os.environ.get("LORAFORGE_NO_DATA_CACHE"):
        return None
    entry = _entry(key)
    try:
        meta = json.loads((entry / "meta.json").read_text())
        from datasets import Dataset

        train = Dataset.from_file(str(entry / "train.arrow"))
        evald = Dataset.from_file(str(entry / "eval.arrow")) if meta["has_eval"] else None
        return train, evald, meta["lengths"]
    except FileNotFoundError:
        return None
    except Exception as e:  # a damaged entry: tokenize again and overwrite it
        log.warning("ignoring a damaged tokenized-data cache entry %s (%s)", entry, e)
        return None


def work_dir(key: str) -> Path | None:
    """A fresh directory to write an entry into (renamed into place by `save`); None: no cache."""
    if os.environ.get("LORAFORGE_NO_DATA_CACHE"):
        return None
    tmp = _entry(key).with_name(f".{key}.{os.getpid()}.tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    except OSError as e:
        log.warning("could not write the tokenized-data cache (%s); the next run tokenizes again", e)
        return None
    return tmp


def save(key: str, work: Path, has_eval: bool, lengths: list[int]) -> Path | None:
    """Make `work` the entry for `key` (atomically); the entry's path, or None if it could not be."""
    entry = _entry(key)
    try:
        (work / "meta.json").write_text(json.dumps({"has_eval": has_eval, "lengths": lengths}))
        shutil.rmtree(entry, ignore_errors=True)
        os.replace(work, entry)
        return entry
    except OSError as e:  # a full or read-only cache never stops training; the files in `work` are used
        log.warning("could not write the tokenized-data cache (%s); the next run tokenizes again", e)
        return None
