"""Keep tokens and API keys out of logs, run directories and dumps.

The values of HF_TOKEN, WANDB_API_KEY and of every *_TOKEN, *_KEY, *_SECRET, *_PASSWORD environment
variable are replaced by `***` in whatever loraforge writes or logs. loraforge itself never copies
the environment anywhere; this is the second line of defence for messages of other libraries.
"""

from __future__ import annotations

import logging
import os
import re

_NAMES = re.compile(r"(^HF_TOKEN$|^WANDB_API_KEY$|_TOKEN$|_KEY$|_SECRET$|_PASSWORD$|^HUGGING_FACE_HUB_TOKEN$)")
MASK = "***"


def secret_values(environ=None) -> list[str]:
    env = os.environ if environ is None else environ
    # Very short values ("1", "true") are flags, not secrets; masking them would garble every log line.
    return sorted({v for k, v in env.items() if _NAMES.search(k.upper()) and len(v) >= 6}, key=len, reverse=True)


def redact(text: str, values: list[str] | None = None) -> str:
    for v in secret_values() if values is None else values:
        text = text.replace(v, MASK)
    return text


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        values = secret_values()
        if values:
            record.msg = redact(record.getMessage(), values)
            record.args = ()
        return True


def install_log_filter() -> None:
    """Redact secrets from every log record that reaches a handler of the root logger."""
    root = logging.getLogger()
    for handler in root.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
