"""Streaming's shared memory stays out of the resource tracker (vltrain/data/shm_tracking.py,
installed by VLStreamingDataset and by the workers' forkserver preload): no process's tracker
unlinks a segment by name once the name may be someone else's.

1. The segment stands for the local leader's (another process created it); a child process stands
for a non-leader rank: it attaches as streaming does, and its workers (our worker context) get
the segment pickled with their dataset. After the rank, its workers and its resource tracker
are gone, the segment must still exist. With a forkserver without our preload the tracker
unlinks it: the test can fail.

2. A rank that created a segment dies alone (the OOM killer; its workers live on, holding its
tracker); a new job on the host takes the same name; the dead rank's tracker, ending later,
must not unlink it. Without the rule it does.
"""
import os
import random
import signal
import subprocess
import sys
import time
from multiprocessing import resource_tracker, shared_memory

import pytest

from tests.fixtures.corpus import script_env
from tests.fixtures.procs import alive

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RANK = os.path.join(REPO, "tests", "workers", "shm_rank.py")
CREATOR = os.path.join(REPO, "tests", "workers", "shm_creator.py")


def _streaming_name(kind: str = "barrier") -> str:
    """A streaming segment's name no job here uses (real prefixes count up from 0)."""
    return f"{random.randint(900000, 989999)}_{kind}"


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
    name = _streaming_name()
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


def test_a_worker_from_a_forkserver_without_our_preload_says_so():
    """Another user of the rank's process started the forkserver first (our preload never reaches
    it): the worker's attachments were registered as it unpickled its dataset; it says so."""
    name = _streaming_name()
    leader = shared_memory.SharedMemory(name, create=True, size=16)
    try:
        p = subprocess.run([sys.executable, RANK, name, "bare"], cwd=REPO, env=script_env(), capture_output=True,
                           text=True, timeout=180)
        assert p.returncode == 0 and p.stdout.startswith("READ [0, 0, 0]"), p.stdout + p.stderr[-2000:]
        assert "started from a forkserver without vltrain.data.forkserver_preload" in p.stderr, p.stderr[-2000:]
    finally:
        leader.close()
        try:
            leader.unlink()
        except FileNotFoundError:     # the rank's tracker did
            resource_tracker.unregister(leader._name, "shared_memory")


@pytest.mark.parametrize("mode", ["ours", "plain"])
def test_a_dead_ranks_tracker_leaves_a_new_jobs_segment_of_the_same_name(mode):
    name = _streaming_name("locals")
    p = subprocess.Popen([sys.executable, CREATOR, name, mode], cwd=REPO, env=script_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    new = None
    try:
        words = p.stdout.readline().split()
        assert words[:1] == ["CREATED"], words + [p.stderr.read()[-2000:]]
        tracker, worker = int(words[1]), int(words[2])
        os.kill(p.pid, signal.SIGKILL)             # the rank dies alone; its worker keeps its tracker
        p.wait()
        assert alive(tracker) and alive(worker)
        shared_memory.SharedMemory(name).unlink()  # the start-up sweep of the next job: nobody maps it
        new = shared_memory.SharedMemory(name, create=True, size=16)     # that job takes the name
        resource_tracker.unregister(new._name, "shared_memory")           # (only the tracker under test unlinks)
        new.buf[:3] = bytes([1, 2, 3])
        os.kill(worker, signal.SIGKILL)            # the worker goes: the dead rank's tracker ends
        deadline = time.time() + 60
        while alive(tracker) and time.time() < deadline:
            time.sleep(0.2)
        assert not alive(tracker), "the dead rank's resource tracker did not end"
        assert _exists(name) == (mode == "ours"), f"{mode}: the dead rank's tracker unlinked the new job's segment"
    finally:
        p.kill()
        if new is not None:
            new.close()
            try:
                os.unlink("/dev/shm/" + name)
            except FileNotFoundError:
                pass


def test_the_names_are_streamings():
    from streaming.base.constant import SHM_TO_CLEAN
    from streaming.base.shared.prefix import _get_path

    from vltrain.data.shm_tracking import STREAMING_SEGMENTS, is_streaming_segment
    assert set(STREAMING_SEGMENTS) == set(SHM_TO_CLEAN)
    assert all(is_streaming_segment("/" + _get_path(p, n)) for p in (0, 17, 999999) for n in SHM_TO_CLEAN)
    assert not any(is_streaming_segment(n) for n in ("/psm_0a1b2c", "/000001_lockz", "/1_locals", "000001_locals/x"))
