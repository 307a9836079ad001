"""Installed versions against constraints.txt. `python tests/constraints_check.py` lists the differences;
`--write` rewrites the pins from this environment (after the suite passed with it)."""

from __future__ import annotations

import re
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

CONSTRAINTS = Path(__file__).resolve().parents[1] / "constraints.txt"
_PIN = re.compile(r"^([A-Za-z0-9_.-]+)==([^\s#;]+)")


def pins(text: str | None = None) -> dict[str, str]:
    text = CONSTRAINTS.read_text() if text is None else text
    return {m.group(1): m.group(2) for line in text.splitlines() if (m := _PIN.match(line.strip()))}


def installed(name: str) -> str | None:
    try:
        return version(name).split("+")[0]  # torch 2.13.0+cpu / +cu128: the same release
    except PackageNotFoundError:
        return None


def differences() -> dict[str, tuple[str, str | None]]:
    return {n: (v, installed(n)) for n, v in pins().items() if installed(n) != v}


if __name__ == "__main__":
    if "--write" in sys.argv:
        text = CONSTRAINTS.read_text()
        for name in pins():
            now = installed(name)
            if now:
                text = re.sub(rf"(?m)^{re.escape(name)}==\S+", f"{name}=={now}", text)
        CONSTRAINTS.write_text(text)
    for name, (want, got) in differences().items():
        print(f"{name}: constraints.txt {want}, installed {got or 'nothing'}")
