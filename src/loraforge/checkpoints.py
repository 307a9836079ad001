"""Crash-safe checkpoints: staged, marked complete, renamed into place; only complete ones are resumed.

A checkpoint is written by the Trainer into `checkpoints/.staging/checkpoint-N`, gets a `.complete`
marker, and is then renamed to `checkpoints/checkpoint-N` (an atomic rename on one filesystem). Old
checkpoints are rotated only after the new one is in place, so `save_total_limit` never removes the
last good one. A crash at any point leaves either the previous checkpoint set or the new one.

The marker records every file's size and SHA-256 (`write_marker`). Before a resume the newest
checkpoint is verified (`verify`); a damaged one (a truncated or altered file: a full disk, a bad copy,
bit rot) is moved aside to `checkpoints/damaged/` — never deleted — and the newest intact one is used
(`drop_damaged`). A finished run directory carries the same record of its adapter and tokenizer
(`checksums.json`, `write_manifest`), verified before eval, merge, export, chat and generate
(`verify_dir`). Markers of older versions (the step number only) are accepted with a structural check.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path

from loraforge.errors import UserError
from loraforge.rundir import CHECKPOINTS_DIR, MANIFEST_FILE

log = logging.getLogger("loraforge")

STAGING = ".staging"
MARKER = ".complete"
DAMAGED = "damaged"
MANIFEST = MANIFEST_FILE
# What inference reads from a finished run directory: recorded at the end of training, verified before use.
RUN_FILES = ("adapter_model.safetensors", "adapter_model.bin", "adapter_config.json", "tokenizer.json",
             "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt",
             "tokenizer.model", "added_tokens.json")
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def complete_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _CKPT.match(p.name)
        if m and p.is_dir() and (p / MARKER).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_complete(root: str | Path) -> Path | None:
    ckpts = complete_checkpoints(root)
    return ckpts[-1][1] if ckpts else None


def clean_incomplete(root: str | Path) -> list[Path]:
    """Remove the staging area and any checkpoint directory without its completeness marker."""
    root = Path(root)
    removed = []
    if not root.is_dir():
        return removed
    for p in root.iterdir():
        if p.name == STAGING or (p.is_dir() and _CKPT.match(p.name) and not (p / MARKER).is_file()):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def rotate(root: str | Path, keep: int | None) -> None:
    """Delete the oldest complete checkpoints beyond `keep` (the newest is always kept)."""
    if not keep:
        return
    ckpts = complete_checkpoints(root)
    for _, path in ckpts[: max(0, len(ckpts) - max(1, keep))]:
        shutil.rmtree(path, ignore_errors=True)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def free_bytes(path: str | Path) -> int:
    return shutil.disk_usage(path).free


def ensure_free_space(root: str | Path, need: int) -> None:
    free = free_bytes(root)
    if free < need:
        raise UserError(
            f"{root}: not enough free disk for a checkpoint (need ~{need / 2**20:.0f} MiB, {free / 2**20:.0f} MiB free); "
            "free some space and run the same command again to resume from the last complete checkpoint"
        )


def checkpoint_estimate(trainable_params: int, previous: Path | None) -> int:
    """Bytes a checkpoint will take: the previous one's size, or adapter + 2 AdamW moments in fp32, plus margin."""
    if previous is not None and previous.is_dir():
        return int(dir_bytes(previous) * 1.1) + (8 << 20)
    return int(trainable_params * 4 * 3 * 1.2) + (16 << 20)


# --------------------------------------------------------------------------------------------------
# Checksums
# --------------------------------------------------------------------------------------------------


def sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_record(directory: Path, names=None) -> dict[str, list]:
    """{relative path: [size, sha256]} of the files under `directory` (or only those `names` that exist)."""
    directory = Path(directory)
    if names is None:
        files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MARKER)
    else:
        files = [directory / n for n in names if (directory / n).is_file()]
    return {str(p.relative_to(directory)): [p.stat().st_size, sha256(p)] for p in files}


def write_marker(checkpoint: Path, step: int) -> None:
    """The completeness marker: the step and each file's size and checksum, written last (atomically)."""
    tmp = checkpoint / (MARKER + ".tmp")
    tmp.write_text(json.dumps({"step": step, "files": file_record(checkpoint)}, indent=1) + "\n")
    tmp.replace(checkpoint / MARKER)


def write_manifest(run_dir: Path) -> None:
    """checksums.json of what inference will read from a finished run directory."""
    tmp = Path(run_dir) / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"files": file_record(run_dir, RUN_FILES)}, indent=1) + "\n")
    tmp.replace(Path(run_dir) / MANIFEST)


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a whole safetensors file (header unreadable, data shorter than the header says)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path.name}: {size} bytes, shorter than a safetensors header"
            n = int.from_bytes(head, "little")
            if n > size - 8:
                return f"{path.name}: header of {n} bytes in a file of {size} bytes (truncated)"
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        return f"{path.name}: unreadable safetensors header ({e})"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        return f"{path.name}: {size} bytes, the header needs {8 + n + end} (truncated)"
    return None


def check_files(directory: Path, record: dict[str, list] | None) -> str | None:
    """The first problem with `directory`'s files against `record` ({path: [size, sha256]}), or None.
    Without a record (older markers, merged models): a structural check of its safetensors files."""
    directory = Path(directory)
    if not record:
        for p in sorted(directory.glob("*.safetensors")):
            problem = safetensors_problem(p)
            if problem:
                return problem
        return None
    for rel, (size, digest) in record.items():
        p = directory / rel
        if not p.is_file():
            return f"{rel} is missing"
        if p.stat().st_size != size:
            return f"{rel} is {p.stat().st_size} bytes, {size} when written (truncated or replaced)"
        if sha256(p) != digest:
            return f"{rel} does not match its checksum (altered or corrupted)"
    return None


def verify(checkpoint: Path) -> str | None:
    """None if the checkpoint's files are as its marker recorded them; otherwise what is wrong."""
    try:
        marker = json.loads((checkpoint / MARKER).read_text())
    except ValueError:  # an older marker: the step number only
        marker = {}
    except OSError as e:
        return f"{MARKER} unreadable ({e.strerror})"
    return check_files(checkpoint, marker.get("files") if isinstance(marker, dict) else None)


def move_aside(checkpoint: Path) -> Path:
    """Move a damaged checkpoint to `checkpoints/damaged/` (a new name if one is there already)."""
    dest_dir = checkpoint.parent / DAMAGED
    dest_dir.mkdir(exist_ok=True)
    dest, i = dest_dir / checkpoint.name, 1
    while dest.exists():
        dest, i = dest_dir / f"{checkpoint.name}.{i}", i + 1
    checkpoint.replace(dest)
    return dest


def drop_damaged(root: str | Path) -> Path | None:
    """Verify complete checkpoints newest first; move the damaged ones aside (one line each) until an intact
    one is found. Returns the newest intact checkpoint (None: training starts from the beginning)."""
    for step, path in reversed(complete_checkpoints(root)):
        problem = verify(path)
        if problem is None:
            return path
        older = [p for s, p in complete_checkpoints(root) if s < step]
        moved = move_aside(path)
        log.warning("checkpoint-%d is damaged (%s): moved to %s; %s", step, problem, moved,
                    f"resuming from the newest intact one, {older[-1].name}" if older
                    else "no intact checkpoint is left: training starts from the beginning")
    return None


def verify_dir(run_dir: str | Path) -> None:
    """Stop with one line if a finished run directory's adapter or tokenizer is not as training wrote it."""
    run_dir = Path(run_dir)
    manifest = run_dir / MANIFEST
    record = None
    if manifest.is_file():
        try:
            record = json.loads(manifest.read_text()).get("files")
        except ValueError:
            raise UserError(f"{manifest}: unreadable; re-create the run with `loraforge train <recipe> --overwrite`") from None
    problem = check_files(run_dir, record)
    if problem:
        last = latest_complete(run_dir / CHECKPOINTS_DIR)
        hint = (f"; its last checkpoint {last} is there to resume from (remove {run_dir / 'train_summary.json'} "
                "and run the same train command)" if last and verify(last) is None
                else "; train again with `loraforge train <recipe> --overwrite`")
        raise UserError(f"{run_dir}: damaged: {problem}{hint}")
