"""Config -> a ready Trainer: distributed init, tokenizer, model, DeepSpeed engine, loaders,
monitor, and resume. Every rank runs this; errors are raised before training starts."""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch

from vltrain.config import Config
from vltrain.engine import checkpoint as ckpt
from vltrain.engine.distributed import init_distributed
from vltrain.engine.ds_config import check_buildable, no_decay_param_groups, precision_of, resolve_ds_config
from vltrain.engine.schedule import linear_warmup_decay
from vltrain.engine.trainer import Trainer
from vltrain.model import VLModel
from vltrain.model.bert_weights import load_into, read_state_dict
from vltrain.tasks import get_task
from vltrain.tokenization import Tokenizer

log = logging.getLogger(__name__)

DEFAULT_DS_CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "ds_configs", "zero2.json")


def run_dir_of(cfg: Config) -> str:
    """Named by the run, not the job: a resubmitted job finds its own checkpoints."""
    return os.path.join(cfg.output_root, cfg.run_name)


def init_weights(model: VLModel, path: str) -> None:
    """train.init_from: a Hugging Face BERT folder, our export, a consolidated .safetensors,
    or one of our DeepSpeed checkpoints (weights only, any ZeRO stage)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"train.init_from={path} does not exist")
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        found = ckpt.resolve_checkpoint(path)
        state = get_fp32_state_dict_from_zero_checkpoint(found.save_dir, tag=found.tag)
        state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        source = found.path
    else:
        state = read_state_dict(path)
        source = path
    with torch.no_grad():
        fresh = load_into(model, state, source=source)
    log.info("initialised from %s (%d tensors fresh)", source, len(fresh))


def find_resume(cfg: Config, run_dir: str) -> Optional[ckpt.Found]:
    r = cfg.train.resume
    if not r:
        return None
    if r == "auto":
        return ckpt.find_resume_point(os.path.join(run_dir, "checkpoints"))
    return ckpt.resolve_checkpoint(r)


def build_training(cfg: Config, ds_config_path: Optional[str] = None) -> Trainer:
    import deepspeed
    from vltrain.data.loader import build_eval_loader, build_train_loader
    from vltrain.monitor import FlopCounter, Monitor, device_peak_tflops

    info = init_distributed(cfg.train.dist_timeout_s)
    from deepspeed.accelerator import get_accelerator
    acc = get_accelerator()
    device = torch.device(acc.device_name(), info.local_rank) if acc.device_name() != "cpu" else torch.device("cpu")
    run_dir = run_dir_of(cfg)

    found = find_resume(cfg, run_dir)
    ds = resolve_ds_config(ds_config_path or DEFAULT_DS_CONFIG, cfg, info.world, acc.device_name())
    if found is not None and found.info.get("universal"):
        ds.setdefault("checkpoint", {})["load_universal"] = True
    check_buildable(ds)
    precision = precision_of(ds)

    tokenizer = Tokenizer(cfg.data.vocab)
    if len(tokenizer) > cfg.model.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but model.vocab_size="
                         f"{cfg.model.vocab_size}")
    torch.manual_seed(cfg.train.seed)          # identical initial weights on every rank
    model = VLModel(cfg.model)
    if cfg.train.init_from and found is None:
        init_weights(model, cfg.train.init_from)
    spec = get_task(cfg.task.name)
    task = spec.build_module(cfg, model)

    engine, _, _, _ = deepspeed.initialize(
        model=task, model_parameters=no_decay_param_groups(task, cfg.train.weight_decay), config=ds,
        lr_scheduler=linear_warmup_decay(cfg))
    torch.manual_seed(cfg.train.seed + 1000 * info.rank)   # dropout streams differ per rank

    loader, _ = build_train_loader(cfg, tokenizer, cfg.train.micro_batch_size, spec.make_collator)
    val_loader = (build_eval_loader(cfg, tokenizer, cfg.train.micro_batch_size, make_collator=spec.make_collator)[0]
                  if cfg.data.val else None)
    float_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    monitor = Monitor(run_dir, rank=info.rank, world_size=info.world, log_every=cfg.train.log_every,
                      peak_tflops=device_peak_tflops(precision, cfg.train.peak_tflops),
                      max_steps=cfg.train.max_steps, log_fn=logging.getLogger("vltrain.train").info)
    trainer = Trainer(cfg, engine, info, loader, val_loader, monitor, FlopCounter(model, cfg.model), run_dir,
                      device, float_dtype, ds, spec=spec, tokenizer=tokenizer)
    if found is not None:
        trainer.resume_from(found)
    return trainer
