"""The local Slurm cluster (slurm/local_cluster.sh) is a real two-node cluster, and the
requeue mechanics the sbatch templates rely on work on it: USR1 reaches the batch
script, `scontrol requeue` puts the job back, and the second run appends to the log."""
import functools
import os
import re
import sys
import time

import pytest
from tests.fixtures.slurm import wait_for

pytestmark = pytest.mark.slow


_wait_for = functools.partial(wait_for, poll=0.2)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cluster_has_two_idle_nodes(slurm_cluster):
    out = slurm_cluster.run(["sinfo", "-h", "-N", "-o", "%N %T"]).stdout
    states = dict(line.split() for line in out.splitlines() if line.strip())
    assert set(states) == {"node1", "node2"}
    assert all(s in {"idle", "mixed", "allocated", "completing"} for s in states.values()), states


# vltrain's Slurm mapping on what Slurm really sets: each srun task is a rank of a 2-rank
# world; the batch script itself (SLURM_PROCID=0, SLURM_NTASKS=2, no step) is refused.
MAPPING = ("import os; from vltrain.engine.distributed import setup_env; i = setup_env(); "
           "print('mapped rank', i.rank, 'world', i.world, 'master', os.environ['MASTER_ADDR'])")
TWO_NODE_JOB = """#!/bin/bash
echo "batch on $SLURMD_NODENAME job=$SLURM_JOB_ID nodes=$SLURM_JOB_NODELIST ntasks=$SLURM_NTASKS"
srun bash -c 'echo "task procid=$SLURM_PROCID node=$SLURMD_NODENAME host=$(hostname -s)"'
cd {root}
{python} -c "{mapping}" 2>&1 | tail -1
srun {python} -c "{mapping}"
"""


def test_two_node_job_runs_one_task_per_node(slurm_cluster, tmp_path):
    script = tmp_path / "two_nodes.sh"
    script.write_text(TWO_NODE_JOB.format(python=sys.executable, root=ROOT, mapping=MAPPING))
    log = tmp_path / "two_nodes.out"
    res = slurm_cluster.run(["sbatch", "--parsable", "--wait", "--nodes=2", "--ntasks-per-node=1",
                             "--time=2", f"--output={log}", str(script)], cwd=tmp_path, timeout=90)
    jobid = res.stdout.strip().split(";")[0]
    text = log.read_text()
    assert res.returncode == 0, text
    assert f"job={jobid} nodes=node[1-2] ntasks=2" in text, text
    tasks = set(re.findall(r"task procid=(\d+) node=(\S+)", text))
    assert tasks == {("0", "node1"), ("1", "node2")}, text
    info = slurm_cluster.job(jobid)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", info
    assert f"RuntimeError: this process runs in Slurm job {jobid} of SLURM_NTASKS=2 tasks but is not one" in text, text
    assert sorted(re.findall(r"mapped rank (\d) world (\d) master (\S+)", text)) == \
        [("0", "2", "node1"), ("1", "2", "node1")], text


# First run: wait for USR1 (as the templates' training processes do before a preemption),
# then requeue the job itself. Second run (SLURM_RESTART_COUNT=1): finish normally.
REQUEUE_JOB = """#!/bin/bash
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --nodes=1
#SBATCH --time=5
RUN=${SLURM_RESTART_COUNT:-0}
echo "run=$RUN start job=$SLURM_JOB_ID node=$SLURMD_NODENAME"
if [ "$RUN" = 0 ]; then
    got_usr1=0
    trap 'got_usr1=1' USR1
    echo "run=$RUN waiting for USR1"
    sleep 120 &
    wait $!                      # returns as soon as the trap runs
    kill $! 2>/dev/null
    [ "$got_usr1" = 1 ] || { echo "run=$RUN no USR1"; exit 3; }
    echo "run=$RUN got USR1, requeueing"
    scontrol requeue "$SLURM_JOB_ID"
    echo "run=$RUN requeue rc=$?"
    exit 0
fi
echo "run=$RUN done"
"""


def test_usr1_then_requeue_runs_the_job_again(slurm_cluster, tmp_path):
    script = tmp_path / "requeue.sh"
    script.write_text(REQUEUE_JOB)
    log = tmp_path / "requeue.out"
    jobid = slurm_cluster.sbatch([f"--output={log}", str(script)], cwd=tmp_path)
    read = lambda: log.read_text() if log.exists() else ""  # noqa: E731

    _wait_for(lambda: "run=0 waiting for USR1" in read(), 60, "the first run to set its trap")
    slurm_cluster.run(["scancel", "--signal=USR1", "--batch", jobid])
    _wait_for(lambda: "run=0 requeue rc=0" in read(), 30, f"the requeue\n{read()}")

    # Slurm holds a requeued job back (BeginTime, ~cred_expire = 120 s): start it sooner, but
    # a moment past the revocation's second. A node refuses a relaunch whose credential is not
    # newer than the revoked one ("Killing non-startable batch JobId=2: Job credential
    # revoked", seen in CI when the update came 0.2 s after the requeue), as
    # test_slurm_jobs.Job.start_requeued waits too. `scontrol update` is refused until the
    # first run has finished completing.
    def requeued():
        info = slurm_cluster.job(jobid)
        return info.get("JobState") == "PENDING" and info.get("Restarts") == "1"
    _wait_for(requeued, 60, "the job to be pending again after its requeue", poll=0.5)
    time.sleep(2)

    def start_now():
        res = slurm_cluster.run(["scontrol", "update", f"JobId={jobid}", "StartTime=now"], check=False)
        return res.returncode == 0
    _wait_for(start_now, 60, "scontrol update StartTime=now to be accepted", poll=0.5)

    info = slurm_cluster.wait_job(jobid, {"COMPLETED"}, timeout=60)
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "1", info
    text = read()
    runs = re.findall(r"^run=(\d) (start|done|got USR1)", text, flags=re.M)
    assert runs == [("0", "start"), ("0", "got USR1"), ("1", "start"), ("1", "done")], text
    assert text.count(f"job={jobid} ") == 2, text
