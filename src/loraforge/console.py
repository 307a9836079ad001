"""What both entry points (`loraforge`, `python -m loraforge.train`) do around a command: quiet the libraries,
and turn a user error into one line on stderr and exit code 2 (no traceback)."""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable

from rich.console import Console

from loraforge.errors import UserError
from loraforge.model.quant import silence_cpu_kernel_notice
from loraforge.redact import install_log_filter
from loraforge.run.status import IMPORTS, silence_noise, stage, timed_import

err_console = Console(stderr=True)


def quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("MPLBACKEND", "Agg")  # plots are files; no GUI backend probing
    logging.basicConfig(level=logging.INFO, format="[loraforge] %(message)s")
    install_log_filter()
    silence_noise()
    silence_cpu_kernel_notice()  # before anything imports bitsandbytes (peft does); see quant.py
    for name in ("transformers", "datasets", "peft", "trl", "accelerate", "httpx", "urllib3", "DeepSpeed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    cold = "transformers" not in sys.modules
    if cold:
        stage("loading libraries (torch, transformers, datasets: the first start on a machine takes longest)")
    try:
        timed_import("torch")
        transformers = timed_import("transformers")
        datasets = timed_import("datasets")
        if cold:
            stage("libraries loaded (" + ", ".join(f"{k} {v:.1f} s" for k, v in IMPORTS.items()) + ")")

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:
        pass
    import warnings

    warnings.filterwarnings("ignore")


def run_guarded(fn: Callable[[], object]) -> int:
    """Run `fn`; a UserError prints one line and returns exit code 2 (no traceback)."""
    try:
        fn()
    except UserError as e:
        err_console.print(f"[bold red]error:[/] {e.message}", highlight=False, soft_wrap=True)
        return e.exit_code
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    return 0
