"""A rank's DataLoader workers leave the shared memory they attach to alone
(vltrain/data/shm_tracking.py, installed by the workers' forkserver preload).

The segment stands for the local leader's (another process created it); a child process stands
for a non-leader rank: it attaches as streaming does, and its workers (our worker context) get
the segment pickled with their dataset. After the rank, its workers and its resource tracker
are gone, the segment must still exist. With a forkserver without our preload the tracker
unlinks it: the test can fail.
"""
import os
import subprocess
import sys
import time
import uuid
from multiprocessing import resource_tracker, shared_memory

import pytest

from tests.fixtures.corpus import script_env
from tests.fixtures.procs import alive

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RANK = os.path.join(REPO, "tests", "workers", "shm_rank.py")


def _exists(name):
    try:
        shm = shared_memory.SharedMemory(name, create=False)
    except FileNotFoundError:
        return False
    resource_tracker.unregister(shm._name, "shared_memory")     # an attachment: not ours to unlink
    shm.close()
    return True


@pytest.mark.parametrize("mode", ["ours", "plain"])
def test_a_ranks_workers_leave_the_leaders_shared_memory_alone(mode):
    name = f"vltrain_test_{uuid.uuid4().hex[:12]}"
    leader = shared_memory.SharedMemory(name, create=True, size=16)
    leader.buf[:3] = bytes([7, 8, 9])
    try:
        p = subprocess.run([sys.executable, RANK, name, mode], cwd=REPO, env=script_env(), capture_output=True,
                           text=True, timeout=180)
        assert p.returncode == 0, p.stdout + p.stderr
        words = p.stdout.split()
        assert words[:4] == ["READ", "[7,", "8,", "9]"], p.stdout          # the workers did attach
        tracker = int(words[-1])
        deadline = time.time() + 60              # the tracker ends once the rank and its workers have
        while alive(tracker) and time.time() < deadline:
            time.sleep(0.2)
        assert not alive(tracker), "the rank's resource tracker did not end"
        if mode == "ours":
            assert _exists(name), "the rank's tracker unlinked the leader's segment: " + p.stderr[-2000:]
            assert "resource_tracker" not in p.stderr, p.stderr[-2000:]
        else:
            assert not _exists(name), "without our preload the tracker should have unlinked it"
            assert "leaked shared_memory" in p.stderr, p.stderr[-2000:]
    finally:
        leader.close()
        try:
            leader.unlink()
        except FileNotFoundError:     # the plain run's tracker did; ours is still registered
            resource_tracker.unregister(leader._name, "shared_memory")
