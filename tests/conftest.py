"""Shared fixtures: the real DRIVE copy, a 2+2-image DRIVE in its real layout, and a script runner."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DRIVE = Path(os.environ.get("DRIVE_ROOT", REPO.parent / "shared" / "DRIVE"))


@pytest.fixture(scope="session")
def drive_root():
    if not (DRIVE / "training" / "images").is_dir():
        pytest.skip(f"DRIVE not found at {DRIVE} (set DRIVE_ROOT)")
    return DRIVE


@pytest.fixture(scope="session")
def small_drive(drive_root, tmp_path_factory):
    """Two training and two test images of the real DRIVE, copied in DRIVE's layout."""
    root = tmp_path_factory.mktemp("drive_small")
    picks = {"training": ["21", "22"], "test": ["01", "02"]}
    for split, numbers in picks.items():
        for number in numbers:
            files = [f"images/{number}_{split}.tif", f"1st_manual/{number}_manual1.gif"]
            if split == "test":
                files.append(f"mask/{number}_test_mask.gif")
            for relative in files:
                (root / split / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(drive_root / split / relative, root / split / relative)
    return root


def run_script(script, *args, cwd=REPO, env=None, timeout=600):
    """Run a top-level script as a user would; returns the CompletedProcess (text output)."""
    command = [sys.executable, str(REPO / script), *map(str, args)]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(command, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


# Small, fast settings for a real train -> test round trip on the CPU.
TINY = ["--image-size", "64", "--batch-size", "2", "--epochs", "2", "--pretrained", "none",
        "--visdom", "false", "--device", "cpu", "--log-every", "1"]
