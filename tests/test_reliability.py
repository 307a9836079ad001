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

# Trains as `python -m loraforge.train` does, but waits before step 2 until the file argv[1] exists.
PAUSING = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from loraforge import trainer

    go = Path(sys.argv[1])
    base_factory = trainer.make_trainer_class

    def factory():
        base = base_factory()

        class Paused(base):
            def training_step(self, *args, **kwargs):
                if self.state.global_step == 1:
                    (go.parent / "paused").touch()
                    while not go.exists():
                        time.sleep(0.1)
                return super().training_step(*args, **kwargs)

        return Paused

    trainer.make_trainer_class = factory
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
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        _wait_for(tmp_path / "paused", first)  # the first run is training (step 1 done)
        second = subprocess.run([sys.executable, "-m", "loraforge", "train", str(recipe), "--quiet"],
                                capture_output=True, text=True, env=_env(), timeout=300)
        assert second.returncode == 2, second.stderr[-3000:]
        lines = [l for l in second.stderr.splitlines() if l.strip()]
        assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
        assert str(tmp_path / "run") in lines[0]
        assert f"pid {first.pid} on {socket.gethostname()} since" in lines[0]
    finally:
        go.touch()
        out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["steps"] == 4
    from safetensors.torch import load_file

    assert load_file(tmp_path / "run" / "adapter_model.safetensors")  # intact, loadable
    assert not (tmp_path / "run" / ".loraforge.lock").exists()


HOLDER = "import sys, time; from loraforge.runlock import acquire; acquire(sys.argv[1]); print('held', flush=True); time.sleep(600)"


def test_a_killed_holder_never_leaves_the_directory_locked(tmp_path):
    from loraforge.errors import UserError
    from loraforge.runlock import acquire, release

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
