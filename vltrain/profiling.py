"""``train.profile_steps``: the torch profiler over a window of the real job's optimizer steps.

Why in the job and not only in ``benchmarks/``: whether the GPUs are busy depends on what a run
does around the model — the loader, the host-to-device copy, DeepSpeed's engine, the per-step
agreement between ranks, logging, checkpoints — on the user's own hosts; the benchmarks time
the model's step in isolation. ``train.profile_steps=3`` profiles optimizer steps
``profile_start + 1 .. profile_start + 3`` on the ranks in ``train.profile_ranks`` and writes,
per rank, to ``<run_dir>/profile/steps_<first>-<last>/``:

* ``rank<r>.pt.trace.json.gz``: the trace (ui.perfetto.dev or chrome://tracing), with the
  trainer's phases as ranges named ``vltrain.<phase>`` (:data:`PHASES`);
* ``rank<r>.md``: per step, the wall time; each phase's host time; on CUDA, device time by
  kernel class (GEMM, attention, compiled Triton, optimizer, communication, copies, other), the
  time no kernel or copy ran (the GPU waiting for the host) and how often the host waited for
  the device (``cuda*Synchronize`` calls); on CPU, the aten operators' time by the same classes.

and logs one line per profiled rank. A window cut short (a stop signal, the run's last step, an
error) is written all the same and says so; a failure to write is logged, never raised: a
profile must not take a training run down.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from vltrain.config import ConfigError, TrainConfig

log = logging.getLogger(__name__)

# The trainer's phases, in loop order; each is a ``record_function`` range while profiling.
PHASES = ("forward", "fetch", "flags", "backward", "step", "log", "validate", "save")
PHASE_PREFIX = "vltrain."

# Device kernels by name, first match wins: cuDNN's attention kernels have "sm90" in their
# names too, and NCCL's "Reduce" would read as a GEMM epilogue to a looser pattern.
KERNEL_CLASSES = [
    ("communication (NCCL)", re.compile(r"nccl", re.I)),
    ("attention", re.compile(r"cudnn|fmha|flash|attention|mem_eff|sdpa", re.I)),
    ("GEMM", re.compile(r"gemm|nvjet|cutlass|xmma|cublas|sm90_|s16816|s1688", re.I)),
    ("optimizer", re.compile(r"multi_tensor|adam", re.I)),
    ("Triton (compiled)", re.compile(r"^triton_", re.I)),
    ("copies and sets", re.compile(r"^mem(cpy|set)", re.I)),
]
KERNEL_OTHER = "other (eager kernels)"
# CPU: aten operators by name. An attention operator counts with everything it calls (on CPU
# it is matrix products and a softmax), any other operator by its self time (a linear's
# matrix product is its addmm).
CPU_OP_CLASSES = [
    ("communication", re.compile(r"c10d|gloo|nccl|all_?reduce|all_?gather|reduce_?scatter", re.I)),
    ("attention", re.compile(r"scaled_dot_product|attention", re.I)),
    ("GEMM", re.compile(r"^aten::(mm|addmm|bmm|baddbmm|_addmm_activation)$")),
    ("optimizer", re.compile(r"adam|_foreach_", re.I)),
]
CPU_OTHER = "other aten operators"
MAIN_CLASSES = ("GEMM", "attention")       # the "largest others" list leaves these out
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def classify(name: str, classes, default: str) -> str:
    return next((c for c, rx in classes if rx.search(name)), default)


def union_length(intervals: Sequence[tuple[float, float]]) -> float:
    """Total length covered by (start, end) intervals, overlaps counted once (kernels on a
    side stream run beside those of the compute stream)."""
    total, end = 0.0, -math.inf
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    def fmt(x):
        if isinstance(x, float):
            if math.isnan(x):
                return "n/a"
            return f"{x:.3g}" if abs(x) < 100 else f"{x:,.0f}"
        return str(x)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class Summary:
    """What a profiled window spent its time on, per step (ms)."""
    steps: int
    wall_ms: float
    on_device: bool                              # classes are CUDA kernel time, else aten CPU time
    classes: list[tuple[str, float]]             # (class, ms), largest first
    idle_ms: Optional[float] = None              # CUDA: no kernel or copy running
    syncs: Optional[float] = None                # CUDA: host waits for the device
    phases: Optional[list[tuple[str, float, float]]] = None   # (phase, calls, host ms)
    top: Optional[list[tuple[str, float]]] = None              # largest besides GEMM/attention

    def class_table(self, top_n: int = 10) -> str:
        pct = (lambda ms: 100 * ms / self.wall_ms) if self.wall_ms > 0 else (lambda ms: float("nan"))
        what = "device time by kernel class" if self.on_device else "aten operator time by class (CPU)"
        rows = [[c, ms, pct(ms)] for c, ms in self.classes]
        if self.idle_ms is not None:
            rows.append(["GPU idle (no kernel or copy running: waiting for the host)", self.idle_ms,
                         pct(self.idle_ms)])
        md = markdown_table([what, "ms / step", "% of step"], rows)
        if not self.on_device:
            md += "\n\nAn attention operator counts with the operators it calls, any other by its self time."
        if self.syncs is not None:
            md += f"\n\nHost waits for the device (`cuda*Synchronize` calls): {self.syncs:.1f} per step."
        if self.top:
            md += ("\n\nLargest kernels besides GEMM and attention (ms / step):\n" if self.on_device else
                   "\n\nLargest operators besides GEMM and attention (ms / step):\n")
            md += "\n".join(f"- `{k[:110]}` {v:.2f}" for k, v in self.top[:top_n])
        return md

    def phase_table(self) -> str:
        rows = [[p, calls, ms, 100 * ms / self.wall_ms if self.wall_ms > 0 else float("nan")]
                for p, calls, ms in self.phases or []]
        return markdown_table(["trainer phase (host, inclusive)", "calls / step", "ms / step", "% of step"], rows)

    def line(self) -> str:
        """One log line: the step, the busy/idle split, the classes as shares of the step."""
        shares = ", ".join(f"{c} {100 * ms / self.wall_ms:.0f}%" for c, ms in self.classes[:6]
                           if self.wall_ms > 0)
        if self.on_device:
            busy = 100 * (1 - (self.idle_ms or 0.0) / self.wall_ms) if self.wall_ms > 0 else float("nan")
            return (f"{self.wall_ms:.1f} ms/step; GPU busy {busy:.0f}% ({shares}); "
                    f"host waits {self.syncs:.1f}/step")
        return f"{self.wall_ms:.1f} ms/step; aten operators: {shares}"


def _gpu_annotation(e) -> bool:
    """A ``record_function`` range's GPU-side copy (kineto's gpu_user_annotation: our phases,
    the optimizers' ``Optimizer.step#...``). It spans the kernels launched inside the range,
    gaps included, and is no kernel: counted, it would double the range's kernel time and
    hide the GPU's idle time inside it."""
    return bool(getattr(e, "is_user_annotation", False))


def summarize(prof, steps: int, wall_s: float) -> Summary:
    """A :class:`Summary` of a finished ``torch.profiler.profile`` over ``steps`` steps that
    took ``wall_s`` seconds (device work included)."""
    cuda = torch.autograd.DeviceType.CUDA
    steps = max(steps, 1)
    averages = prof.key_averages()
    on_device = any(e.device_type == cuda for e in averages)
    sums: dict[str, float] = {}
    top: dict[str, float] = {}
    phases, syncs = [], 0

    def add(cls: str, key: str, us: float) -> None:
        ms = us / 1e3 / steps
        sums[cls] = sums.get(cls, 0.0) + ms
        if cls not in MAIN_CLASSES:
            top[key] = top.get(key, 0.0) + ms

    for e in averages:
        if e.device_type == cuda and _gpu_annotation(e):
            continue
        if e.key.startswith(PHASE_PREFIX):
            phases.append((e.key[len(PHASE_PREFIX):], e.count / steps, e.cpu_time_total / 1e3 / steps))
        elif e.key in SYNC_CALLS:
            syncs += e.count
        elif e.device_type == cuda:
            add(classify(e.key, KERNEL_CLASSES, KERNEL_OTHER), e.key, e.self_device_time_total)
    if not on_device:
        for key, (cls, us) in _cpu_operator_time(prof.events()).items():
            add(cls, key, us)
    wall_ms = wall_s * 1e3 / steps
    idle = None
    if on_device:
        spans = [(e.time_range.start, e.time_range.end) for e in prof.events()
                 if e.device_type == cuda and not _gpu_annotation(e)]
        busy_ms = union_length(spans) / 1e3 / steps if spans else sum(sums.values())
        idle = max(0.0, wall_ms - busy_ms)
    order = {p: i for i, p in enumerate(PHASES)}
    return Summary(steps=steps, wall_ms=wall_ms, on_device=on_device,
                   classes=sorted(sums.items(), key=lambda kv: -kv[1]), idle_ms=idle,
                   syncs=syncs / steps if on_device else None,
                   phases=sorted(phases, key=lambda p: order.get(p[0], len(order))),
                   top=sorted(top.items(), key=lambda kv: -kv[1]))


def _cpu_operator_time(events) -> dict[str, tuple[str, float]]:
    """aten operator or collective -> (class, CPU us): attention operators and gloo's collective
    ranges with what they call, the others' self time (none counted twice). A collective is a
    ``c10d::`` operator on the calling thread (the enqueue) and a ``gloo:`` range on gloo's own
    thread (the transfer and the wait for the peers): both count as communication."""
    attention = dict(CPU_OP_CLASSES)["attention"]

    def whole(key: str) -> bool:                    # counted with what it calls
        return key.startswith("gloo:") or bool(attention.search(key))

    def inside_whole(e) -> bool:
        p = e.cpu_parent
        while p is not None:
            if whole(p.key):
                return True
            p = p.cpu_parent
        return False

    out: dict[str, tuple[str, float]] = {}
    for e in events:
        if (e.device_type != torch.autograd.DeviceType.CPU or not e.key.startswith(("aten::", "c10d::", "gloo:"))
                or inside_whole(e)):
            continue
        cls = classify(e.key, CPU_OP_CLASSES, CPU_OTHER)
        us = e.cpu_time_total if whole(e.key) else e.self_cpu_time_total
        out[e.key] = (cls, out.get(e.key, (cls, 0.0))[1] + us)
    return out


def check_profile_config(train: TrainConfig, world: int) -> None:
    """Errors that name the key, before anything runs."""
    if train.profile_steps < 0:
        raise ConfigError(f"config key 'train.profile_steps': {train.profile_steps} (0 = off, else the "
                          "number of optimizer steps to profile)")
    if train.profile_start < 0:
        raise ConfigError(f"config key 'train.profile_start': {train.profile_start} (profiling starts "
                          "after this optimizer step, >= 0)")
    bad = [r for r in train.profile_ranks if not 0 <= r < world]
    if train.profile_steps and (bad or not train.profile_ranks):
        raise ConfigError(f"config key 'train.profile_ranks': {train.profile_ranks} must list ranks of "
                          f"this job (0 .. {world - 1})")


class StepProfiler:
    """The trainer's side: ``phase(name)`` ranges, ``at_step(step)`` after every optimizer step
    (and once at the loop's start), ``close(step, why)`` on every way out of the loop."""

    def __init__(self, train: TrainConfig, run_dir: str, rank: int, world: int, device: torch.device):
        check_profile_config(train, world)
        self.enabled = train.profile_steps > 0 and rank in train.profile_ranks
        self.first, self.last = train.profile_start + 1, train.profile_start + train.profile_steps
        self.max_steps = train.max_steps
        self.rank, self.device = rank, device
        self.out_dir = os.path.join(run_dir, "profile", f"steps_{self.first}-{self.last}")
        self._prof = None
        self._t0 = 0.0
        self._ended = False                      # the window ran, or can no longer run
        # (summary markdown, step) -> None: where else the summary goes (the trainer: TensorBoard)
        self.on_report: Optional[Callable[[str, int], None]] = None

    @property
    def active(self) -> bool:
        return self._prof is not None

    def phase(self, name: str):
        return torch.profiler.record_function(PHASE_PREFIX + name) if self._prof is not None \
            else contextlib.nullcontext()

    def at_step(self, step: int) -> bool:
        """``step`` optimizer steps are done: start or end the window there. True when a
        window ended (its export took time that belongs to no step)."""
        if not self.enabled or self._ended:
            return False
        if self._prof is None and step == self.first - 1 and step < self.max_steps:
            self._start()
        elif self._prof is None and step >= self.first:
            self._ended = True
            log.warning("train.profile_steps: this run starts at step %d, past the profiled window (steps %d-%d):"
                        " no profile (set train.profile_start)", step, self.first, self.last)
        elif self._prof is not None and step >= self.last:
            self._finish(step, "")
            return True
        return False

    def close(self, step: int, why: str) -> None:
        """The loop ends at ``step`` (``why``: done, stop signal, error): finish a window in
        progress; say so if the window was never reached."""
        if self._prof is not None:
            self._finish(step, why)
        elif self.enabled and not self._ended:
            self._ended = True
            log.warning("train.profile_steps: the run ended at step %d (%s), before the profiled window "
                        "(steps %d-%d): no profile", step, why, self.first, self.last)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _start(self) -> None:
        from torch.profiler import ProfilerActivity, profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self._sync()                                   # the window holds only its own steps' work
        try:
            prof = profile(activities=acts)
            prof.start()
        except Exception as e:                          # noqa: BLE001 - a profile never ends a run
            self._ended = True
            log.warning("train.profile_steps: the profiler did not start on rank %d (%s: %s): no profile",
                        self.rank, type(e).__name__, e)
            return
        self._prof, self._t0 = prof, time.perf_counter()
        log.info("profiling steps %d-%d on rank %d", self.first, self.last, self.rank)

    def steps_done(self, step: int) -> str:
        done = step - (self.first - 1)
        return f"{self.first}-{step}" if done > 0 else f"{self.first} (none completed)"

    def _finish(self, step: int, why: str) -> None:
        prof, self._prof, self._ended = self._prof, None, True
        done = step - (self.first - 1)
        cut = f"; cut short at step {step} ({why})" if why and step < self.last else ""
        try:     # also when the run is failing: what the window saw, and never a second error
            self._sync()
            wall = time.perf_counter() - self._t0
            prof.stop()
            summary = summarize(prof, done, wall)
            os.makedirs(self.out_dir, exist_ok=True)
            trace = os.path.join(self.out_dir, f"rank{self.rank}.pt.trace.json.gz")
            prof.export_chrome_trace(trace)
            report = self.report(summary, step, cut)
            with open(os.path.join(self.out_dir, f"rank{self.rank}.md"), "w") as f:
                f.write(report)
            if self.on_report is not None:
                self.on_report(report, step)
        except Exception as e:                          # noqa: BLE001 - a profile never ends a run
            log.warning("profile of steps %d-%d on rank %d not written: %s: %s", self.first, self.last,
                        self.rank, type(e).__name__, e)
            return
        log.info("profile of steps %s (rank %d%s): %s; trace %s", self.steps_done(step), self.rank, cut,
                 summary.line(), trace)

    def report(self, s: Summary, step: int, cut: str) -> str:
        where = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "CPU"
        done = max(step - (self.first - 1), 0)
        head = (f"# Profile: steps {self.steps_done(step)}, rank {self.rank}{cut}\n\n"
                f"Device: {where}. {done} optimizer step(s), {s.wall_ms:.2f} ms per step (wall, device "
                "work included, and any validation or checkpoint save in the window: the `validate` "
                "and `save` phases). Phases are host time, each including the ones it calls; a phase that "
                "waits for the device (`flags` reads the agreed flag vector back, DeepSpeed's `step` "
                "its gradient norm) includes that wait.\n\n")
        return head + s.phase_table() + "\n\n" + s.class_table() + "\n"


__all__ = ["StepProfiler", "Summary", "summarize", "union_length", "classify", "markdown_table",
           "check_profile_config", "KERNEL_CLASSES", "PHASES"]
