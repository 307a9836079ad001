"""Nothing lost: killed runs resume to the same adapter; checkpoints are crash-safe; NaN stops cleanly."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from conftest import chat_records, recipe_dict, write_jsonl
from safetensors.torch import load_file

from loraforge.checkpoints import MARKER, STAGING, complete_checkpoints
from loraforge.errors import UserError
from loraforge.recipe import load_recipe

# Kills the training process with SIGKILL at a chosen point, then lets loraforge.train run as usual; the SFT
# trainer and the preference (DPO / ORPO) trainer alike.
DRIVER = textwrap.dedent(
    """
    import os, signal, sys
    from loraforge.run import session

    point, at = sys.argv[1], int(sys.argv[2])
    libraries = session.training_libraries

    def killed(trainer_cls):
        class Killed(trainer_cls):
            def training_step(self, *args, **kwargs):
                if point == "between-steps" and self.state.global_step == at:
                    os.kill(os.getpid(), signal.SIGKILL)
                out = super().training_step(*args, **kwargs)  # forward + backward done, no optimizer step yet
                if point == "mid-step" and self.state.global_step == at:
                    os.kill(os.getpid(), signal.SIGKILL)
                return out

            def _save_optimizer_and_scheduler(self, output_dir):
                if point == "mid-checkpoint" and self.state.global_step == at:
                    os.kill(os.getpid(), signal.SIGKILL)  # adapter written, optimizer not yet
                return super()._save_optimizer_and_scheduler(output_dir)

        return Killed

    def training_libraries():  # the trainer (heavy: trl) loads where loraforge loads it
        libs = libraries()
        libs.trainer.LoraTrainer = killed(libs.trainer.LoraTrainer)
        libs.preference.PreferenceTrainer = killed(libs.preference.PreferenceTrainer)
        return libs

    session.training_libraries = training_libraries
    from loraforge.train import main
    sys.exit(main(sys.argv[3:]))
    """
)


def _recipe(tmp: Path, model_dir: Path, name: str, **training) -> Path:
    data = tmp / "train.jsonl"
    if not data.exists():
        write_jsonl(data, chat_records(32))
    d = recipe_dict(model_dir, data, tmp / name, training={
        "max_steps": 8, "save_steps": 2, "save_total_limit": 2, "global_batch_size": 4, "micro_batch_size": 2,
        "learning_rate": 1e-2, "lr_scheduler": "cosine", "warmup": 1, **training,
    })
    d["lora"]["dropout"] = 0.1  # RNG state must be restored too
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def _train(tmp: Path, recipe: Path, point: str = "none", at: int = -1) -> subprocess.CompletedProcess:
    (tmp / "driver.py").write_text(DRIVER)
    env = os.environ | {"PYTHONPATH": str(Path(__file__).parent)}
    return subprocess.run([sys.executable, str(tmp / "driver.py"), point, str(at), str(recipe), "--quiet"],
                          capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("resume")
    proc = _train(tmp, _recipe(tmp, tiny_model_dir, "reference"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, load_file(tmp / "reference" / "adapter_model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("point, at", [("mid-step", 5), ("mid-checkpoint", 4), ("between-steps", 3)])
def test_killed_run_resumes_to_the_same_adapter(reference, tiny_model_dir, point, at):
    tmp, expected = reference
    recipe = _recipe(tmp, tiny_model_dir, f"killed-{point}")
    run_dir = tmp / f"killed-{point}"

    killed = _train(tmp, recipe, point, at)
    assert killed.returncode == -9, killed.stderr[-3000:]  # really SIGKILLed
    assert not (run_dir / "train_summary.json").exists()
    ckpts = run_dir / "checkpoints"
    if point == "mid-checkpoint":
        assert (ckpts / STAGING).is_dir()  # a half-written checkpoint was left behind ...
        assert [s for s, _ in complete_checkpoints(ckpts)] == [2]  # ... but never counts as one

    resumed = _train(tmp, recipe)  # the same command again
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr
    assert not (ckpts / STAGING).exists()
    assert [s for s, _ in complete_checkpoints(ckpts)] == [6, 8]  # save_total_limit 2
    got = load_file(run_dir / "adapter_model.safetensors")
    assert got.keys() == expected.keys()
    diff = max((got[k] - expected[k]).abs().max().item() for k in got)
    assert diff <= 1e-5, f"resumed adapter differs by {diff}"
    assert any(got[k].abs().max() > 0 for k in got if "lora_B" in k)  # it really trained


def _inprocess_recipe(make_recipe, **training):
    return load_recipe(make_recipe(training={
        "max_steps": 6, "save_steps": 2, "global_batch_size": 4, "learning_rate": 1e-2, **training,
    }))


def test_disk_full_keeps_previous_checkpoint(make_recipe, monkeypatch):
    from loraforge import checkpoints
    from loraforge.run.session import run

    recipe = _inprocess_recipe(make_recipe)
    ckpts = Path(recipe.output_dir) / "checkpoints"
    real_free = checkpoints.free_bytes
    monkeypatch.setattr(checkpoints, "free_bytes", lambda p: real_free(p) if not (ckpts / "checkpoint-2").exists() else 1024)
    with pytest.raises(UserError, match=r"not enough free disk for a checkpoint .* run the same command again"):
        run(recipe, quiet=True)
    assert [s for s, _ in complete_checkpoints(ckpts)] == [2]
    assert (ckpts / "checkpoint-2" / MARKER).is_file() and not (ckpts / STAGING).exists()

    monkeypatch.setattr(checkpoints, "free_bytes", real_free)  # space freed: the same command resumes
    result = run(recipe, quiet=True)
    assert result.trained and result.steps == 6


def _nan_at(monkeypatch, step: int):
    from harness.nan_trainer import nan_at

    from loraforge.run import trainer

    monkeypatch.setattr(trainer, "LoraTrainer", nan_at(step))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(make_recipe, monkeypatch):
    from loraforge.run.session import run

    _nan_at(monkeypatch, 3)
    recipe = _inprocess_recipe(make_recipe)
    with pytest.raises(UserError, match=r"step 3: the loss or gradients became NaN/inf .* last good checkpoint is .*checkpoint-2"):
        run(recipe, quiet=True)
    ckpts = Path(recipe.output_dir) / "checkpoints"
    assert [s for s, _ in complete_checkpoints(ckpts)] == [2]
    weights = load_file(ckpts / "checkpoint-2" / "adapter_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_nan_loss_can_be_skipped(make_recipe, monkeypatch):
    from loraforge.run.session import run

    _nan_at(monkeypatch, 3)
    recipe = _inprocess_recipe(make_recipe, on_nonfinite="skip", max_skipped_steps=2)
    result = run(recipe, quiet=True)
    assert result.trained and result.steps == 6
    weights = load_file(Path(recipe.output_dir) / "adapter_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
