"""How exactly a bf16 DeepSpeed engine sums micro-batch gradients over ``train.grad_accum``.

    python benchmarks/grad_accum_precision.py [--quick] [--out F.md]

DeepSpeed sums a bf16 run's micro-batch gradients in bf16 unless ``data_types.grad_accum_dtype``
says otherwise; vltrain's resolved config sets fp32 for ZeRO-2/3 where grad_accum > 1
(vltrain/engine/ds_config.py).
For each ZeRO stage, grad_accum and accumulation dtype, one real engine (one CPU rank) steps
``grad_accum`` distinct micro-batches of random pretraining samples; the fp32 gradient it hands
its optimizer is compared, by relative L2 error, with two fp64 references computed from the
engine's own bf16 weights on the same micro-batches:
  * "vs the micro-batches' sum": the fp64 sum of each micro-batch's own bf16 gradient (loss /
    grad_accum, as the engine scales it): the error of the summing alone;
  * "vs fp64": the fp64 model's gradient of the same loss: the whole step's error (the bf16
    forward and backward included), which averaging over more micro-batches shrinks.
Both dtypes run in the same process on the same batches. A quick mode (debug model, CI) checks
the rows exist and the fp32 sum is exact.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import REPO, Size, emit_report, make_batch, markdown_table  # noqa: E402
from benchmarks.train_throughput import init_single_process_group  # noqa: E402
from vltrain.config import Config, debug_model_config  # noqa: E402
from vltrain.model import VLModel  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def step_gradients(size: Size, stage: int, accum: str | None, ga: int, seed: int = 0) -> dict:
    """One optimizer step of a bf16 ZeRO-``stage`` engine (``data_types.grad_accum_dtype`` =
    ``accum``; None: as vltrain resolves it) over ``ga`` micro-batches: its accumulated
    gradient's relative error against the fp64 sum of the micro-batches' bf16 gradients and
    against the fp64 model's gradient, and the dtype DeepSpeed summed in."""
    import deepspeed
    from vltrain.engine.ds_config import no_decay_param_groups, resolve_ds_config
    from vltrain.tasks.pretrain import PretrainTask
    cfg = Config(model=size.model)
    cfg.train.micro_batch_size, cfg.train.grad_accum, cfg.train.precision = size.batch, ga, "bf16"
    cfg.train.grad_clip = 0.0
    ds = resolve_ds_config(os.path.join(REPO, "ds_configs", f"zero{stage}.json"), cfg, 1, "cpu")
    if accum is not None:
        ds.setdefault("data_types", {})["grad_accum_dtype"] = accum
    torch.manual_seed(seed)
    task = PretrainTask(VLModel(cfg.model), cfg.objectives)
    bf16, fp64 = copy.deepcopy(task).to(torch.bfloat16), copy.deepcopy(task).to(torch.bfloat16).double()
    eng = deepspeed.initialize(model=task, model_parameters=no_decay_param_groups(task, 0.01), config=ds)[0]
    opt, got = eng.optimizer, []
    if stage == 3:
        flat, groups = (lambda i: opt.fp32_partitioned_groups_flat[i].grad), opt.fp16_groups
    else:
        flat, groups = (lambda i: opt.single_partition_of_fp32_groups[i].grad), opt.bit16_groups
    inner = opt._optimizer_step

    def optimizer_step(i):              # the step's accumulated fp32 gradient, group by group
        got.append(flat(i).detach().double().clone())
        return inner(i)
    opt._optimizer_step = optimizer_step
    batches = [make_batch(size, seed=1000 * seed + j) for j in range(ga)]
    for b in batches:
        loss, _ = eng(b.to("cpu", float_dtype=torch.bfloat16))
        eng.backward(loss)
        eng.step()
    summed_in = str(getattr(opt, "gradient_accumulation_dtype", None))
    eng.destroy()
    names = {id(p): n for n, p in task.named_parameters()}
    refs = []
    for model, dtype in ((bf16, torch.bfloat16), (fp64, torch.float64)):
        total = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in model.named_parameters()}
        for b in batches:
            model.zero_grad(set_to_none=True)
            loss, _ = model(b.to("cpu", float_dtype=dtype))
            (loss / ga).backward()
            for n, p in model.named_parameters():
                if p.grad is not None:
                    total[n] += p.grad.double()
        shape = (lambda p: p.ds_shape) if stage == 3 else (lambda p: p.shape)
        refs.append(torch.cat([total[names[id(p)]].reshape(shape(p)).reshape(-1) for g in groups for p in g]))
    # each group's flat partition may end in alignment padding
    g = torch.cat([flat[: sum(getattr(p, "ds_numel", p.numel()) for p in group)] for flat, group in zip(got, groups)])
    return {"vs_sum": rel(g, refs[0]), "vs_fp64": rel(g, refs[1]), "summed_in": summed_in}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--ga", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    p.add_argument("--quick", action="store_true", help="debug model, grad_accum 1 and 8, ZeRO-2 (CI)")
    p.add_argument("--out", help="write the Markdown report here too")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.quick:
        model = debug_model_config()
        args.batch, args.ga, args.stages = 4, [1, 8], [2]
    else:
        model = debug_model_config(num_layers=args.layers, hidden_size=args.hidden, num_heads=4,
                                   intermediate_size=4 * args.hidden, region_feat_dim=256)
    size = Size(f"{model.num_layers} layers, hidden {model.hidden_size}", model, batch=args.batch, regions=10, text=20)
    init_single_process_group(torch.device("cpu"))
    rows = []
    for stage in args.stages:
        for ga in args.ga:
            r = {}
            for accum in ("bf16", "fp32"):
                log(f"ZeRO-{stage}, grad_accum {ga}, {accum} sum")
                r[accum] = step_gradients(size, stage, accum, ga)
            rows.append([f"ZeRO-{stage}", ga, 100 * r["bf16"]["vs_sum"], 100 * r["fp32"]["vs_sum"],
                         100 * r["bf16"]["vs_fp64"], 100 * r["fp32"]["vs_fp64"]])
    n = sum(p.numel() for p in VLModel(model).parameters())
    md = [f"Model: {size.name} ({n / 1e6:.1f}M parameters), micro-batch {size.batch} x ({size.regions} regions + "
          f"{size.text} text), bf16, one CPU rank; relative L2 error of the step's accumulated gradient, %.", "",
          markdown_table(["stage", "grad_accum", "bf16 sum vs the micro-batches' sum", "fp32 sum vs the micro-batches' "
                          "sum", "bf16 sum vs fp64", "fp32 sum vs fp64"], rows)]
    emit_report("\n".join(md), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
