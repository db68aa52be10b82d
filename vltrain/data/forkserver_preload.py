"""Imported by the DataLoader workers' forkserver, never by a rank (vltrain/data/worker_signals.py).

SIGTERM is blocked and SIGUSR1 ignored first, before the imports take their seconds: the
forkserver must outlive the signals Slurm sends every process of a job, and its forks start
with them blocked / ignored. One thread for OpenMP/BLAS: their libraries start their thread
pools as they load (one per core without this), and the forkserver is there to fork from a
process with no other threads; a worker runs one thread anyway (torch sets it), and gets the
rank's environment back as it starts. The imports make each worker start without importing anything itself: the
pretraining collator's modules and every task's. A worker's attachments to its rank's streaming
shared memory stay out of the resource tracker (vltrain/data/shm_tracking.py). What the imports
made is then frozen (``gc.freeze``): workers never collect it, so its pages stay shared.
"""
import gc
import importlib
import os

from vltrain.data.shm_tracking import untrack_streaming_segments  # light: multiprocessing and the stdlib
from vltrain.data.worker_signals import shield_signals

shield_signals()
untrack_streaming_segments()       # before a worker unpickles its dataset's shared memory
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"
# torch, streaming, tokenizers and the pretraining collator; the task collators
for _module in ("vltrain.data.loader", "vltrain.tasks"):
    importlib.import_module(_module)
# What the workers inherit, out of the garbage collector's reach: a fork inherits the
# forkserver's allocation counters, which every fork request raises; after ~300 forks each
# new worker's start-up ran a full collection over these ~400 MB of objects, which touched
# every inherited page (copied: +100 MB per worker) and took 0.25 s, for the rest of the run.
gc.freeze()
