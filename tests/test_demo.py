"""The README's demo command (`make demo` runs `python -m vltrain.demo`), at a smaller size."""
import os
import subprocess
import sys

import pytest

from tests.fixtures.corpus import REPO


def test_demo_runs_end_to_end(tmp_path):
    """As `make demo` runs it: the venv's python, the venv not activated, and another
    `deepspeed` first on PATH (conda's, ~/.local's); fewer steps than the recipe's warm-up."""
    foreign = tmp_path / "bin"
    foreign.mkdir()
    (foreign / "deepspeed").write_text("#!/bin/sh\necho foreign deepspeed >&2\nexit 3\n")
    (foreign / "deepspeed").chmod(0o755)
    env = dict(os.environ, PATH=str(foreign) + os.pathsep + os.environ["PATH"])
    r = subprocess.run([sys.executable, "-m", "vltrain.demo", "--out", str(tmp_path / "demo"), "--steps", "3",
                        "--images", "64"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "[3/3] done" in r.stdout
    # no multiprocessing resource-tracker report of streaming's shared memory (~15 lines per run)
    assert "resource_tracker" not in r.stdout + r.stderr, r.stderr[-3000:]
    run = tmp_path / "demo" / "runs" / "demo"
    assert (run / "checkpoints" / "step_00000003" / "vltrain_ckpt.json").is_file()
    assert f"tensorboard --logdir {run / 'tensorboard'}" in r.stdout
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


def test_demo_outside_its_checkout_says_so(tmp_path, monkeypatch):
    """Installed without its checkout (`pip install .`), the demo has no recipe to run: it says
    so before rendering anything (the same test as the config loader's hint)."""
    import vltrain.config
    from vltrain.demo import main
    monkeypatch.setattr(vltrain.config, "CHECKOUT", str(tmp_path))
    with pytest.raises(SystemExit, match=r"configs/demo.yaml of vltrain's git checkout, and .* is not one"):
        main(["--out", str(tmp_path / "demo")])
    assert not (tmp_path / "demo").exists()
