"""Distributed environment: one code path for the ``deepspeed`` launcher, ``torchrun`` and ``srun``.

torch.distributed reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; DeepSpeed's
CPU accelerator counts devices from LOCAL_SIZE; mosaicml-streaming counts nodes from
LOCAL_WORLD_SIZE. Launchers set different subsets:

    deepspeed launcher  RANK LOCAL_RANK WORLD_SIZE MASTER_ADDR MASTER_PORT LOCAL_SIZE CROSS_RANK CROSS_SIZE
    torchrun            RANK LOCAL_RANK WORLD_SIZE MASTER_ADDR MASTER_PORT LOCAL_WORLD_SIZE GROUP_RANK
    srun (one task per process)   only SLURM_*; DeepSpeed does not read them

:func:`setup_env` fills the gaps (never overriding a variable that is already set):
under Slurm it maps SLURM_* to the torch variables; everywhere it makes LOCAL_SIZE and
LOCAL_WORLD_SIZE agree and sets NODE_RANK/GROUP_RANK; a bare ``python run.py`` becomes a
one-process world on 127.0.0.1 (otherwise DeepSpeed would try MPI discovery).

Collective timeout: :func:`init_distributed` passes ``timeout`` (``train.dist_timeout_s``,
default :data:`DEFAULT_TIMEOUT_S` = 600 s) to the process group, so a collective whose peer
crashed or hangs raises on the surviving ranks within that time instead of hanging the job
(gloo: the collective raises; NCCL: the watchdog aborts the communicator and the process
exits). A dead peer usually fails faster than that, as soon as its sockets close.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Mapping, MutableMapping, Optional

DEFAULT_TIMEOUT_S = 600.0
_DIST_TIMEOUT_S = [DEFAULT_TIMEOUT_S]     # the run's (init_distributed's timeout_s)
DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    node_rank: int = 0
    accelerator: str = "cpu"     # DeepSpeed accelerator name ('cuda', 'cpu'), set by init_distributed
    backend: str = "gloo"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def num_nodes(self) -> int:
        return max(1, self.world // max(1, self.local_world))

    @classmethod
    def from_env(cls, environ: Optional[MutableMapping[str, str]] = None) -> "DistInfo":
        env = os.environ if environ is None else environ
        world = int(env.get("WORLD_SIZE", 1))
        local_world = int(env.get("LOCAL_WORLD_SIZE", env.get("LOCAL_SIZE", world)))
        rank = int(env.get("RANK", 0))
        return cls(rank=rank, world=world, local_rank=int(env.get("LOCAL_RANK", 0)),
                   local_world=local_world,
                   node_rank=int(env.get("NODE_RANK", env.get("GROUP_RANK", rank // max(1, local_world)))))


# ------------------------------------------------------------------------------ Slurm parsing

def parse_tasks_per_node(text: str) -> list[int]:
    """Slurm's compressed per-node counts: ``"2(x3),1"`` -> ``[2, 2, 2, 1]``."""
    out: list[int] = []
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part)
        if not m:
            raise ValueError(f"cannot parse Slurm tasks-per-node {text!r}")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    if not out:
        raise ValueError(f"cannot parse Slurm tasks-per-node {text!r}")
    return out


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def _expand_one(host: str) -> list[str]:
    m = re.search(r"\[([^\[\]]*)\]", host)
    if not m:
        return [host]
    head, tail = host[:m.start()], host[m.end():]
    out = []
    for item in m.group(1).split(","):
        if "-" in item:
            lo, hi = item.split("-", 1)
            width = len(lo)   # zero padding is kept: node[001-003] -> node001..node003
            for i in range(int(lo), int(hi) + 1):
                out += _expand_one(f"{head}{i:0{width}d}{tail}")
        else:
            out += _expand_one(f"{head}{item}{tail}")
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """Our parser for Slurm hostlists: ``"gpu[01-02,05],cpu7"`` -> gpu01 gpu02 gpu05 cpu7."""
    hosts: list[str] = []
    for part in _split_top_level(nodelist):
        hosts += _expand_one(part)
    return hosts


def first_host(nodelist: str, use_scontrol: bool = True) -> str:
    """First host of a Slurm nodelist: ``scontrol show hostnames`` when available, else our parser."""
    if use_scontrol and shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                                 text=True, timeout=30, check=True).stdout.split()
            if out:
                return out[0]
        except (subprocess.SubprocessError, OSError):
            pass
    hosts = expand_nodelist(nodelist)
    if not hosts:
        raise ValueError(f"empty Slurm nodelist {nodelist!r}")
    return hosts[0]


def port_from_job_id(job_id: str, step_id: Optional[str] = None) -> int:
    """A per-job (and per srun step) rendezvous port in [10000, 30000), so two jobs sharing a
    node don't collide, nor two steps of one allocation running at once (a training run and an
    eval beside it in one salloc). Step 0, or no step, gives the job's port, as the templates'
    (which check it is free and export it)."""
    try:
        n = int(job_id)
    except ValueError:
        n = sum(ord(c) * 31 ** i for i, c in enumerate(job_id))
    if step_id and step_id.isdigit() and int(step_id) < 20000:    # not the batch/extern step
        n += int(step_id) * 9973        # coprime with 20000: the steps of one job get distinct ports
    return 10000 + n % 20000


_GIVEN_PORTS: set[int] = set()
_PORT_DRAW = random.SystemRandom()     # not the global generator, which a run may have seeded


def _ephemeral_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port free now, for a process that binds it later: drawn below the kernel's
    ephemeral range, from which the OS hands out ports to any outgoing connection meanwhile
    (gloo's pairs, an S3 client's), and never one this process has given before."""
    top = _ephemeral_start()
    for _ in range(100):
        port = _PORT_DRAW.randrange(15000, max(top, 15001))
        if port in _GIVEN_PORTS:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _GIVEN_PORTS.add(port)
        return port
    with socket.socket() as s:              # that range is full: any port the OS gives
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------ env setup

def _set(env: MutableMapping[str, str], key: str, value) -> None:
    if key not in env:
        env[key] = str(value)


def setup_env_from_slurm(environ: Optional[MutableMapping[str, str]] = None, use_scontrol: bool = True) -> bool:
    """Map SLURM_* to torch's variables when a launcher has not set them (one srun task per process).

    Only acts when RANK and WORLD_SIZE are both absent and this process is an srun task
    (SLURM_PROCID and SLURM_STEP_NUM_TASKS present); never overrides a variable that is
    already set. Returns True when it mapped anything.

    The batch script also has SLURM_PROCID=0 and the job's SLURM_NTASKS, but no step: it is one
    process, and mapping the job's task count would wait for peers that never start. Alone in
    a one-task job it runs as one process; in a job of more tasks it is refused, naming srun.
    (An salloc shell has no SLURM_PROCID, or is itself a one-task step: one process either way.)
    """
    env = os.environ if environ is None else environ
    if "RANK" in env or "WORLD_SIZE" in env or "SLURM_PROCID" not in env:
        return False
    ntasks = env.get("SLURM_STEP_NUM_TASKS")
    if ntasks is None:
        job_tasks = env.get("SLURM_NTASKS") or env.get("SLURM_NPROCS") or "1"
        if int(job_tasks) > 1:
            job = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID") or "?"
            raise RuntimeError(
                f"this process runs in Slurm job {job} of SLURM_NTASKS={job_tasks} tasks but is not one of "
                "them (no SLURM_STEP_NUM_TASKS: the batch script, not an srun task), so its "
                f"{job_tasks} ranks would never start: launch them with `srun python vltrain/run.py ...` "
                "(as slurm/*.sbatch do), or set RANK=0 WORLD_SIZE=1 to run this one process alone")
        return False
    _set(env, "RANK", env["SLURM_PROCID"])
    _set(env, "WORLD_SIZE", ntasks)
    _set(env, "LOCAL_RANK", env.get("SLURM_LOCALID", 0))
    node_id = int(env.get("SLURM_NODEID", 0))
    _set(env, "NODE_RANK", node_id)
    _set(env, "GROUP_RANK", node_id)
    per_node = (env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
                or env.get("SLURM_NTASKS_PER_NODE"))
    if per_node:
        counts = parse_tasks_per_node(per_node)
        if len(set(counts)) > 1:
            # streaming (and our node count) take nodes = world / ranks per node: with uneven
            # nodes, ranks would disagree on the data partition and hang or repeat samples
            raise ValueError(f"SLURM tasks per node are uneven ({per_node}): vltrain needs the same number of "
                             "ranks on every node; submit with --ntasks-per-node=N (and --nodes=M)")
        local_world = counts[0]
    else:
        local_world = int(ntasks)
    rank, local_id = int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0))
    if (node_id, local_id) != divmod(rank, local_world):
        # streaming (and the node rank's cache and shared memory) take a node's ranks to be
        # consecutive: a cyclic layout puts two "local leaders" on one host and none on another
        raise ValueError(f"srun placed task {rank} as task {local_id} of node {node_id}, where {local_world} tasks "
                         f"per node in blocks put it at task {rank % local_world} of node {rank // local_world} "
                         f"(SLURM_DISTRIBUTION={env.get('SLURM_DISTRIBUTION', '?')}): vltrain needs each node's "
                         "ranks consecutive; launch with srun --distribution=block (-m block)")
    _set(env, "LOCAL_WORLD_SIZE", local_world)
    _set(env, "LOCAL_SIZE", local_world)
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if "MASTER_ADDR" not in env:
        env["MASTER_ADDR"] = first_host(nodelist, use_scontrol) if nodelist else "127.0.0.1"
    job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    _set(env, "MASTER_PORT", port_from_job_id(job_id, env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID"))
         if job_id else DEFAULT_MASTER_PORT)
    return True


def setup_env(environ: Optional[MutableMapping[str, str]] = None, use_scontrol: bool = True) -> DistInfo:
    """Complete the distributed environment for any launcher (see the module docstring)."""
    env = os.environ if environ is None else environ
    if ("RANK" in env) != ("WORLD_SIZE" in env):
        # half a launcher's environment (left over in a shell, say): mapping SLURM_* or
        # assuming one process would each give a wrong world
        have, lack = ("RANK", "WORLD_SIZE") if "RANK" in env else ("WORLD_SIZE", "RANK")
        raise ValueError(f"{have}={env[have]} is set but {lack} is not: set both (a launcher does), or unset "
                         f"{have} to let vltrain map SLURM_* / run as one process")
    setup_env_from_slurm(env, use_scontrol)
    if "RANK" not in env and "WORLD_SIZE" not in env:      # bare `python run.py`: a one-process world
        _set(env, "RANK", 0)
        _set(env, "WORLD_SIZE", 1)
        _set(env, "LOCAL_RANK", 0)
        _set(env, "MASTER_ADDR", "127.0.0.1")
        _set(env, "MASTER_PORT", free_port())
    _set(env, "LOCAL_RANK", 0)
    _set(env, "MASTER_ADDR", "127.0.0.1")
    _set(env, "MASTER_PORT", DEFAULT_MASTER_PORT)
    # deepspeed launcher sets LOCAL_SIZE, torchrun LOCAL_WORLD_SIZE; make both exist.
    # Neither: a hand-made env; assume one node.
    local = env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or env.get("WORLD_SIZE", "1")
    _set(env, "LOCAL_WORLD_SIZE", local)
    _set(env, "LOCAL_SIZE", local)
    node = env.get("GROUP_RANK") or env.get("CROSS_RANK") or env.get("NODE_RANK")
    if node is None:
        node = int(env["RANK"]) // max(1, int(local))
    _set(env, "NODE_RANK", node)
    _set(env, "GROUP_RANK", node)
    return DistInfo.from_env(env)


def slurm_gpus(env: Mapping[str, str]) -> str:
    """The GPUs Slurm says it allocated to this task's node or step ("" for none), as the
    variables say it: the templates' test for a GPU node (slurm/common.sh). Inside a step its own
    (a CPU step of a GPU job, `srun --gpus=0`, inherits the job's SLURM_JOB_GPUS)."""
    keys = ("SLURM_GPUS_ON_NODE", "SLURM_STEP_GPUS") + (() if env.get("SLURM_STEP_ID") else ("SLURM_JOB_GPUS",))
    given = [f"{k}={env[k]}" for k in keys
             if env.get(k, "").strip() not in ("", "0" if k == "SLURM_GPUS_ON_NODE" else "")]  # a count; GPU ids
    return ", ".join(given)


def pick_backend() -> tuple[str, str]:
    """(accelerator, backend): ('cuda', 'nccl') with a GPU, else ('cpu', 'gloo') and DS_ACCELERATOR=cpu.

    Must run before DeepSpeed's accelerator is first queried (it is cached)."""
    forced = os.environ.get("DS_ACCELERATOR")
    if forced == "cpu":
        return "cpu", "gloo"
    import torch
    if forced in (None, "cuda"):
        if torch.cuda.is_available():
            return "cuda", "nccl"
        if forced == "cuda":
            raise RuntimeError("DS_ACCELERATOR=cuda but torch sees no GPU (CUDA_VISIBLE_DEVICES, driver?)")
        slurm = slurm_gpus(os.environ)
        if slurm:   # on CPU this rank would take gloo beside its peers' NCCL: a hang, not an error
            raise RuntimeError(
                f"Slurm allocated GPUs to this task ({slurm}) but torch sees none (torch {torch.__version__}, "
                f"built for CUDA {torch.version.cuda}; a CPU-only torch, a driver older than that CUDA, or a "
                "container without the GPU devices?). To train on CPUs set DS_ACCELERATOR=cpu (another "
                "accelerator: DS_ACCELERATOR=<its DeepSpeed name>)")
        os.environ["DS_ACCELERATOR"] = "cpu"
        return "cpu", "gloo"
    from deepspeed.accelerator import get_accelerator   # another accelerator the user chose
    acc = get_accelerator()
    return acc.device_name(), acc.communication_backend_name()


def check_visible_gpus(local_rank: int, count: int, environ: MutableMapping[str, str]) -> None:
    """Each rank takes cuda:LOCAL_RANK (so do DeepSpeed's engine and streaming's node-local
    coordination, by LOCAL_RANK), so every rank must see all GPUs of its node. A launch that
    binds GPUs per task (``srun --gpus-per-task=1``, a site's default GPU binding, one GPU per
    container) fails otherwise with CUDA's "invalid device ordinal"; say what to change."""
    if local_rank < count:
        return
    raise RuntimeError(
        f"LOCAL_RANK={local_rank} but this rank sees {count} GPU(s) "
        f"(CUDA_VISIBLE_DEVICES={environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): every rank must see all GPUs "
        "of its node and takes cuda:LOCAL_RANK. Launch without per-task GPU binding: srun --gpu-bind=none "
        "(the sbatch templates do), no --gpus-per-task, one container per node")


def init_distributed(timeout_s: float = DEFAULT_TIMEOUT_S) -> DistInfo:
    """setup_env + backend choice + ``deepspeed.init_distributed`` with a bounded collective timeout.

    Works on ``os.environ`` (torch reads it). On CUDA also selects this rank's GPU (LOCAL_RANK).
    ``timeout_s``: ``train.dist_timeout_s`` (default 600 s): the longest a collective may wait.
    """
    info = setup_env(os.environ)
    _DIST_TIMEOUT_S[0] = float(timeout_s)
    accel, backend = pick_backend()
    import deepspeed
    if accel == "cpu":
        # DeepSpeed's CPU backend JIT-compiles a shared-memory allreduce op (~2 min on 2 cores,
        # redone whenever its build folder is cleaned) that only speeds up CPU inference;
        # gloo does our collectives, so mark the op unavailable instead of building it.
        import deepspeed.ops
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if accel == "cuda":
        import torch
        check_visible_gpus(info.local_rank, torch.cuda.device_count(), os.environ)
        torch.cuda.set_device(info.local_rank)
    try:
        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=float(timeout_s)),
                                   auto_mpi_discovery=False, verbose=False)
    except RuntimeError as e:     # torch's DistNetworkError: rank 0 could not listen on MASTER_PORT
        if "EADDRINUSE" not in str(e) and "address already in use" not in str(e).lower():
            raise
        port = os.environ.get("MASTER_PORT", "?")
        raise ValueError(f"MASTER_PORT={port} on {os.environ.get('MASTER_ADDR', '?')} is taken (another job on "
                         "this machine, launched with the same default port?): start this one on another port "
                         f"(deepspeed --master_port N, torchrun --master_port N, or MASTER_PORT=N; a free one now: "
                         f"{free_port()})") from None
    return dataclasses.replace(info, accelerator=accel, backend=backend)


def launch_rank() -> str:
    """This process's rank as its launcher gave it (RANK, or Slurm's SLURM_PROCID; "0" without
    either): readable before torch.distributed starts, and with no import (a signal handler
    that may run in the middle of torch's own)."""
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))


def first_rank() -> bool:
    """Whether this process says what every rank would say alike (a config's problem, a stop
    signal every rank got): torch.distributed's rank 0, or a process without it."""
    import torch.distributed as dist
    return not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0)


@contextlib.contextmanager
def said_by_main_rank(is_main: bool):
    """vltrain's log lines inside, alike on every rank (drawn from the config and the same files),
    logged by the main rank only: 512 copies of a line bury a job's log. Errors still raise."""
    if is_main:
        yield
        return
    ours = logging.getLogger("vltrain")
    level = ours.level
    ours.setLevel(logging.ERROR)
    try:
        yield
    finally:
        ours.setLevel(level)


# How long ranks wait for the main rank's own work (a dataset's index, a checkpoint to
# consolidate, SCST references read from every shard, caption scores with SPICE on a COCO-size
# split: minutes to an hour) where the process group's bound, train.dist_timeout_s (default
# 600 s), is for collectives whose peers are all at work on the same thing.
MAIN_RANK_WAIT_S = 4 * 3600
_WAIT_GROUP: dict = {}


def main_rank_wait_group():
    """A group of every rank that waits up to ``MAIN_RANK_WAIT_S`` (or the run's own bound, if
    longer), on the run's backend (a gloo group on GPU nodes would need gloo's own addressing,
    first tried when first used). Collective where first called: every rank reaches that call
    (from_main_rank's with long_wait) in the same order. Connected at once, while
    every rank is there: NCCL would otherwise connect it at its first collective, whose peers
    wait for the main rank's work within the store's timeout (dist_timeout_s)."""
    import torch.distributed as dist
    world = dist.group.WORLD
    if _WAIT_GROUP.get("world") is not world:         # a process group made again (tests)
        group = dist.new_group(timeout=timedelta(seconds=max(MAIN_RANK_WAIT_S, _DIST_TIMEOUT_S[0])))
        dist.barrier(group=group)
        _WAIT_GROUP.update(world=world, group=group)
    return _WAIT_GROUP["group"]


def from_main_rank(read: Callable, is_main: Optional[bool] = None, long_wait: bool = False):
    """``read()`` on the main rank (``is_main``; None: torch.distributed's rank 0) only; its
    result (picklable) returned on every rank, or the error it raised raised on every rank.
    ``long_wait``: the others wait up to MAIN_RANK_WAIT_S (``main_rank_wait_group``), for work
    that can outlast train.dist_timeout_s (consolidating a checkpoint, reading every shard,
    scoring); else the run's bound, which a main rank stuck on a folder operation should meet.

    Why: a read or check of the main rank's (the run folder, a checkpoint's files, a dataset's
    index) failing there alone leaves the other ranks waiting at their next collective until
    its timeout, or dying there with gloo's "Connection closed by peer"; broadcast, all stop on
    the same message. Collective: every rank calls it, in the same order."""
    import pickle
    import torch.distributed as dist
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return read()
    is_main = dist.get_rank() == 0 if is_main is None else is_main
    group = main_rank_wait_group() if long_wait else None    # made before the main rank starts its work
    box, failure = [None], None
    if is_main:
        try:
            box[0] = (True, read())
        except Exception as e:   # noqa: BLE001 - every rank raises it (below)
            failure = e
            try:
                box[0] = (False, pickle.loads(pickle.dumps(e)))
            except Exception:    # noqa: BLE001 - an exception that does not unpickle: its words
                box[0] = (False, RuntimeError(f"{type(e).__name__}: {e}"))
    dist.broadcast_object_list(box, src=0, group=group)
    if failure is not None:
        raise failure
    ok, value = box[0]
    if not ok:
        raise value
    return value


def tensors_from_main_rank(read: Callable[[], dict], is_main: Optional[bool] = None) -> dict:
    """``read()`` (a state dict) on the main rank only, its tensors broadcast to every rank (on
    the CPU), its error raised on every rank.

    Why: ``train.init_from`` a ZeRO checkpoint is consolidated from every rank's optimizer shard
    (fp32 master and Adam moments: ~1.4 GB for a base model); read on each of 512 ranks, that was
    64 nodes re-reading it from the shared filesystem and eight copies in each node's memory at
    the start. One read and a broadcast (NCCL's tree on GPUs) give every rank the same tensors."""
    import torch
    import torch.distributed as dist
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return read()
    is_main = dist.get_rank() == 0 if is_main is None else is_main
    state: dict = {}

    def header() -> list:
        state.update(read())
        return [(k, tuple(v.shape), v.dtype) if torch.is_tensor(v) else (k, None, v) for k, v in state.items()]
    device = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl"
              else torch.device("cpu"))
    out = {}
    for key, shape, what in from_main_rank(header, is_main, long_wait=True):
        if shape is None:          # not a tensor: it travelled in the header
            out[key] = what
            continue
        t = state[key].contiguous().to(device) if is_main else torch.empty(shape, dtype=what, device=device)
        dist.broadcast(t, src=0)
        out[key] = state[key] if is_main else t.cpu()
    return out
