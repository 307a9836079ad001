"""Faults a user really meets: two runs on one directory, damaged checkpoints, inputs other tools write,
impossible measurements, drifting installs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from conftest import chat_records, recipe_dict, write_jsonl

TESTS = Path(__file__).parent
STATUS = __import__("re").compile(r"^\[loraforge\] +\d+\.\d s  ")  # a status line (status.stage)

# Trains as `python -m loraforge.train` does, but waits before step 2 until the file argv[1] exists.
PAUSING = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from loraforge.run import session

    go = Path(sys.argv[1])
    libraries = session.training_libraries

    def training_libraries():  # the trainer (heavy: trl) loads where loraforge loads it
        libs = libraries()

        class Paused(libs.trainer.LoraTrainer):
            def training_step(self, *args, **kwargs):
                if self.state.global_step == 1:
                    (go.parent / "paused").touch()
                    while not go.exists():
                        time.sleep(0.1)
                return super().training_step(*args, **kwargs)

        libs.trainer.LoraTrainer = Paused
        return libs

    session.training_libraries = training_libraries
    from loraforge.train import main
    sys.exit(main(sys.argv[2:]))
    """
)


def _env():
    return os.environ | {"PYTHONPATH": str(TESTS)}


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    end = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode}: {proc.communicate()[1][-3000:]}")
        assert time.time() < end, f"{path} never appeared"
        time.sleep(0.2)


@pytest.mark.slow  # two training processes
def test_second_run_on_a_locked_directory_stops_at_once(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "train.jsonl", chat_records(16))
    d = recipe_dict(tiny_model_dir, data, tmp_path / "run", training={"max_steps": 4, "save_steps": 2})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(d))
    (tmp_path / "driver.py").write_text(PAUSING)
    go = tmp_path / "go"
    first = subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), str(go), str(recipe), "--quiet"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=_env() | {"MPLCONFIGDIR": str(tmp_path / "mpl")})  # a fresh font cache is built
    try:
        _wait_for(tmp_path / "paused", first)  # the first run is training (step 1 done)
        second = subprocess.run([sys.executable, "-m", "loraforge", "train", str(recipe), "--quiet"],
                                capture_output=True, text=True, env=_env(), timeout=300)
        assert second.returncode == 2, second.stderr[-3000:]
        lines = [l for l in second.stderr.splitlines() if l.strip() and not STATUS.match(l)]
        assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
        assert "reading" not in second.stderr  # stopped before any work
        assert str(tmp_path / "run") in lines[0]
        assert f"pid {first.pid} on {socket.gethostname()} since" in lines[0]
    finally:
        go.touch()
        out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    # quiet, honest output: a status line per stage from the first second, no library noise
    status = [l for l in err.splitlines() if STATUS.match(l)]
    assert float(status[0].split()[1]) < 5 and "loading libraries" in status[0], err[:2000]
    for what in ("libraries loaded (torch", "reading and tokenizing", "loading the model", "building the trainer",
                 "training", "training done"):
        assert any(what in l for l in status), (what, status)
    for noise in ("fontManager", "Setting accelerator to CPU", "Traceback"):
        assert noise not in err, err[-3000:]
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["steps"] == 4
    from safetensors.torch import load_file

    assert load_file(tmp_path / "run" / "adapter_model.safetensors")  # intact, loadable
    assert not (tmp_path / "run" / ".loraforge.lock").exists()


HOLDER = "import sys, time; from loraforge.run.runlock import acquire; acquire(sys.argv[1]); print('held', flush=True); time.sleep(600)"


def test_a_killed_holder_never_leaves_the_directory_locked(tmp_path):
    from loraforge.errors import UserError
    from loraforge.run.runlock import acquire, release

    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=rf"{run_dir}: another loraforge run .*pid {holder.pid} on "):
            acquire(run_dir)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = acquire(run_dir)  # the kernel dropped the dead holder's lock: no stale lock to clear by hand
    release(lock)
    assert list(run_dir.iterdir()) == []  # the lock file goes with the lock


@pytest.mark.parametrize("case", ["file", "parent-file", "read-only"])
def test_output_dir_problems_are_one_line_before_any_work(tmp_path, tiny_model_dir, case):
    from typer.testing import CliRunner

    from loraforge.cli import app

    data = write_jsonl(tmp_path / "train.jsonl", chat_records(8))
    if case == "file":
        out = tmp_path / "out"
        out.write_text("x")
        expect = "is an existing file"
    elif case == "parent-file":
        (tmp_path / "f").write_text("x")
        out = tmp_path / "f" / "run"
        expect = "is a file"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes anywhere")
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        out = ro / "run"
        expect = "permission denied"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict(tiny_model_dir, data, out)))
    res = CliRunner().invoke(app, ["train", str(recipe), "--quiet"])
    assert res.exit_code == 2, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert "output_dir" in res.output and expect in res.output
    if case == "file":
        assert out.read_text() == "x"
    elif case == "read-only":
        assert list(ro.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# Verified checkpoints
# --------------------------------------------------------------------------------------------------


def _ckpt_recipe(tmp: Path, model_dir: Path, name: str):
    from loraforge.recipe import load_recipe

    data = tmp / "train.jsonl"
    if not data.exists():
        write_jsonl(data, chat_records(32))
    d = recipe_dict(model_dir, data, tmp / name, training={
        "max_steps": 8, "save_steps": 2, "save_total_limit": 3, "global_batch_size": 4, "micro_batch_size": 2,
        "learning_rate": 1e-2, "lr_scheduler": "cosine", "warmup": 1})
    d["lora"]["dropout"] = 0.1
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(d))
    return load_recipe(path)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir):
    """An uninterrupted run of 8 steps with checkpoints 4, 6 and 8 kept."""
    from loraforge.run.session import run

    tmp = tmp_path_factory.mktemp("verified")
    recipe = _ckpt_recipe(tmp, tiny_model_dir, "reference")
    run(recipe, quiet=True)
    return tmp, Path(recipe.output_dir)


def _adapter(run_dir: Path):
    from safetensors.torch import load_file

    return load_file(run_dir / "adapter_model.safetensors")


@pytest.mark.parametrize("damaged_file", ["adapter_model.safetensors",
                                          pytest.param("optimizer.pt", marks=pytest.mark.slow)])
def test_truncated_checkpoint_falls_back_to_the_newest_intact_one(finished, tiny_model_dir, damaged_file, caplog):
    """A crash after checkpoint-6, then its file truncated (a full disk, a bad copy): resume moves it aside
    with one line, resumes from checkpoint-4, and ends with the adapter of the uninterrupted run."""
    import shutil

    from loraforge.checkpoints import complete_checkpoints, verify
    from loraforge.recipe import dump_recipe
    from loraforge.run.session import run

    tmp, reference = finished
    name = f"crashed-{damaged_file.split('.')[0]}"
    recipe = _ckpt_recipe(tmp, tiny_model_dir, name)
    run_dir = Path(recipe.output_dir)
    ckpts = run_dir / "checkpoints"
    ckpts.mkdir(parents=True)
    for step in (4, 6):  # the state a crash during step 7 leaves
        shutil.copytree(reference / "checkpoints" / f"checkpoint-{step}", ckpts / f"checkpoint-{step}")
    (run_dir / "recipe.yaml").write_text(dump_recipe(recipe))
    victim = ckpts / "checkpoint-6" / damaged_file
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    assert "truncated" in verify(ckpts / "checkpoint-6")

    with caplog.at_level("INFO", logger="loraforge"):
        result = run(recipe, quiet=True)
    lines = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(lines) == 1 and "checkpoint-6 is damaged" in lines[0] and damaged_file in lines[0]
    assert "resuming from the newest intact one, checkpoint-4" in lines[0]
    assert (ckpts / "damaged" / "checkpoint-6" / damaged_file).is_file()  # moved aside, not deleted
    assert result.trained and result.steps == 8
    assert [s for s, _ in complete_checkpoints(ckpts)] == [4, 6, 8]
    got, expected = _adapter(run_dir), _adapter(reference)
    diff = max((got[k] - expected[k]).abs().max().item() for k in got)
    assert diff <= 1e-5, f"adapter after the fallback differs from the uninterrupted run by {diff}"


@pytest.mark.parametrize("command", ["eval", "merge", "export", "generate"])
def test_damaged_run_directory_is_refused_before_use(finished, tmp_path, command):
    import shutil

    from typer.testing import CliRunner

    from loraforge.cli import app

    _, reference = finished
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir, ignore=shutil.ignore_patterns("checkpoints"))
    adapter = run_dir / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:-100])
    args = {"eval": ["eval", str(run_dir)], "merge": ["merge", str(run_dir), "--out", str(tmp_path / "m")],
            "export": ["export", str(run_dir), "--gguf", "--out", str(tmp_path / "m.gguf")],
            "generate": ["generate", str(run_dir), "--prompt", "hi"]}[command]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert f"{run_dir}: damaged: adapter_model.safetensors is" in res.output and "truncated" in res.output
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.gguf").exists()


# --------------------------------------------------------------------------------------------------
# Inputs other tools write; paths
# --------------------------------------------------------------------------------------------------

ROWS = chat_records(8)
LINES = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS)
ENCODED = {
    "utf-8 BOM": ("data.jsonl", b"\xef\xbb\xbf" + LINES.encode()),
    "CRLF": ("data.jsonl", LINES.replace("\n", "\r\n").encode()),
    "JSON array in .jsonl": ("data.jsonl", json.dumps(ROWS, indent=2).encode()),
    "JSON array, BOM + CRLF": ("data.json", b"\xef\xbb\xbf" + json.dumps(ROWS, indent=2).replace("\n", "\r\n").encode()),
    "JSON lines in .json": ("data.json", LINES.encode()),
    "UTF-16 LE BOM": ("data.jsonl", LINES.replace("\n", "\r\n").encode("utf-16")),
    "UTF-16 BE BOM": ("data.json", b"\xfe\xff" + json.dumps(ROWS).encode("utf-16-be")),
}


@pytest.mark.parametrize("case", list(ENCODED))
def test_files_other_tools_write_are_read(tmp_path, case):
    from loraforge.data.dataset import read_source
    from loraforge.recipe import DataSource

    name, raw = ENCODED[case]
    (tmp_path / name).write_bytes(raw)
    records = read_source(DataSource(path=str(tmp_path / name)))
    assert [r.row for r in records] == ROWS


def _cli(args):
    from typer.testing import CliRunner

    from loraforge.cli import app

    return CliRunner().invoke(app, args)


def _one_line_exit_2(res, *expect):
    assert res.exit_code == 2, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    for e in expect:
        assert e in lines[0], lines[0]


def test_utf16_data_trains_through_the_cli(tmp_path, tiny_model_dir):
    name, raw = ENCODED["UTF-16 LE BOM"]
    (tmp_path / name).write_bytes(raw)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict(tiny_model_dir, tmp_path / name, tmp_path / "run",
                                                 training={"max_steps": 1})))
    res = _cli(["train", str(recipe), "--quiet"])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["steps"] == 1


BAD = {
    "UTF-16 without BOM": (LINES.encode("utf-16-le"), ["data.jsonl:1: NUL bytes without a byte-order mark", "UTF-8"]),
    "latin-1": ((LINES.splitlines()[0] + "\n" + '{"text": "caf\xe9"}\n').encode("latin-1"), ["data.jsonl:2: not UTF-8"]),
    "truncated JSON array": (json.dumps(ROWS, indent=2)[:-40].encode(), ["data.jsonl:", "not valid JSON"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_unreadable_encodings_are_one_line_naming_file_and_line(tmp_path, tiny_model_dir, case):
    raw, expect = BAD[case]
    (tmp_path / "data.jsonl").write_bytes(raw)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict(tiny_model_dir, tmp_path / "data.jsonl", tmp_path / "run")))
    _one_line_exit_2(_cli(["train", str(recipe), "--quiet"]), *expect)
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_a_data_path_or_recipe_path_that_is_a_directory(tmp_path, tiny_model_dir):
    (tmp_path / "data").mkdir()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict(tiny_model_dir, tmp_path / "data", tmp_path / "run")))
    _one_line_exit_2(_cli(["train", str(recipe), "--quiet"]), "data.sources[].path:", "is a directory")
    assert not (tmp_path / "run").exists()
    _one_line_exit_2(_cli(["train", str(tmp_path), "--quiet"]), f"{tmp_path}: is a directory", "r.yaml")


# --------------------------------------------------------------------------------------------------
# Measured numbers that cannot be true
# --------------------------------------------------------------------------------------------------


def test_peak_is_the_best_of_several_measurements(monkeypatch):
    from loraforge.plan import flops

    monkeypatch.setattr(flops, "_best_cpu_peak", 0.0)
    readings = iter([2e9, 9e9, 3e9])  # the machine was busy during the first and last measurement
    assert flops.robust_cpu_peak(rounds=3, pause_s=0, measure=lambda: next(readings)) == 9e9
    assert flops.robust_cpu_peak(rounds=1, measure=lambda: 1e9) == 9e9  # a later busy reading never lowers it


def test_mfu_never_above_100_percent_under_a_busy_peak(make_recipe, monkeypatch):
    from loraforge.cli import _print_result, console
    from loraforge.plan import flops
    from loraforge.recipe import load_recipe
    from loraforge.run.session import run

    monkeypatch.setattr(flops, "_best_cpu_peak", 0.0)
    monkeypatch.setattr(flops, "measure_cpu_matmul_peak", lambda: 1e3)  # measured while other work held the cores
    result = run(load_recipe(make_recipe(training={"max_steps": 2})), quiet=True)
    assert result.mfu is None and "uncertain" in result.peak_source
    summary = json.loads((result.run_dir / "train_summary.json").read_text())
    assert summary["mfu"] is None and "uncertain" in summary["peak_source"]
    with console.capture() as cap:
        _print_result(result)
    text = cap.get()
    assert "MFU" in text and "not reported" in text and "%" not in text.split("MFU", 1)[1].split("\n")[0].split(";")[0]
    monkeypatch.setattr(flops, "measure_cpu_matmul_peak", lambda: 1e15)  # an idle, honest peak
    assert flops.checked_mfu(result.tokens_per_second, result.flops_per_token, flops.robust_cpu_peak(), 1, "x")[0] <= 1


# --------------------------------------------------------------------------------------------------
# The same install, every time
# --------------------------------------------------------------------------------------------------


@pytest.mark.skipif(os.environ.get("LORAFORGE_UNPINNED") == "1", reason="installed unpinned on purpose")
def test_installed_versions_equal_the_constraints():
    import constraints_check

    assert len(constraints_check.pins()) >= 20
    assert constraints_check.differences() == {}, (
        "installed versions differ from constraints.txt (bash install.sh installs them; to move to newer ones "
        "see the README's 'Updating the tested versions')")


def test_install_uses_the_constraints_and_pyproject_allows_them():
    import tomllib

    import constraints_check
    from packaging.requirements import Requirement

    script = (constraints_check.CONSTRAINTS.parent / "install.sh").read_text()
    assert "-c constraints.txt" in script and "LORAFORGE_UNPINNED" in script
    project = tomllib.loads((constraints_check.CONSTRAINTS.parent / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"] + sum(project["optional-dependencies"].values(), [])]
    pins = {k.lower(): v for k, v in constraints_check.pins().items()}
    for req in reqs:
        assert req.name.lower() in pins, f"{req.name} has no pin in constraints.txt"
        assert req.specifier.contains(pins[req.name.lower()]), f"pyproject.toml's {req} excludes the pin"


# --------------------------------------------------------------------------------------------------
# Large inputs: streamed in bounded memory
# --------------------------------------------------------------------------------------------------

# Reads, tokenizes and builds the training rows of a small file and then of a file 5x larger in one
# process; prints the peak of Python's heap and of Arrow's memory pool during each (the memory-mapped
# data files, which the kernel can drop, are in neither).
BOUNDED = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    import conftest
    from loraforge.data.dataset import scan_data, tokenized_data, training_rows
    from loraforge.plan.planner import truncation_report
    from loraforge.recipe import recipe_from_dict

    # Python's own heap (tracemalloc) and Arrow's pool, counted by the allocators themselves: the same
    # figures on a busy machine as on an idle one (a sampled RSS misses short peaks when the CPU is loaded).
    import tracemalloc
    import pyarrow as pa
    tracemalloc.start()
    def peak():
        return tracemalloc.get_traced_memory()[1], pa.default_memory_pool().max_memory()
    tok, work = conftest._train_tokenizer(), Path(sys.argv[2])
    text = "The quick brown fox jumps over the lazy dog. " * 48
    def run(n, name):
        path = work / name
        with open(path, "w") as f:
            f.write(json.dumps({"text": text * 100}) + "\\n")  # one very long record
            for i in range(n):
                f.write(json.dumps({"text": f"{i} {text}"}) + "\\n")
        r = recipe_from_dict(conftest.recipe_dict(work, path, work / "run"))
        train, _, lengths = tokenized_data(r, tok, scan_data(r), write_cache=False)
        rows, _ = training_rows(train, 4096)
        return path.stat().st_size, len(rows), truncation_report(lengths, 4096)[0]
    run(800, "warm.jsonl")  # first calls allocate what every later one reuses
    tracemalloc.reset_peak()
    small = run(800, "small.jsonl")
    py_small, arrow_small = peak()
    tracemalloc.reset_peak()
    large = run(4000, "large.jsonl")
    py_large, arrow_large = peak()
    print(json.dumps({"small": small, "large": large, "python": [py_small, py_large],
                      "arrow": [arrow_small, arrow_large]}))
    """
)


@pytest.mark.slow  # tokenizes ~15 MB
def test_large_input_is_streamed_in_bounded_memory(tmp_path):
    proc = subprocess.run([sys.executable, "-c", BOUNDED, str(TESTS), str(tmp_path)], capture_output=True, text=True,
                          timeout=900, env=_env() | {"LORAFORGE_NO_DATA_CACHE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    (small_bytes, small_rows, small_cut), (large_bytes, large_rows, large_cut) = out["small"], out["large"]
    assert small_rows == 801 and large_rows == 4001 and small_cut == large_cut == 1  # the long record: truncated
    added = large_bytes - small_bytes
    # Reading it all into Python objects (records, normalised copies, token lists) costs several times the
    # file; streamed, the larger file adds a few integers per record.
    for heap in ("python", "arrow"):
        growth = out[heap][1] - out[heap][0]
        assert growth < 0.1 * added, f"{heap} peak grew {growth / 2**20:.1f} MiB for {added / 2**20:.1f} MiB more data"


def test_long_passes_show_progress(caplog):
    from loraforge.data.dataset import Progress

    p = Progress("reading the data", every_s=0)
    with caplog.at_level("INFO", logger="loraforge"):
        for _ in range(512):
            p.tick()
    assert any("reading the data: 512 records" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("case", ["read-only (simulated)", "disk full (simulated)"])
def test_unwritable_or_full_output_location_is_one_line(tmp_path, tiny_model_dir, monkeypatch, case):
    """The same checks as above where the test runs as root (permissions do not stop root) or on a disk
    with room: the OS answers are simulated, the code path is the real one."""
    from pathlib import Path as P

    from loraforge import checkpoints

    out = tmp_path / "parent" / "run"
    if case.startswith("read-only"):
        real_mkdir = P.mkdir

        def mkdir(self, *a, **k):
            if str(self).startswith(str(tmp_path / "parent")):
                raise PermissionError(13, "Permission denied")
            return real_mkdir(self, *a, **k)

        monkeypatch.setattr(P, "mkdir", mkdir)
        expect = "permission denied"
    else:
        monkeypatch.setattr(checkpoints, "free_bytes", lambda p: 1024)
        expect = "No space left on device"
    data = write_jsonl(tmp_path / "train.jsonl", chat_records(8))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict(tiny_model_dir, data, out)))
    _one_line_exit_2(_cli(["train", str(recipe), "--quiet"]), "output_dir", expect)
    assert not out.exists()
