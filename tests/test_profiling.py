"""``train.profile_steps``: the profiled window, its summary and its files (vltrain/profiling.py).

The whole job under the profiler (2 ranks, a window cut short by a stop signal, losses equal to
an unprofiled run's) is tests/test_engine.py's run P; here the pieces, with the real profiler.
"""
import gzip
import json
import logging
import os

import pytest
import torch

from vltrain.config import ConfigError, TrainConfig
from vltrain.profiling import (CPU_OP_CLASSES, CPU_OTHER, KERNEL_CLASSES, KERNEL_OTHER, StepProfiler, classify,
                               summarize, union_length)

# Kernel names as the H100 profiles of this model printed them (BENCHMARKS.md).
H100_KERNELS = {
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel__5x_cublas": "GEMM",
    "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN": "GEMM",
    "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64_4x1x1_kernel0_0": "attention",
    "fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<cutlass::bfloat16_t>)": "attention",
    "triton_poi_fused_gelu_view_1": "Triton (compiled)",
    "triton_per_fused__to_copy_add_native_dropout_native_layer_norm_view_0": "Triton (compiled)",
    "void multi_tensor_apply_kernel<TensorListMetadata<4>, AdamFunctor<float, int>, float, float>": "optimizer",
    "ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)": "communication (NCCL)",
    "Memcpy HtoD (Pinned -> Device)": "copies and sets",
    "void at::native::index_elementwise_kernel<128, 4, at::native::gpu_index_kernel<>>": KERNEL_OTHER,
}


@pytest.mark.parametrize("name, cls", sorted(H100_KERNELS.items()))
def test_kernel_classes(name, cls):
    assert classify(name, KERNEL_CLASSES, KERNEL_OTHER) == cls


def test_cpu_operator_classes():
    got = {n: classify(n, CPU_OP_CLASSES, CPU_OTHER) for n in
           ("aten::addmm", "aten::mm", "aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
            "aten::_fused_adamw_", "aten::_foreach_add_", "c10d::allreduce_", "aten::copy_", "aten::mma_stub")}
    assert got == {"aten::addmm": "GEMM", "aten::mm": "GEMM", "aten::bmm": "GEMM",
                   "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
                   "aten::_fused_adamw_": "optimizer", "aten::_foreach_add_": "optimizer",
                   "c10d::allreduce_": "communication", "aten::copy_": CPU_OTHER, "aten::mma_stub": CPU_OTHER}


def test_union_length_counts_overlaps_once():
    assert union_length([]) == 0
    assert union_length([(0, 10), (20, 25)]) == 15                 # disjoint
    assert union_length([(0, 10), (5, 12), (11, 13)]) == 13        # chained overlaps
    assert union_length([(20, 30), (0, 100), (40, 50)]) == 100     # nested, unsorted
    assert union_length([(0, 5), (5, 7)]) == 7                     # touching


def _profiled_steps(steps: int, profiler: StepProfiler, start_step: int = 0):
    """A small matmul training loop driven like Trainer.train(): phases, then at_step."""
    torch.manual_seed(0)
    w = torch.randn(64, 64, requires_grad=True)
    opt = torch.optim.AdamW([w], fused=True)          # as the trainer's engine (torch_adam, fused)
    step = start_step
    profiler.at_step(step)
    while step < start_step + steps:
        with profiler.phase("forward"):
            loss = (torch.randn(32, 64) @ w).square().mean()
        with profiler.phase("backward"):
            loss.backward()
        with profiler.phase("step"):
            opt.step()
            opt.zero_grad()
        step += 1
        profiler.at_step(step)
    return step


def _train_cfg(**kw) -> TrainConfig:
    return TrainConfig(max_steps=kw.pop("max_steps", 100), **kw)


def test_window_writes_trace_and_summary(tmp_path, caplog):
    prof = StepProfiler(_train_cfg(profile_steps=2, profile_start=3), str(tmp_path), 0, 1, torch.device("cpu"))
    reports = []
    prof.on_report = lambda md, step: reports.append((md, step))          # the trainer: TensorBoard
    with caplog.at_level(logging.INFO, logger="vltrain.profiling"):
        end = _profiled_steps(8, prof)
        prof.close(end, "the run's last step")
    out = tmp_path / "profile" / "steps_4-5"
    assert reports == [((out / "rank0.md").read_text(), 5)]
    assert sorted(os.listdir(out)) == ["rank0.md", "rank0.pt.trace.json.gz"]
    names = [e.get("name") for e in json.load(gzip.open(out / "rank0.pt.trace.json.gz"))["traceEvents"]]
    # steps 4 and 5 only: two of each phase, none from the steps around the window
    assert [names.count(f"vltrain.{p}") for p in ("forward", "backward", "step")] == [2, 2, 2]
    md = (out / "rank0.md").read_text()
    assert md.startswith("# Profile: steps 4-5, rank 0\n") and "cut short" not in md
    for row in ("| forward | 1 |", "| backward | 1 |", "| step | 1 |", "| GEMM |", "| optimizer |"):
        assert row in md, (row, md)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("profile of steps 4-5")]
    assert len(lines) == 1 and "ms/step; aten operators: " in lines[0] and "GEMM" in lines[0]


def test_summary_accounts_for_the_steps():
    from torch.profiler import ProfilerActivity, profile
    x = torch.randn(128, 128)
    with profile(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(4):
            with torch.profiler.record_function("vltrain.forward"):
                x @ x
    s = summarize(p, 4, wall_s=0.2)
    assert s.wall_ms == pytest.approx(50.0) and not s.on_device and s.idle_ms is None
    assert s.phases == [("forward", 1.0, pytest.approx(s.phases[0][2]))] and s.phases[0][2] > 0
    assert dict(s.classes)["GEMM"] > 0
    assert dict(s.classes)["GEMM"] <= s.phases[0][2] + 1e-6         # self time inside the phase


def test_window_cut_short_says_so(tmp_path):
    prof = StepProfiler(_train_cfg(profile_steps=10, profile_start=1, profile_ranks=[1]), str(tmp_path), 1, 2,
                        torch.device("cpu"))
    end = _profiled_steps(4, prof)
    assert prof.active
    prof.close(end, "stop signal")
    assert not prof.active
    md = (tmp_path / "profile" / "steps_2-11" / "rank1.md").read_text()
    assert md.startswith("# Profile: steps 2-4, rank 1; cut short at step 4 (stop signal)\n")
    assert "| forward | 1 |" in md


def test_only_listed_ranks_profile(tmp_path):
    cfg = _train_cfg(profile_steps=1, profile_start=0, profile_ranks=[1])
    assert not StepProfiler(cfg, str(tmp_path), 0, 2, torch.device("cpu")).enabled
    assert StepProfiler(cfg, str(tmp_path), 1, 2, torch.device("cpu")).enabled
    assert not StepProfiler(_train_cfg(), str(tmp_path), 0, 1, torch.device("cpu")).enabled    # off by default


def test_a_run_that_misses_the_window_says_why(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="vltrain.profiling"):
        resumed = StepProfiler(_train_cfg(profile_steps=2, profile_start=3), str(tmp_path), 0, 1, torch.device("cpu"))
        _profiled_steps(3, resumed, start_step=10)          # resumed at step 10, past steps 4-5
        short = StepProfiler(_train_cfg(profile_steps=2, profile_start=30, max_steps=5), str(tmp_path), 0, 1,
                             torch.device("cpu"))
        short.close(_profiled_steps(5, short), "the run's last step")
        at_end = StepProfiler(_train_cfg(profile_steps=2, profile_start=5, max_steps=5), str(tmp_path), 0, 1,
                              torch.device("cpu"))
        at_end.close(_profiled_steps(5, at_end), "the run's last step")   # window after the last step
    msgs = [r.getMessage() for r in caplog.records]
    assert any("starts at step 10, past the profiled window (steps 4-5)" in m for m in msgs), msgs
    assert any("ended at step 5 (the run's last step), before the profiled window (steps 31-32)" in m for m in msgs)
    assert any("ended at step 5 (the run's last step), before the profiled window (steps 6-7)" in m for m in msgs)
    assert not (tmp_path / "profile").exists()


def test_a_failed_export_is_logged_not_raised(tmp_path, caplog):
    blocker = tmp_path / "run"
    blocker.write_text("a file where the run folder would be")
    prof = StepProfiler(_train_cfg(profile_steps=1, profile_start=0), str(blocker), 0, 1, torch.device("cpu"))
    with caplog.at_level(logging.WARNING, logger="vltrain.profiling"):
        _profiled_steps(2, prof)
    assert not prof.active
    assert any("profile of steps 1-1 on rank 0 not written: " in r.getMessage() for r in caplog.records)


def test_a_profiler_that_cannot_start_is_logged_not_raised(tmp_path, caplog, monkeypatch):
    """E.g. CUPTI unavailable on a cluster's nodes: the run goes on without a profile."""
    def refuse(self):
        raise RuntimeError("CUPTI_ERROR_NOT_INITIALIZED")
    monkeypatch.setattr(torch.profiler.profile, "start", refuse)
    prof = StepProfiler(_train_cfg(profile_steps=2, profile_start=1), str(tmp_path), 0, 1, torch.device("cpu"))
    with caplog.at_level(logging.WARNING, logger="vltrain.profiling"):
        end = _profiled_steps(4, prof)
        prof.close(end, "the run's last step")
    assert not prof.active and not (tmp_path / "profile").exists()
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs == ["train.profile_steps: the profiler did not start on rank 0 (RuntimeError: "
                    "CUPTI_ERROR_NOT_INITIALIZED): no profile"], msgs


def test_an_error_in_the_first_profiled_step_still_writes_the_window(tmp_path):
    prof = StepProfiler(_train_cfg(profile_steps=2, profile_start=3), str(tmp_path), 0, 1, torch.device("cpu"))
    prof.at_step(3)                              # the window opens after step 3 ...
    with prof.phase("forward"):
        torch.randn(8, 8) @ torch.randn(8, 8)
    prof.close(3, "RuntimeError")               # ... and step 4 fails
    md = (tmp_path / "profile" / "steps_4-5" / "rank0.md").read_text()
    assert md.startswith("# Profile: steps 4 (none completed), rank 0; cut short at step 3 (RuntimeError)\n")


@pytest.mark.parametrize("kw, key", [
    (dict(profile_steps=-1), "train.profile_steps"),
    (dict(profile_steps=2, profile_start=-3), "train.profile_start"),
    (dict(profile_steps=2, profile_ranks=[0, 2]), "train.profile_ranks"),
    (dict(profile_steps=2, profile_ranks=[]), "train.profile_ranks"),
])
def test_bad_profile_config_names_the_key(tmp_path, kw, key):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        StepProfiler(_train_cfg(**kw), str(tmp_path), 0, 2, torch.device("cpu"))


def test_cpu_attention_counts_what_it_calls():
    """SDPA's math kernel (what the CPU runs where no fused kernel applies) is matrix products and
    a softmax under one attention operator: they count as attention, not as GEMM; a plain matrix
    product beside it stays GEMM."""
    from torch.profiler import ProfilerActivity, profile
    q = torch.randn(4, 2, 64, 32)
    mask = torch.ones(64, 64, dtype=torch.bool).tril()
    w = torch.randn(256, 256)
    with profile(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(3):
            torch.ops.aten._scaled_dot_product_attention_math(q, q, q, attn_mask=mask)
            w @ w
    events = p.events()
    outer = sum(e.cpu_time_total for e in events if e.key == "aten::_scaled_dot_product_attention_math")
    inner_bmm = sum(e.self_cpu_time_total for e in events if e.key == "aten::bmm")
    plain_mm = sum(e.self_cpu_time_total for e in events if e.key == "aten::mm")
    assert inner_bmm > 0 and plain_mm > 0
    s = dict(summarize(p, 3, wall_s=1.0).classes)                      # ms per step
    assert s["attention"] == pytest.approx(outer / 3e3, rel=1e-6)
    assert s["GEMM"] == pytest.approx(plain_mm / 3e3, rel=1e-6)         # the attention's bmm's are not here


def test_cpu_communication_counts_gloo_collectives(tmp_path):
    """A gloo collective is a ``c10d::`` operator on the calling thread and a ``gloo:`` range on
    gloo's own thread (no aten operator: an aten-only count showed no communication at all)."""
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        x = torch.randn(1 << 16)
        with profile(activities=[ProfilerActivity.CPU]) as p:
            for _ in range(3):
                dist.all_reduce(x)
    finally:
        dist.destroy_process_group()
    events = p.events()
    calls = sum(e.self_cpu_time_total for e in events if e.key.startswith("c10d::"))
    transfers = sum(e.cpu_time_total for e in events if e.key.startswith("gloo:"))
    assert calls > 0 and transfers > 0
    s = dict(summarize(p, 3, wall_s=1.0).classes)
    assert s["communication"] == pytest.approx((calls + transfers) / 3e3, rel=1e-6)


class _Recorded:
    """What summarize() reads of a finished torch.profiler.profile, over a given event list."""
    def __init__(self, events):
        self._events = events

    def key_averages(self):
        return self._events.key_averages()

    def events(self):
        return self._events


def test_cuda_summary_skips_the_ranges_gpu_side_annotations():
    """On CUDA kineto records each record_function range twice: on the host and as a GPU-side
    annotation spanning the range's kernels. The CPU reference of the CUDA test below, with
    torch's own event objects: a phase with two kernels and a gap between them."""
    from torch.autograd.profiler_util import EventList, FunctionEvent
    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA

    def ev(i, name, start, end, device=cpu, annotation=False):
        return FunctionEvent(id=i, name=name, thread=0, start_us=start, end_us=end, device_type=device,
                             is_user_annotation=annotation, use_device="cuda", stack=[])
    events = EventList([ev(1, "vltrain.forward", 0, 100, annotation=True),
                        ev(2, "vltrain.forward", 10, 90, cuda, annotation=True),
                        ev(3, "Optimizer.step#FusedAdam.step", 92, 99, cuda, annotation=True),
                        ev(4, "sm90_xmma_gemm_bf16", 10, 30, cuda),
                        ev(5, "triton_poi_fused_gelu", 70, 90, cuda)], use_device="cuda")
    events._build_tree()
    s = summarize(_Recorded(events), 1, wall_s=100e-6)
    assert s.phases == [("forward", 1.0, pytest.approx(0.1))]
    assert dict(s.classes) == {"GEMM": pytest.approx(0.02), "Triton (compiled)": pytest.approx(0.02)}
    assert s.idle_ms == pytest.approx(0.06)              # 100 us wall, kernels busy 40 of it


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CPU reference: the window and summary tests above)")
def test_cuda_window_reports_kernel_classes_and_idle(tmp_path):
    """On a GPU the summary is device time: GEMM and attention kernels classified, the idle time
    (wall minus the union of device intervals) between 0 and the step, the host's waits counted
    (one .item() per step here)."""
    dev = torch.device("cuda")
    prof = StepProfiler(_train_cfg(profile_steps=3, profile_start=1), str(tmp_path), 0, 1, dev)
    w = torch.randn(1024, 1024, device=dev, dtype=torch.bfloat16)
    q = torch.randn(8, 4, 128, 64, device=dev, dtype=torch.bfloat16)
    step = 0
    prof.at_step(step)
    while step < 5:
        with prof.phase("forward"):
            (w @ w).sum()
            torch.nn.functional.scaled_dot_product_attention(q, q, q)
        with prof.phase("flags"):
            (w @ w).sum().item()
        step += 1
        prof.at_step(step)
    md = (tmp_path / "profile" / "steps_2-4" / "rank0.md").read_text()
    classes = {line.split("|")[1].strip() for line in md.splitlines() if line.startswith("| ")}
    assert {"GEMM", "attention", "GPU idle (no kernel or copy running: waiting for the host)"} <= classes, md
    assert "Host waits for the device (`cuda*Synchronize` calls): " in md
    assert md.startswith("# Profile: steps 2-4, rank 0\n\nDevice: ")
    phase_rows = [line for line in md.splitlines() if line.startswith(("| forward |", "| flags |"))]
    assert len(phase_rows) == 2, md          # once each: not again as their GPU-side annotations
