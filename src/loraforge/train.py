"""The one training entry point every launcher runs: `python -m loraforge.train RECIPE [--set k=v ...]`.

Under `accelerate launch`, `torchrun` or `srun` each process runs this same file and computes the same plan
from the same inputs (run/session.py: the stages).
"""

from __future__ import annotations

import argparse
import sys

from loraforge.console import quiet_libraries, run_guarded
from loraforge.recipe import load_recipe
from loraforge.resources import find_recipe
from loraforge.run.session import run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loraforge.train", description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    quiet_libraries()
    code = run_guarded(lambda: run(load_recipe(find_recipe(args.recipe), args.overrides),
                                   overwrite=args.overwrite, quiet=args.quiet))
    if code == 0:
        from loraforge.run.preemption import teardown  # heavy (transformers); loaded by the run already

        teardown()  # barrier + destroy_process_group: no gloo abort at exit
    return code


if __name__ == "__main__":
    sys.exit(main())
