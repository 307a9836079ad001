"""The versions of Python, loraforge and the libraries a run used (versions.json, the model card, `loraforge env`)."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

import loraforge

LIBRARIES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes", "pydantic", "gguf")


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "loraforge": loraforge.__version__}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out
