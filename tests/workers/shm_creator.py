"""A rank that creates a streaming segment as a local leader does, for tests/test_shm_tracking.py,
then forks a stand-in for a DataLoader worker (it holds the rank's resource tracker) and waits
to be killed; prints CREATED <tracker pid> <worker pid>.

    python tests/workers/shm_creator.py NAME ours|plain   (plain: CPython's tracking)
"""
import os
import sys
import time
from multiprocessing import resource_tracker


def main(name, mode):
    if mode == "ours":
        from vltrain.data.shm_tracking import untrack_streaming_segments
        untrack_streaming_segments()
    from streaming.base.shared import SharedMemory
    shm = SharedMemory(name, create=True, size=16)        # as streaming's constructor creates them
    resource_tracker.ensure_running()
    worker = os.fork()
    if worker == 0:
        time.sleep(600)
        os._exit(0)
    print("CREATED", resource_tracker._resource_tracker._pid, worker, flush=True)
    time.sleep(600)
    shm.cleanup()


if __name__ == "__main__":
    main(*sys.argv[1:])
