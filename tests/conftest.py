"""Shared fixtures: the real DRIVE copy, a 2+2-image DRIVE in its real layout, and two script runners."""
import contextlib
import importlib.util
import io
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


@contextlib.contextmanager
def module_folder(tmp_path_factory, name):
    """A folder for a module-scoped fixture, removed when the module's tests are done (pytest keeps such folders
    to the end of the run, and a module's checkpoints can take half a gigabyte)."""
    folder = tmp_path_factory.mktemp(name)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run_script(script, *args, cwd=REPO, env=None, timeout=600):
    """Run a top-level script as a user would; returns the CompletedProcess (text output)."""
    command = [sys.executable, str(REPO / script), *map(str, args)]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(command, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def script_main(name):
    """The main() of a top-level script, loaded from its file (`import test` would find Python's own test package)."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", REPO / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def run_in_process(script, *args):
    """A top-level script run in this process as its `__main__` block runs it, cli.run(main): run_script's exit
    status and output without starting Python and torch again (seconds per call), for checks of what a script
    says about bad input. An exception cli.run does not turn into one line escapes, and fails the test."""
    import cli
    main_function = script_main(Path(script).stem)
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            cli.run(lambda: main_function([str(arg) for arg in args]))
            status = 0
        except SystemExit as exit_:
            status = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    return subprocess.CompletedProcess([script, *map(str, args)], status, stdout.getvalue(), stderr.getvalue())


# Small, fast settings for a real train -> test round trip on the CPU.
TINY = ["--image-size", "64", "--batch-size", "2", "--epochs", "2", "--pretrained", "none",
        "--visdom", "false", "--device", "cpu", "--log-every", "1"]
