"""An installed wheel carries the recipes, accelerate configs and launch scripts users copy."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_ships_recipes_and_configs(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel = next(tmp_path.glob("loraforge-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "loraforge/_data/recipes/quickstart.yaml" in names
    assert "loraforge/_data/recipes/data/identity.jsonl" in names
    assert "loraforge/_data/accelerate_configs/ddp.yaml" in names
    assert "loraforge/_data/launch/train.sh" in names
    assert "loraforge/cli.py" in names

    # Installed (not editable) into a separate target, the lookup finds the packaged copies.
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, timeout=600)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from loraforge.resources import find_recipe, shipped_dir;"
        "print(find_recipe('quickstart')); print(shipped_dir('accelerate_configs'))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, cwd=tmp_path,
                         check=True).stdout.split()
    assert out[0] == str(target / "loraforge" / "_data" / "recipes" / "quickstart.yaml")
    assert Path(out[1]).is_dir()
