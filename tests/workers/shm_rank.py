"""A non-leader rank for tests/test_shm_tracking.py: attaches to the leader's segment as
streaming does, reads it through DataLoader workers, prints what they read and its tracker's pid.

    python tests/workers/shm_rank.py NAME ours|plain|bare   (plain: a forkserver without our
    preload; bare: that forkserver with our worker_init_fn)
"""
import multiprocessing
import sys
from multiprocessing import resource_tracker

from torch.utils.data import DataLoader, Dataset

from vltrain.data.worker_signals import WorkerStart, worker_context


class Holds(Dataset):
    def __init__(self, shm):
        self.shm = shm

    def __len__(self):
        return 3

    def __getitem__(self, i):
        return int(self.shm.buf[i])


def main(name, mode):
    from streaming.base.shared import SharedMemory
    shm = SharedMemory(name, create=False, auto_cleanup=False)     # untracked by streaming itself
    if mode == "ours":
        ctx, init = worker_context(), WorkerStart()
    else:
        ctx, init = multiprocessing.get_context("forkserver"), WorkerStart() if mode == "bare" else None
        ctx.set_forkserver_preload([])
    loader = DataLoader(Holds(shm.shm), batch_size=None, num_workers=2, multiprocessing_context=ctx,
                        worker_init_fn=init)
    print("READ", [int(x) for x in loader], "TRACKER", resource_tracker._resource_tracker._pid, flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
