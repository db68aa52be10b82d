"""Config -> a ready Trainer: distributed init, tokenizer, model, DeepSpeed engine, loaders,
monitor, and resume. Every rank runs this; errors are raised before training starts."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from typing import Optional

import torch
import yaml

from vltrain.ckpt.layout import locate, read_config
from vltrain.config import CHECKOUT, Config, check_placeholders, config_to_dict, flatten
from vltrain.engine import checkpoint as ckpt
from vltrain.engine.distributed import from_main_rank, init_distributed, said_by_main_rank, tensors_from_main_rank
from vltrain.engine.ds_config import (DSConfigError, check_buildable, no_decay_param_groups, precision_of,
                                      resolve_ds_config)
from vltrain.engine.ds_readbacks import drop_step_readbacks
from vltrain.engine.resume import CheckpointError, check_files_open, check_model_matches, check_resume_precision, \
    check_resume_stage, continued_precision, fit_global_batch, reconcile_resume, recorded_setting, saved_config, \
    written_section, written_setting
from vltrain.engine.run_lock import LOCK_FILE, hold_run_lock
from vltrain.engine.schedule import linear_warmup_decay
from vltrain.engine.trainer import Trainer
from vltrain.model import VLModel
from vltrain.model.attention import unusable
from vltrain.model.bert_weights import WEIGHTS_FILES, load_into, read_state_dict
from vltrain.model.vl_model import SEQUENCE_KEYS
from vltrain.redact import redact_tree
from vltrain.tasks import get_task
from vltrain.tokenization import Tokenizer

log = logging.getLogger(__name__)

DEFAULT_DS_CONFIG = os.path.join(CHECKOUT, "ds_configs", "zero2.json")


def run_dir_of(cfg: Config) -> str:
    """Named by the run, not the job: a resubmitted job finds its own checkpoints."""
    return os.path.join(cfg.output_root, cfg.run_name)


def init_weights(model: VLModel, path: str, is_main: Optional[bool] = None) -> dict:
    """train.init_from: a Hugging Face BERT folder, our export, a consolidated .safetensors,
    or one of our DeepSpeed checkpoints (weights only, any ZeRO stage). The main rank (``is_main``;
    None: torch.distributed's rank 0) finds and reads it and broadcasts the tensors
    (``tensors_from_main_rank``): every rank takes its view of the path (a rank whose own listing
    failed would stop alone while the others wait for it).

    Returns what ``load_task_weights`` may take the task's heads from (a fine-tuned VQA head):
    a checkpoint's tensors outside ``model.``, or the whole file of an export (its heads keep
    vltrain's names, which ``load_task_weights`` matches; the model's are matched here)."""
    def where() -> Optional[ckpt.Found]:
        if not os.path.exists(path):
            raise FileNotFoundError(f"train.init_from={path} does not exist{ckpt.tags_beside(path)}")
        if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
            return locate(path)                  # any ZeRO stage, or a resharded (universal) one
        return None
    found = from_main_rank(where, is_main)
    if found is not None:
        from vltrain.ckpt.weights import fp32_state_dict
        from vltrain.model.transformer import named_pieces
        # the blocks' flat parameters split by the checkpoint's own config: a model of another
        # shape is then refused naming the pieces (layers.0.qkv.weight: checkpoint .. vs model ..)
        state = tensors_from_main_rank(lambda: named_pieces(fp32_state_dict(found), read_config(found).model),
                                       is_main)
        task_state = {k: v for k, v in state.items() if not k.startswith("model.")}
        state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        source = found.path
    else:
        state = task_state = tensors_from_main_rank(lambda: read_state_dict(path), is_main)
        source = path
    with torch.no_grad():
        fresh = load_into(model, state, source=source)
    # the model's tensors only: the task's heads are loaded (or not) after, and logged there
    groups = sorted({n.split(".")[0] for n in fresh})
    log.info("model weights from %s (%d of the model's tensors not in it start as initialised%s)", source,
             len(fresh), f": {', '.join(groups)}" if groups else "")
    return task_state


def source_config(path: str) -> Optional[str]:
    """The config vltrain wrote for a train.init_from source: one of our checkpoints (its
    config.yaml), an export-hf folder or a file in one (vltrain_config.yaml), a consolidated
    file or its folder (<stem>.yaml beside the weights); None for other weights (a BERT
    folder) or a checkpoint folder that cannot be located (warned)."""
    from vltrain.ckpt.export import EXPORT_CONFIG, sidecar_paths
    path = os.path.abspath(path)
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    candidates = [os.path.join(folder, EXPORT_CONFIG)]
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            try:
                candidates = [os.path.join(locate(path).path, "config.yaml")]
            except Exception as e:  # noqa: BLE001 — init_weights reports an unusable folder
                log.warning("train.init_from=%s: cannot find the config it was trained with (%s)", path, e)
                return None
        else:   # the file read_state_dict loads from a folder, not another consolidated beside it
            candidates += [sidecar_paths(os.path.join(path, f))[1] for f in WEIGHTS_FILES]
    else:
        candidates.insert(0, sidecar_paths(path)[1])
    return next((yml for yml in candidates if os.path.isfile(yml)), None)


def trained_task(yml: Optional[str]) -> Optional[str]:
    """The task a train.init_from source was trained for, from its saved config
    (``source_config``; None: other weights, None); a config that cannot be read is warned.
    Read as plain YAML: a config of another vltrain version need not load as ours to say its task."""
    if yml is None:
        return None
    try:
        return str(written_setting(yml, "task", "name", "pretrain"))
    except (OSError, yaml.YAMLError, AttributeError) as e:
        log.warning("cannot read %s for the task train.init_from was trained for (%s)", yml, e)
        return None


# Model settings that hold no weights of their own, so that a train.init_from source's tensors
# load under any value: its saved config is the only record of what it was trained with.
WEIGHTLESS_MODEL_KEYS = ("hidden_act", "layer_norm_eps", "image_token_type")


def _weightless_keys(m) -> list[str]:
    keys = list(WEIGHTLESS_MODEL_KEYS)
    if m.region_embedding == "vlbert":      # VL-BERT's sequence around the regions, its [IMG] row
        keys += [*SEQUENCE_KEYS, "img_token_id"] + (["end_token_id"] if m.vlbert_end_token else [])
    return keys


def _shown(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def check_source_settings(cfg: Config, yml: Optional[str]) -> None:
    """Model settings without weights (``_weightless_keys``: the activation, LayerNorm epsilon,
    the regions' segment, VL-BERT's whole-image region and [END] and their token ids): the
    weights cannot tell which a train.init_from source was trained with, its saved config
    (``yml``, ``source_config``'s) can. Another value than the source's is refused in mode=eval
    (the scores would be of a model the weights never were) and warned in training
    (fine-tuning may adapt to it, as from an earlier checkpoint without VL-BERT's sequence keys,
    which default to false as those were trained). So is the text's casing (``data.casing``, as
    the source's run recorded it: ``cfg.data.casing`` is resolved by then). Sources without a
    vltrain config (BERT) are not checked; keys a source's config predates count as their
    defaults (``data.casing``: not checked)."""
    if yml is None:
        return
    from vltrain.config import ModelConfig
    keys, default = _weightless_keys(cfg.model), ModelConfig()
    try:
        model = written_section(yml, "model")
        differ = [(f"model.{k}", type(getattr(default, k))(model.get(k, getattr(default, k))), getattr(cfg.model, k))
                  for k in keys]
        casing = str(written_setting(yml, "data", "casing", "auto"))
    except (OSError, yaml.YAMLError, AttributeError, TypeError, ValueError) as e:
        log.warning("train.init_from=%s: cannot read %s for the model settings it was trained with (%s)",
                    cfg.train.init_from, yml, e)
        return
    if casing in ("cased", "uncased"):
        differ.append(("data.casing", casing, cfg.data.casing))
    differ = [(k, theirs, ours) for k, theirs, ours in differ if theirs != ours]
    if not differ:
        return
    keep = " ".join(f"{k}={_shown(theirs)}" for k, theirs, _ in differ)
    msg = (f"train.init_from={cfg.train.init_from} was trained with "
           + ", ".join(f"{k}={_shown(theirs)}" for k, theirs, _ in differ) + f" ({yml}), this run has "
           + ", ".join(f"{k}={_shown(ours)}" for k, _, ours in differ)
           + ": settings without weights of their own, which the weights cannot tell")
    if cfg.mode == "eval":
        raise ValueError(msg + f"; evaluate with the source's settings: {keep}")
    log.warning("%s; fine-tuning starts from weights that never saw them (set %s to keep the source's)", msg, keep)


def source_facts(path: str) -> tuple[Optional[str], Optional[str], str]:
    """(its saved config, the task it was trained for, its answer vocabulary's sha256) of a
    train.init_from source (``source_config``, ``trained_task``, ``recorded_answer_vocab``)."""
    saved = source_config(path)
    return saved, trained_task(saved), recorded_answer_vocab(saved)


def recorded_answer_vocab(yml: Optional[str]) -> str:
    """``task.answer_vocab_sha256`` of a saved config ("" without one, or a config older than it)."""
    return str(recorded_setting(yml, "task", "answer_vocab_sha256", ""))


def segment_b_from_a(model: VLModel) -> None:
    """``train.init_segment_b_from_a``: segment B's token-type embedding (row 1) starts as
    segment A's (row 0), as VL-BERT's VCR fine-tuning does (``PARTIAL_PRETRAIN_SEGMB_INIT``):
    its pretraining feeds text as segment A only, so row B is still BERT's when the answer
    (segment B) first reads it. ``build_training`` calls it in training only, and not from a
    source already fine-tuned for the task (training continued from it keeps its row B)."""
    table = model.embeddings.token_type.weight
    if table.shape[0] < 2:
        raise ValueError(f"train.init_segment_b_from_a: model.type_vocab_size={table.shape[0]} has no segment B")
    with torch.no_grad():
        table[1].copy_(table[0])
    log.info("train.init_segment_b_from_a: segment B's token-type embedding starts as segment A's")


def load_task_weights(task: torch.nn.Module, task_state: dict, source: str, require_heads: bool,
                      same_task: bool = False, skip: str = "") -> None:
    """Copy a checkpoint's task-level tensors (heads) into the task module where the names
    match. ``require_heads`` (mode=eval): every task-level parameter must come from the
    checkpoint, so a checkpoint of another task is an error rather than random predictions.
    ``same_task``: the source was trained for this task (``trained_task``), so a head tensor
    of it that fits no parameter is another layout of this head, named as such. ``skip``: why
    none may be loaded (``head_source_problem``); the heads start as the task builds them."""
    own = {k: v for k, v in task.state_dict().items() if not k.startswith("model.")}
    if skip:
        fits = sorted({n.split(".")[0] for n in task_state if n in own})     # what name matching would load
        if fits:
            log.warning("train.init_from=%s: its %s weights not loaded: %s", source, ", ".join(fits), skip)
        task_state = {}
    loaded = []
    with torch.no_grad():
        for name, t in task_state.items():
            if name not in own:
                continue
            if own[name].shape != t.shape:
                raise ValueError(f"train.init_from={source}: {name} has shape {tuple(t.shape)} but the "
                                 f"{type(task).__name__} expects {tuple(own[name].shape)}")
            own[name].copy_(t.to(own[name].dtype))
            loaded.append(name)
    # A task tensor of the checkpoint under one of this module's heads but with no parameter to
    # go to: the head's layout changed since it was written (RefCOCO's, for one). Say so
    # rather than start that head fresh in silence.
    heads = {n.split(".")[0] + "." for n in own}
    stale = sorted(n for n in task_state if n not in own and n.startswith(tuple(heads)))
    if stale and same_task:
        msg = (f"train.init_from={source}: {stale[:6]} match no parameter of the {type(task).__name__}, "
               f"whose head has other parameters ({sorted(set(own) - set(loaded))[:6]}): written by "
               f"another layout of this task's head (another task.vqa_head, or an earlier vltrain's)")
        if require_heads:
            raise ValueError(msg + "; evaluate it with the vltrain version that trained it")
        log.warning("%s; that head starts fresh", msg)
    missing = sorted(set(own) - set(loaded))
    if require_heads and missing:
        raise ValueError(f"train.init_from={source or '(empty)'} has no weights for {missing[:6]}: mode=eval "
                         f"needs a checkpoint fine-tuned for this task ({type(task).__name__})")
    if loaded:
        log.info("task weights from %s: %s", source, ", ".join(sorted({n.split('.')[0] for n in loaded})))
    if missing:     # in training (eval refused above): say which head starts as the task builds it
        log.info("task weights not in %s, as the task initialises them (fresh or from the model's heads): %s",
                 source, ", ".join(sorted({n.split('.')[0] for n in missing})))


def head_source_problem(cfg: Config, source_task: Optional[str], source_vocab: str) -> str:
    """Why a train.init_from source's task heads must not be loaded, or "": trained for another
    task (a VQA answer head and a grounding head share names and shapes, so name matching loaded
    one into the other), or, for VQA training, on another answer vocabulary than ``data.train``'s
    (``task.answer_vocab_sha256``, set by the task's build: class i's row would score another
    answer). A source without a saved config (a BERT folder) has no task heads to load."""
    if source_task is not None and source_task != cfg.task.name:
        return f"it was trained for task {source_task}, not {cfg.task.name}: its heads mean other things"
    if cfg.task.name == "vqa" and cfg.mode == "train" and source_vocab and source_vocab != cfg.task.answer_vocab_sha256:
        return ("it was trained on another answer vocabulary (task.answer_vocab_sha256 "
                f"{source_vocab[:12]}...) than data.train's ({cfg.task.answer_vocab_sha256[:12]}...): its class ids "
                "name other answers")
    return ""


def find_resume(cfg: Config, run_dir: str) -> Optional[ckpt.Found]:
    for where in (run_dir, os.path.join(run_dir, "checkpoints")):
        if os.path.isfile(os.path.join(where, ckpt.COMPLETE_FILE)):
            # a checkpoint resharded or copied to where the run's folder (or its folder of tags)
            # goes: resume=auto would not see it, and the run would start over on top of it
            step = (ckpt.read_ckpt_info(where) or {}).get("step")
            tag = ckpt.step_tag(int(step)) if step is not None else "step_<its step, 8 digits>"
            raise CheckpointError(f"{where} is a checkpoint itself, where run_name={cfg.run_name} keeps its "
                                  f"{'folder' if where == run_dir else 'folder of tags'}: move it to "
                                  f"{os.path.join(run_dir, 'checkpoints', tag)} (train.resume=auto resumes that), "
                                  f"or resume it with train.resume={where} under another run_name")
    r = cfg.train.resume
    if not r:
        return None
    if r == "auto":
        return ckpt.find_resume_point(os.path.join(run_dir, "checkpoints"))
    return locate(r, check_files=False)    # its files: reconcile_resume, for the world it resumes on


# Keys a resume is expected to change (or that change nothing about the training itself).
_RESUME_KEYS = {"train.resume", "train.init_from", "train.grad_accum", "data.num_canonical_nodes", "data.cache_dir",
                "train.global_batch",         # reconcile_resume refuses one other than the checkpoint's
                "output_root", "train.dist_timeout_s", "train.log_every", "data.num_workers",
                "task.answer_vocab_sha256",    # filled by the VQA task later in the build: checked there
                "data.casing"}                 # auto resolved with the tokenizer: checked there


def warn_config_changes(cfg: Config, tag_dir: str) -> list[str]:
    """Settings of this resume that differ from the checkpoint's ``config.yaml``, logged: a
    resume with the overrides of the first command left out (another max_steps, lr...) runs
    on, and is no longer the run that was interrupted."""
    saved_cfg = saved_config(tag_dir)
    if saved_cfg is None:      # an old or foreign config: nothing to compare
        return []
    saved = flatten(config_to_dict(saved_cfg))
    now = flatten(redact_tree(config_to_dict(cfg)))    # as save_config wrote the checkpoint's
    diffs = [f"{k} {saved[k]!r} -> {now[k]!r}" for k in now
             if k in saved and now[k] != saved[k] and k not in _RESUME_KEYS]
    if diffs:
        log.warning("resuming %s with settings that differ from its config.yaml (pass the first run's overrides "
                    "again for an exact continuation): %s", tag_dir, "; ".join(diffs[:12])
                    + (f"; ... {len(diffs) - 12} more" if len(diffs) > 12 else ""))
    return diffs


def set_aside_previous_run(run_dir: str) -> Optional[str]:
    """A run that does not resume, in a folder that already holds a run's checkpoints: move
    them to ``checkpoints.replaced-<UTC time>/`` (kept, never deleted) and say so. Left in
    place, the two runs' tags would mix: a crash before this run's first save would resume
    that run (``train.resume=auto``, a Slurm requeue), and its tags past this run's last step
    would stay listed beside this run's. Called once the build has succeeded (a start that
    fails on bad input moves nothing), on the main rank. Returns the message, or None."""
    save_dir = os.path.join(run_dir, "checkpoints")
    prev = ckpt.find_resume_point(save_dir) if os.path.isdir(save_dir) else None
    if prev is None:
        return None
    aside = f"{save_dir}.replaced-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    os.rename(save_dir, aside)
    msg = (f"{run_dir} already held a run's checkpoints (up to step {prev.info.get('step')}); this run starts "
           f"from step 0, so they were moved to {aside} (delete it to reclaim the space; to continue that run "
           "instead, move it back to checkpoints/ and add train.resume=auto). Its TensorBoard curves are replaced")
    log.warning("%s", msg)
    return msg


def check_resume_casing(found, casing: str) -> str:
    """``casing`` (what ``data.casing`` resolved to), refused where the resumed checkpoint's run
    recorded the other: its text would be tokenized otherwise from here on (a run written before
    ``data.casing`` records nothing: not checked)."""
    if found is not None:
        saved = str(recorded_setting(os.path.join(found.path, "config.yaml"), "data", "casing", "auto"))
        if saved in ("cased", "uncased") and saved != casing:
            raise ValueError(f"{found.path} trained on {saved} text, and this run's tokenizer reads it {casing}: "
                             f"resume with data.casing={saved}")
    return casing


def set_checkpoint_keys(ds: dict, found, run_dir: str) -> None:
    """What a ds_config cannot know: ``checkpoint.load_universal`` is whether the checkpoint
    resumed is a universal one (its completion record says; a user's ``true`` made DeepSpeed
    look for universal files in every ordinary checkpoint of the run, an AssertionError that
    read like damage at each requeue), and DeepSpeed's own monitors write under the run folder
    (``deepspeed_monitor/``, not a ``DeepSpeedJobName/`` in the working directory shared by
    every run)."""
    universal = bool(found is not None and found.info.get("universal"))
    section = ds.setdefault("checkpoint", {})
    given = section.get("load_universal", universal)
    if given != universal:
        raise DSConfigError(
            f"ds_config 'checkpoint.load_universal' = {json.dumps(given)}, but "
            + (f"{found.path} is {'a universal' if universal else 'an ordinary'} checkpoint" if found is not None
               else "this run resumes nothing")
            + ": vltrain sets it from the checkpoint resumed (universal ones come from vltrain-ckpt reshard); "
              "remove it")
    section["load_universal"] = universal
    for monitor in ("tensorboard", "csv_monitor"):
        conf = ds.get(monitor)
        if isinstance(conf, dict) and conf.get("enabled") and not conf.get("output_path"):
            conf["output_path"] = os.path.join(run_dir, "deepspeed_monitor", "")


def check_tokenizer(cfg: Config, tokenizer: Tokenizer) -> None:
    """The model's token ids agree with the tokenizer's vocabulary."""
    if len(tokenizer) > cfg.model.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but model.vocab_size="
                         f"{cfg.model.vocab_size}")
    # VL-BERT adds the [IMG] embedding (by model.img_token_id) to every region; a vocab.txt
    # without [unusedK] slots gets [IMG] appended elsewhere, and a stale id would silently
    # give every region another token's embedding.
    ids = [("[IMG]", "img_token_id", tokenizer.img_id, cfg.model.region_embedding == "vlbert"),
           ("[END]", "end_token_id", tokenizer.end_id, cfg.model.vlbert_end_token)]
    wrong = [(tok, key, i) for tok, key, i, used in ids if used and i != getattr(cfg.model, key)]
    if wrong:       # all at once: a vocab without [unusedK] slots moves both
        raise ValueError(f"data.vocab={cfg.data.vocab} has "
                         + ", ".join(f"{tok} at id {i} but model.{key}={getattr(cfg.model, key)}" for tok, key, i in wrong)
                         + "; set " + " ".join(f"model.{key}={i}" for _, key, i in wrong))


def check_positions(cfg: Config) -> None:
    """Text positions fit the model's position table: found here, not by an index error on the
    device at the first long batch (or, for decoding, at the first validation, hours in)."""
    P = cfg.model.max_position_embeddings
    if cfg.data.max_text_len > P:
        raise ValueError(f"data.max_text_len={cfg.data.max_text_len} exceeds model.max_position_embeddings={P}: "
                         "text positions past the table have no embedding")
    if cfg.task.name == "caption" and cfg.task.max_len + 2 > P:
        raise ValueError(f"task.max_len={cfg.task.max_len}: decoded captions follow [CLS] [SEP] and need "
                         f"{cfg.task.max_len + 2} positions, model.max_position_embeddings={P}; "
                         f"set task.max_len <= {P - 2}")


def make_run_dir(cfg: Config, run_dir: str) -> None:
    """Create the run folder now, before the model is built and the data opened: an
    output_root that cannot hold it is named at start, not minutes later."""
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as e:
        raise ValueError(f"output_root={cfg.output_root!r}, run_name={cfg.run_name!r}: cannot create the run "
                         f"folder {run_dir} ({e.strerror or e}); set output_root to a writable folder") from None


def claim_run_dir(cfg: Config, run_dir: str, is_main: bool) -> None:
    """The main rank makes the run folder and, to train, locks it for this job (``run_lock``); every rank
    gets its verdict, so all stop on the same message. Only the main rank makes the folder:
    it removes it on a failed start, and a slower rank making it after that removal left it
    behind (the others write there after the engine is built)."""
    def claim() -> None:
        make_run_dir(cfg, run_dir)
        if cfg.mode == "train":     # an evaluation writes no checkpoints: it may run beside the training
            hold_run_lock(run_dir, cfg.run_name)
    from_main_rank(claim, is_main)       # any error of it: the other ranks must not wait for it


@contextlib.contextmanager
def removed_if_left_empty(run_dir: str, created: bool):
    """A start that fails after ``make_run_dir`` (a data path, a ds_config, the model's
    shape...) leaves no empty run folder behind: the one this job created (``created``), still
    empty, is removed. Anything written there (a rank's files, the user's) keeps it."""
    try:
        yield
    except BaseException:
        if created:
            try:
                os.unlink(os.path.join(run_dir, LOCK_FILE))    # ours: this job made the folder
            except OSError:
                pass
            try:
                os.rmdir(run_dir)            # only an empty folder; atomic
            except OSError:
                pass
        raise


def warn_flex_shapes(cfg: Config) -> bool:
    """flex outside compiled blocks compiles its kernel once per batch shape (attention.py);
    batches padded to their longest make nearly every new length a compile (tens of seconds on
    a GPU). Warned, not refused: it still trains. True if warned."""
    m = cfg.model
    if m.attention_backend != "flex" or m.compile or cfg.data.pad_to != "longest":
        return False
    log.warning("model.attention_backend=flex with model.compile=false and data.pad_to=longest: FlexAttention "
                "compiles once per batch length, so most batches will compile; set data.pad_to=bucket "
                "(data.buckets) or model.compile=true")
    return True


def build_training(cfg: Config, ds_config_path: Optional[str] = None) -> Trainer:
    import deepspeed
    from vltrain.data.loader import build_eval_loader, build_train_loader
    from vltrain.data.worker_signals import worker_context
    from vltrain.monitor import FlopCounter, Monitor, device_peak_tflops, flop_params

    check_placeholders(cfg)              # before anything starts; init_from once the resume is known
    run_dir = run_dir_of(cfg)
    # Before the ranks meet, so before any rank can have made it (the main rank's answer counts:
    # another rank removing the folder could pull it from under a rank that goes on)
    existed = os.path.isdir(run_dir)
    info = init_distributed(cfg.train.dist_timeout_s)
    from deepspeed.accelerator import get_accelerator
    acc = get_accelerator()
    device = torch.device(acc.device_name(), info.local_rank) if acc.device_name() != "cpu" else torch.device("cpu")

    claim_run_dir(cfg, run_dir, info.is_main)    # before anything of the folder is read
    with removed_if_left_empty(run_dir, info.is_main and not existed):
        # rank 0's view of the folder for all: each rank's own (an NFS client's stale listing at a
        # requeue) could send ranks into different collectives (resume's, or init_from's broadcast)
        found = from_main_rank(lambda: find_resume(cfg, run_dir), info.is_main)
        check_placeholders(cfg, resuming=found is not None)
        asked = cfg.train.precision
        cfg.train.precision, why = continued_precision(asked, cfg, found)   # before the comparisons below
        if found is not None:   # files present; same global batch (grad_accum), world size it can load on
            reconcile_resume(cfg, found, info.world, info.num_nodes)
            check_files_open(found, info.rank)      # before the minutes of building what it would load into
            if info.is_main:
                warn_config_changes(cfg, found.path)
        elif cfg.mode == "train":
            fit_global_batch(cfg, info.world)     # train.global_batch: grad_accum for this job's ranks
            if cfg.train.resume == "auto" and info.is_main:   # a mistyped run_name would otherwise go unnoticed
                log.info("train.resume=auto: no checkpoint under %s; starting at step 0", run_dir)
        if cfg.mode == "train" and info.is_main:   # a recipe's batch assumes a job size: say what this one gives
            t = cfg.train
            log.info("global batch %d samples per step = micro batch %d x grad_accum %d x %d rank(s)",
                     t.samples_per_step(info.world), t.micro_batch_size, t.grad_accum, info.world)
        if cfg.data.num_workers > 0:
            worker_context()     # the DataLoader workers' forkserver: its imports overlap the model's build
        ds = resolve_ds_config(ds_config_path or DEFAULT_DS_CONFIG, cfg, info.world, acc.device_name(),
                               precision_why=why if asked == "auto" and cfg.train.precision != "auto" else "")
        if cfg.train.precision == "auto":
            cfg.train.precision, why = precision_of(ds), f"the ds_config's or this machine's ({acc.device_name()})"
        if asked == "auto" and info.is_main:
            log.info("train.precision=auto: %s (%s)", cfg.train.precision, why)
        set_checkpoint_keys(ds, found, run_dir)
        if found is not None:
            check_resume_stage(found, ds)           # a stage its files can be loaded under
            check_resume_precision(found, cfg.train.precision)
        check_buildable(ds)
        precision = precision_of(ds)

        tokenizer = Tokenizer(cfg.data.vocab, cfg.data.casing)
        if info.is_main:
            log.info("tokenizer %s: %s (%s)", tokenizer.vocab_file, "lowercased" if tokenizer.lowercase else "cased",
                     tokenizer.casing_source)
        cfg.data.casing = check_resume_casing(found, "uncased" if tokenizer.lowercase else "cased")
        check_tokenizer(cfg, tokenizer)
        check_positions(cfg)
        problem = unusable(cfg.model.attention_backend, device.type, cfg.model.attention_dropout, cfg.mode == "train")
        if problem:      # before the first step would fail, leaving the run folder behind
            raise ValueError(problem)
        if info.is_main:
            warn_flex_shapes(cfg)
        if cfg.mode == "eval" and cfg.task.name == "caption":   # rank 0 scores: its Java, now, not after
            from vltrain.metrics.caption import JavaNotFoundError, require_java     # the split is decoded

            def java_present() -> None:
                try:
                    require_java()
                except JavaNotFoundError as e:
                    raise ValueError(f"mode=eval, task.name=caption scores by the COCO protocol on rank 0: "
                                     f"{e}") from None
            from_main_rank(java_present, info.is_main)
        torch.manual_seed(cfg.train.seed)          # identical initial weights on every rank
        model = VLModel(cfg.model)
        task_state: dict = {}
        source_task, source_vocab = None, ""
        if cfg.train.init_from and found is None:
            with said_by_main_rank(info.is_main):    # the source's notes, alike on every rank
                task_state = init_weights(model, cfg.train.init_from, info.is_main)
                # the source's saved config as rank 0 reads it: a rank failing to would take other
                # branches (its heads, its vocabulary) than the others
                saved, source_task, recorded_vocab = from_main_rank(lambda: source_facts(cfg.train.init_from),
                                                                    info.is_main)
                source_vocab = recorded_vocab if source_task == "vqa" else ""
                from_main_rank(lambda: check_source_settings(cfg, saved), info.is_main)
                if cfg.mode == "eval" and cfg.task.name == "vqa" and not cfg.task.answer_vocab_sha256:
                    # the vocabulary the head was trained on: build_vqa refuses a split converted with another
                    cfg.task.answer_vocab_sha256 = recorded_vocab
                    # (weights of another task have no VQA head: load_task_weights says so below)
                    if not cfg.task.answer_vocab_sha256 and source_task in (None, "vqa"):
                        log.warning("train.init_from=%s records no answer vocabulary (a config older than "
                                    "task.answer_vocab_sha256): data.%s's cannot be checked against the head's",
                                    cfg.train.init_from, cfg.task.eval_split)
                if cfg.train.init_segment_b_from_a and cfg.mode == "train":     # eval keeps the trained row
                    if source_task == cfg.task.name:
                        log.warning("train.init_segment_b_from_a: %s was fine-tuned for task %s already: its segment "
                                    "B row is kept", cfg.train.init_from, source_task)
                    else:
                        segment_b_from_a(model)
        elif cfg.mode == "eval":
            raise ValueError("mode=eval needs train.init_from=<checkpoint>: the weights to evaluate")
        from vltrain.model.compile import maybe_compile
        maybe_compile(model)     # model.compile: the layer function compiled, state-dict names unchanged
        spec = get_task(cfg.task.name)
        task = spec.build_module(cfg, model)
        if cfg.mode == "eval" or (cfg.train.init_from and found is None):
            with said_by_main_rank(info.is_main):
                load_task_weights(task, task_state, cfg.train.init_from, require_heads=cfg.mode == "eval",
                                  same_task=source_task == cfg.task.name,
                                  skip=head_source_problem(cfg, source_task, source_vocab))
        if found is not None:
            def resume_matches() -> None:     # rank 0's reading, for every rank
                check_model_matches(found.path, task)   # names the mismatched parameters and shapes
                recorded = recorded_answer_vocab(os.path.join(found.path, "config.yaml"))
                if cfg.task.name == "vqa" and recorded and recorded != cfg.task.answer_vocab_sha256:
                    raise ValueError(f"data.train: its answer_vocab.json differs from the one {found.path} was "
                                     "trained with, so the head's class ids would name other answers; resume with "
                                     "that dataset")
            from_main_rank(resume_matches, info.is_main)

        engine, _, _, _ = deepspeed.initialize(
            model=task, model_parameters=no_decay_param_groups(task, cfg.train.weight_decay), config=ds,
            lr_scheduler=linear_warmup_decay(cfg))
        drop_step_readbacks(engine.optimizer)       # ZeRO-1/2: the step's norm checks stay on the device
        torch.manual_seed(cfg.train.seed + 1000 * info.rank)   # dropout streams differ per rank

        loader = (build_train_loader(cfg, tokenizer, spec.make_collator)[0]
                  if cfg.mode != "eval" else None)    # eval needs no training data
        val_loader = (build_eval_loader(cfg, tokenizer, cfg.train.micro_batch_size, make_collator=spec.make_collator)[0]
                      if cfg.data.val and cfg.mode != "eval" else None)   # eval builds the split it evaluates
        float_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
        monitor = Monitor(run_dir, rank=info.rank, world_size=info.world, log_every=cfg.train.log_every,
                          peak_tflops=device_peak_tflops(precision, cfg.train.peak_tflops),
                          max_steps=cfg.train.max_steps, log_fn=logging.getLogger("vltrain.train").info, device=device)
        flops = FlopCounter(flop_params(task, model, spec.model_heads(cfg)), cfg.model)
        trainer = Trainer(cfg, engine, info, loader, val_loader, monitor, flops, run_dir,
                          device, float_dtype, ds, spec=spec, tokenizer=tokenizer)
        trainer.created_run_dir = info.is_main and not existed
        if found is not None:
            trainer.resume_from(found)
        elif cfg.mode == "train":
            if info.is_main:
                set_aside_previous_run(run_dir)
            monitor.start_over()
    return trainer
