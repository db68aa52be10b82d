"""A rank's stop signals are the rank's alone (vltrain/engine/signals.py: shield_children).

Slurm sends USR1 and TERM to every process of a step, so the helpers a rank starts get them
too. Real ones here, in a process of its own session signalled as a whole as Slurm does it:
multiprocessing's resource tracker, Inductor's compile-worker sidecar (with its worker pool),
and a plain child (as Triton's ptxas or DeepSpeed's op build would be) survive both signals
and the pool still compiles; a child started inside ``children_take_stop_signals`` (the
caption scorers' Java) ends on USR1 as before. Without the shield the helpers die: the test
can fail. And a rank exiting with its verdict (69: the store did not answer) keeps that code
through the SIGTERM srun sends the step once a peer has failed.
"""
import json
import subprocess
import sys
import textwrap

import pytest

from tests.fixtures.corpus import REPO, script_env

SCRIPT = textwrap.dedent(r"""
    import json, os, signal, subprocess, sys, time
    from multiprocessing import resource_tracker
    from vltrain.engine.signals import STOP, children_take_stop_signals
    STOP.install()
    if sys.argv[1] == "shielded":
        STOP.shield_children()
    from torch._inductor import config
    from torch._inductor.async_compile import AsyncCompile
    config.compile_threads = 2                       # a sidecar even on a 1-core runner
    resource_tracker.ensure_running()
    pool = AsyncCompile.process_pool()
    tool = subprocess.Popen(["sleep", "120"])        # stands for ptxas / ninja
    with children_take_stop_signals():
        scorer = subprocess.Popen(["sleep", "120"])  # stands for the scorers' Java

    def alive(pid):
        try:
            return os.waitpid(pid, os.WNOHANG)[0] == 0
        except ChildProcessError:
            return False

    out = {}
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        STOP.signum = None
        os.killpg(0, sig)                            # every process of the session, as Slurm
        time.sleep(1.5)
        out[sig.name] = {"flag": STOP.signum == sig, "tracker": alive(resource_tracker._resource_tracker._pid),
                         "sidecar": pool.process.poll() is None, "tool": tool.poll() is None,
                         "scorer": scorer.poll()}
    try:
        out["compiles"] = pool.submit(sum, [1, 2]).result(timeout=120) == 3
    except Exception as e:
        out["compiles"] = f"{type(e).__name__}: {e}"
    for p in (tool, scorer):
        p.kill()
    print("RESULTS " + json.dumps(out), flush=True)
    os._exit(0)                                      # the sidecar may be dead: no shutdown wait
""")


def run(mode: str) -> dict:
    p = subprocess.run([sys.executable, "-c", SCRIPT, mode], cwd=REPO, env=script_env(), capture_output=True, text=True,
                       timeout=300, start_new_session=True)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULTS ")), None)
    assert line, (p.returncode, p.stdout[-2000:], p.stderr[-4000:])
    return json.loads(line[len("RESULTS "):]) | {"stderr": p.stderr}


@pytest.fixture(scope="module")
def shielded():
    return run("shielded")


def test_the_rank_takes_usr1_and_term_and_its_helpers_live_on(shielded):
    for sig in ("SIGUSR1", "SIGTERM"):
        got = shielded[sig]
        assert got["flag"] and got["tracker"] and got["sidecar"] and got["tool"], (sig, shielded)
    assert shielded["compiles"] is True, shielded
    assert "resource_tracker: process died" not in shielded["stderr"], shielded["stderr"][-3000:]


def test_children_started_to_take_the_signals_still_do(shielded):
    """The scorers' Java ends on USR1 (the validation is then repeated after the resume)."""
    assert shielded["SIGUSR1"]["scorer"] == -10, shielded


def test_without_the_shield_the_helpers_die():
    got = run("unshielded")
    usr1 = got["SIGUSR1"]
    assert usr1["flag"] and not usr1["tracker"] and not usr1["sidecar"] and not usr1["tool"], got
    assert got["compiles"] is not True, got


def test_ctrl_c_stops_a_run_with_one_line_not_tracebacks(synthetic_corpus, tmp_path):
    """A terminal's Ctrl-C: SIGINT to the whole process group (the rank and its DataLoader
    workers) mid-training. The rank exits 130 saying it saved nothing and how to go on; no
    traceback from it or its workers."""
    import os
    import signal
    import time
    from tests.fixtures.corpus import rank_env
    from vltrain.engine.distributed import free_port
    log = tmp_path / "rank0.log"
    args = ["--config", "configs/debug.yaml", f"output_root={tmp_path}", "data.val=", "train.log_every=1",
            f"data.train={synthetic_corpus}/captions/pretrain", f"data.cache_dir={tmp_path / 'cache'}",
            "train.max_steps=100000", "data.num_workers=1"]
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "vltrain/run.py", *args], cwd=REPO, env=rank_env(0, 1, free_port()),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while "step 2/" not in log.read_text():
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(60) == 130, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert "interrupted (SIGINT, Ctrl-C): stopped without a checkpoint" in text, text[-3000:]
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]


def test_a_rank_exiting_69_keeps_its_code_through_srun_s_sigterm(tmp_path):
    """The object store down: the rank exits 69 (requeue). srun ends the step with SIGTERM as
    soon as a peer that lost this rank exits 1; arriving while Python finalizes (seconds with
    torch loaded, default handlers again), it made the rank 143, and the batch script failed
    the job instead of requeueing it. SIGTERM sent every 50 ms from the exit line on."""
    import os
    import signal
    import time
    from tests.fixtures.corpus import rank_env
    from vltrain.engine.distributed import free_port
    log = tmp_path / "rank0.log"
    env = rank_env(0, 1, free_port(), S3_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}",
                   AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="s")
    args = ["--config", "configs/debug.yaml", f"output_root={tmp_path}", "data.val=", "data.train=s3://gone/x",
            f"data.cache_dir={tmp_path / 'cache'}", "data.download_retry=1"]
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "vltrain/run.py", *args], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while "exiting with 69" not in log.read_text():
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        while proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.05)
        assert proc.returncode == 69, (proc.returncode, log.read_text()[-3000:])
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)


def test_a_signal_during_the_start_ups_imports_is_kept():
    """run.py installs the handler before the slow start-up so that a preemption then is kept;
    the handler once imported torch.distributed to pick its log level, which, with the signal
    landing inside torch's own import, broke that import (a partially initialised module) or
    lost the signal. Signalled while `import deepspeed` runs, at two moments."""
    code = ("import os, subprocess, sys\nfrom vltrain.engine.signals import STOP\nSTOP.install()\n"
            "subprocess.Popen(['sh', '-c', f'sleep {sys.argv[1]}; kill -USR1 {os.getpid()}'])\n"
            "import deepspeed\nimport time\ntime.sleep(1.5)\nprint('REQUESTED', STOP.requested, flush=True)\n")
    for delay in ("0.2", "0.5"):
        p = subprocess.run([sys.executable, "-c", code, delay], cwd=REPO, env=script_env(), capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == 0 and "REQUESTED True" in p.stdout, (delay, p.stdout[-2000:], p.stderr[-3000:])
