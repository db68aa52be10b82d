"""One typed config tree: YAML file + dotted ``key=value`` overrides; unknown keys are errors.

    cfg = load_config("configs/debug.yaml", ["train.lr=3e-4", "model.num_layers=4"])
    save_config(cfg, "run/config.yaml"); assert load_config("run/config.yaml") == cfg
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional

import yaml

from vltrain.redact import redact


class ConfigError(ValueError):
    """A config problem; the message names the offending key. Credentials in a value it quotes
    are masked here, as the message may be printed where no redacting log is (the Slurm
    templates' config check)."""

    def __init__(self, message: str):
        super().__init__(redact(message))


@dataclass
class ModelConfig:
    """The unified transformer. Text part mirrors BERT's config.json semantics."""
    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    # gelu (erf, as BERT) | gelu_tanh (transformers' gelu_pytorch_tanh) | gelu_new | relu
    hidden_act: Literal["gelu", "gelu_tanh", "gelu_new", "relu"] = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    # how the blocks' hidden dropouts draw their masks: torch = F.dropout (in compiled blocks,
    # Inductor's RNG); packed = 16-bit numbers, 8 per Philox call, kept as bits (packed_dropout.py)
    hidden_dropout_masks: Literal["torch", "packed"] = "torch"
    initializer_range: float = 0.02
    pad_token_id: int = 0
    # Regions.
    region_embedding: Literal["vlp", "vlbert"] = "vlp"
    region_feat_dim: int = 2048
    num_region_classes: int = 1601           # detector classes incl. background
    use_cls_probs: bool = True               # vlp: the LN(W_c C) class-distribution term
    geometry_conf: bool = True               # vlp: append confidence (max non-bg class prob) to G
    vlbert_geometry_dim: int = 2048          # vlbert: width of the sin/cos box embedding (paper: 2048);
                                             # a multiple of 8 (4 coordinates x sin/cos x frequencies)
    # vlbert: VL-BERT's Dropout-FC-ReLU + a LayerNorm per token kind; linear: FC only
    # (checkpoints written before)
    vlbert_visual_embedding: Literal["vlbert", "linear"] = "vlbert"
    vlbert_visual_scale_init: float = 0.0    # vlbert: the LayerNorms' initial gain (VL-BERT's
                                             # visual_scale_*_init: 0 = the text starts as BERT's)
    # vlbert: the visual term of rows without an image: aux = VL-BERT's learned
    # aux_text_visual_embedding; none = zero (checkpoints written before)
    vlbert_text_only_visual: Literal["aux", "none"] = "aux"
    image_token_type: int = 0                # segment id of regions (vlbert recipes use 2 = "C")
    img_token_id: int = 1                    # [IMG] = [unused0] in BERT's vocab (vlbert)
    # vlbert: VL-BERT's code's sequence around the regions: the whole image as a region before
    # them (its ADD_IMAGE_AS_A_BOX) and an [END] token after them (false: checkpoints written
    # before; the VL-BERT recipes set both)
    vlbert_image_box: bool = False
    vlbert_end_token: bool = False
    end_token_id: int = 2                    # [END] = [unused1] in BERT's vocab (vlbert_end_token)
    # Execution.
    # eager is the reference every other backend is tested against; auto picks the fastest
    attention_backend: Literal["eager", "sdpa", "flex", "varlen", "triton", "auto"] = "eager"
    activation_checkpointing: bool = False
    compile: bool = False                    # torch.compile the transformer layer function (compile.py)


@dataclass
class DataConfig:
    train: str = ""                          # MDS dataset: local dir or s3://bucket/prefix
    val: str = ""
    test: str = ""                           # evaluation-only split (mode=eval task.eval_split=test)
    text_train: str = ""                     # text-only MDS stream mixed in (VL-BERT)
    text_proportion: float = 0.0             # fraction of samples drawn from text_train
    cache_dir: str = ""                      # per-node local cache root (node id appended); "":
                                             # <temp dir>/vltrain_cache-<user> (TMPDIR honoured)
    vocab: str = "bert-base-uncased"         # built-in name, vocab.txt, or a folder holding one
    # auto: the vocab folder's tokenizer_config.json (do_lower_case), else cased where the
    # vocabulary has words with capitals A-Z; a run records what auto chose
    casing: Literal["auto", "uncased", "cased"] = "auto"
    max_text_len: int = 40
    max_regions: int = 100
    # pretraining, image-caption samples: > 0 = VL-BERT's joint budget (its seq_len): regions
    # ordered by detector confidence, text + regions cut together to this many positions
    # (data/collate.share_budget); 0 = max_text_len and max_regions apply separately
    max_sequence: int = 0
    pad_to: Literal["longest", "bucket"] = "longest"
    buckets: list[int] = field(default_factory=lambda: [16, 32, 48, 64])
    num_workers: int = 2
    shuffle: bool = True
    skip_bad_samples: bool = False           # count and report bad samples instead of failing
    hard_class_targets: bool = False         # one-hot obj_labels (bottom-up objects_id) when cls_prob is absent
    # VL-BERT's whole-image feature for text: stored (the dataset's image_feature, else
    # regions_mean) | regions_mean
    image_feature: Literal["stored", "regions_mean"] = "stored"
    # auto (xxh64 where the index records it) | "" (none) | a hash the index must record
    # (streaming's algorithms: checked as the config loads)
    validate_hash: Literal["auto", "", "blake2b", "blake2s", "md5", "sha1", "sha224", "sha256", "sha384", "sha3_224",
                           "sha3_256", "sha3_384", "sha3_512", "sha512", "xxh128", "xxh32", "xxh3_128", "xxh3_64",
                           "xxh64"] = "auto"
    download_timeout: float = 60.0           # seconds per shard download
    # attempts in all at a failed shard download, retried after 1, 2, 4, ... s (streaming's backoff): 6 rides
    # out ~30 s of storage outage, where streaming's 2 lost the job to a 2-second one
    download_retry: int = 6
    cache_limit: str = ""                    # e.g. "50gb": evict old shards past this, per dataset ("" = keep all)
    num_canonical_nodes: int = 0             # streaming's shuffle/partition unit; 0 = #nodes of
                                             # the first run (keep it fixed to resume elsewhere)


@dataclass
class ObjectivesConfig:
    seq2seq_prob: float = 0.75               # lambda: P(seq2seq) per example, else bidirectional
    mlm: bool = True
    mlm_prob: float = 0.15
    max_pred: int = 20
    # How MLM and MRC choose their targets: "count", VLP's rule (round(prob * n), at least one,
    # at most max_pred tokens); "bernoulli", VL-BERT's code (each word / region on its own with
    # the prob, no cap, possibly none, a word's pieces corrupted alike)
    mask_sampling: Literal["count", "bernoulli"] = "count"
    mask_token_prob: float = 0.8
    random_token_prob: float = 0.1
    whole_word_mask: bool = False
    mlm_weight: float = 1.0
    separate_text_mlm: bool = False          # MLM of text-only rows is its own mean, added to that of
                                             # image-text rows (VL-BERT's mlm_loss_aux + mlm_loss_wvc)
    mrc: bool = False                        # masked region classification
    mrc_prob: float = 0.15
    # of the regions chosen for MRC, the share whose inputs are zeroed; the rest keep them and
    # are still predicted (VL-BERT's 90% / 10%, as BERT keeps 10% of its masked tokens; VLP
    # has no MRC in its recipes: set 1.0 to zero every one)
    mrc_zero_prob: float = 0.9
    # VL-BERT models: a zeroed region adds [MASK]'s word embedding instead of [IMG]'s (VL-BERT's
    # code marks them with a mask word embedding); false: [IMG] (runs trained before the key)
    mrc_mask_word: bool = True
    mrc_weight: float = 1.0
    # token: BERT's mean over the masked tokens of the optimizer step (all micro-batches and
    # ranks: vltrain/engine/step_feed.py) | example: mean over each micro-batch's examples
    loss_reduction: Literal["token", "example"] = "token"


@dataclass
class TrainConfig:
    seed: int = 42
    micro_batch_size: int = 8
    grad_accum: int = 1
    # > 0: the samples per optimizer step on any number of ranks (a paper's batch): grad_accum
    # is derived, global_batch / (micro_batch_size x ranks), and a start where that is not a whole
    # number is refused. 0: micro_batch_size x grad_accum x ranks, whatever the job's size.
    global_batch: int = 0
    max_steps: int = 1000
    lr: float = 1e-4
    weight_decay: float = 0.01
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-6
    warmup_steps: int = -1                   # -1: use warmup_ratio
    warmup_ratio: float = 0.1
    grad_clip: float = 1.0
    init_from: str = ""                      # HF BERT folder, our export, or a checkpoint
    # with init_from (not on resume): segment B's token-type row starts as segment A's
    # (VL-BERT's VCR recipe, PARTIAL_PRETRAIN_SEGMB_INIT: its pretraining trains only A)
    init_segment_b_from_a: bool = False
    resume: str = ""                         # "" | auto | path to a checkpoint folder
    log_every: int = 10
    save_every_steps: int = 0
    save_every_minutes: float = 0.0
    keep_last: int = 3
    val_every: int = 0
    max_nonfinite_in_row: int = 10
    # fills the ds_config's "auto"; auto: a resumed (or evaluated) checkpoint's, else the
    # ds_config's explicit choice, else bf16 on GPUs of compute capability >= 8 and fp32 elsewhere
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    peak_tflops: float = 0.0                 # per-device peak for MFU; 0 = from the device name
    dist_timeout_s: float = 600.0            # collective and batch-fetch timeout: a dead rank fails the job by then
    profile_steps: int = 0                   # > 0: torch-profile this many optimizer steps (<run_dir>/profile/)
    profile_start: int = 10                  # ... those after this step (past compile and warm-up)
    profile_ranks: list[int] = field(default_factory=lambda: [0])   # the ranks that profile

    def samples_per_step(self, world: int) -> int:
        """The global batch on ``world`` ranks (DeepSpeed's train_batch_size), grad_accum fitted."""
        return self.micro_batch_size * self.grad_accum * world


@dataclass
class TaskConfig:
    name: Literal["pretrain", "caption", "vqa", "mc", "refs"] = "pretrain"   # vltrain.tasks.TASKS
    num_answers: int = 3129                  # vqa: size of the dataset's answer_vocab.json
    # vqa: sha256 of the answer vocabulary the head was trained on, filled from data.train at
    # the start of training and saved with the config: mode=eval refuses another split's
    answer_vocab_sha256: str = ""
    # vqa: vlp ([CLS]*[SEP] MLP) | vlbert ([MASK] + MLM-initialised head)
    vqa_head: Literal["vlp", "vlbert"] = "vlp"
    # vqa, training: question tokens corrupted as MLM inputs are (80% [MASK], 10% random,
    # 10% kept; no MLM loss): VLP's --mask_prob 0 --max_pred 1 still corrupts 1 (its recipe)
    vqa_question_noise: int = 0
    eval_split: Literal["val", "test"] = "val"   # mode=eval evaluates data.<eval_split>
    # mc: softmax (cross-entropy over the choices) | sigmoid (each choice a binary target,
    # VL-BERT's VCR recipe: CLASSIFIER_SIGMOID)
    mc_loss: Literal["softmax", "sigmoid"] = "softmax"
    # caption: decoding (vltrain/decoding.py) and fine-tuning
    beam_size: int = 5                       # caption, mode=eval: beam width (1 = greedy)
    val_beam_size: int = 1                   # caption, validation during training (VLP: greedy)
    max_len: int = 20                        # caption: most words per decoded caption
    min_len: int = 0                         # caption: fewest words before [STOP]
    length_penalty: float = 0.0              # caption: GNMT alpha, lp = ((5+|Y|)/6)^alpha
    no_repeat_ngram: int = 0                 # caption: block repeated n-grams (0 = off)
    label_smoothing: float = 0.0             # caption: cross-entropy label smoothing
    scst: bool = False                       # caption: self-critical training (CIDEr-D reward)
    scst_samples: int = 1                    # caption, scst: sampled captions per image
    scst_references: str = ""                # caption, scst: {image_id: [captions]} JSON for the
                                             # CIDEr-D idf; "" = read data.train's captions


@dataclass
class Config:
    run_name: str = "debug"
    output_root: str = "runs"
    mode: Literal["train", "eval"] = "train"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objectives: ObjectivesConfig = field(default_factory=ObjectivesConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    task: TaskConfig = field(default_factory=TaskConfig)


def debug_model_config(**overrides) -> ModelConfig:
    """The tiny model every test and the demo use (2 layers, hidden 64). VL-BERT's visual
    LayerNorms start at gain 1, so that its visual paths carry signal and gradients from the
    first step in tests (VL-BERT's pretraining init, 0, zeroes them there)."""
    base = dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                max_position_embeddings=128, region_feat_dim=64, num_region_classes=17,
                hidden_dropout=0.0, attention_dropout=0.0, vlbert_visual_scale_init=1.0)
    base.update(overrides)
    return ModelConfig(**base)


# ---------------------------------------------------------------------------- building

def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _as_float(value) -> Optional[float]:
    """YAML 1.1 reads ``1e-4`` (no dot) as a string: a number written that way is meant as one."""
    if isinstance(value, str) and any(c in value.lower() for c in ".e") and value.strip():
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _check_type(value, tp, key: str, raw: Optional[str] = None):
    """Return ``value`` coerced to ``tp`` (int->float, "1e-4"->float; a text key given a number
    or a date as an override takes ``raw``, the text as typed, and a date in a file its
    YYYY-MM-DD), else raise naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(value, a, key, raw)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{key}': {value!r} is not of type {tp}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return [_check_type(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and (number := _as_float(value)) is not None:
        return number
    if origin is Literal:           # a choice: the error lists them (the sbatch pre-check sees it)
        choices = typing.get_args(tp)
        if value not in choices:
            shown = ", ".join(str(c) if c != "" else '""' for c in choices)
            raise ConfigError(f"config key '{key}': {value!r} is not one of {shown}")
        return value
    if tp is str and raw is not None and isinstance(value, (int, float, datetime.date)) \
            and not isinstance(value, bool):
        return raw                  # an override as typed: run_name=2024-12-04, =007 (RUN_NAME=%a)
    if tp is str and type(value) is datetime.date:
        return value.isoformat()    # in a YAML file a date is written YYYY-MM-DD; a number (007 is 7)
                                    # or a yes/no word there must be quoted, which the error says
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if tp is str and not isinstance(value, str):
        reads = {bool: "reads as yes/no", type(None): "reads as null", dict: "reads as a mapping",
                 list: "reads as a list"}.get(type(value), "is not text")
        how = (f"{raw!r} {reads}; for the text, quote it: {key}='\"{raw}\"'" if raw is not None
               else "quote it in a YAML file")    # (numbers and dates typed on the command line are kept above)
        raise ConfigError(f"config key '{key}': expected text, got {value!r} ({how})")
    if tp is float and not isinstance(value, float):
        raise ConfigError(f"config key '{key}': expected float, got {value!r}")
    return value


def build_section(cls, data: dict, prefix: str = "", raw: Optional[dict] = None):
    """``cls`` from ``data``; ``raw``: dotted key -> an override's text as typed."""
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.') or '<root>'}': expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for k in data:
        if k not in names:
            # a mapping (model.hidden_size=.. with "model" mistyped) can only be a section
            pool = [n for n in names if _is_dataclass_type(hints[n]) == isinstance(data[k], dict)] or names
            close = difflib.get_close_matches(k, pool, n=1) or \
                sorted((n for n in pool if k.startswith(n) or n.startswith(k)), key=len)[-1:]
            rest = ""
            if isinstance(data[k], dict) and len(data[k]) == 1:
                rest = "." + next(iter(data[k]))          # the user's key under the section
            hint = f"; did you mean '{prefix}{close[0]}{rest}'?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key '{prefix}{k}{rest}'{hint}")
    kw = {}
    for k, v in data.items():
        tp = hints[k]
        kw[k] = (build_section(tp, v, f"{prefix}{k}.", raw) if _is_dataclass_type(tp)
                 else _check_type(v, tp, prefix + k, (raw or {}).get(prefix + k)))
    return cls(**kw)


def _set_dotted(tree: dict, dotted: str, value):
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key '{dotted}': '{p}' is not a section")
    if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
        for k, v in value.items():     # train={lr: 1e-4}: into the file's section, not replacing it
            _set_dotted(node[parts[-1]], k, v)
        return
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any, str]:
    """``a.b=1e-4`` -> (``a.b``, ``"1e-4"``, ``"1e-4"``): the value read as YAML (numbers,
    bools, lists; a float key takes ``1e-4`` as one) and the text as typed (a text key keeps it)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0]
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({first}); quote a string, "
                          f"write a list as [a, b]") from None
    return key.strip(), value, raw


def config_from_dict(data: dict, overrides: list[str] | tuple = ()) -> Config:
    tree = copy.deepcopy(dict(data or {}))     # overrides go into nested sections
    raw = {}
    for ov in overrides:
        key, value, raw[key] = parse_override(ov)
        _set_dotted(tree, key, value)
    return build_section(Config, tree, raw=raw)


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys without a word (a second ``train:`` section
    drops the whole first one): refused, naming both lines."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1}); "
                    "YAML would keep the last one silently", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def in_checkout() -> bool:
    """Whether vltrain runs from its git checkout, which holds the recipes (configs/, ds_configs/)
    and Slurm templates; a package installed without it (`pip install .`) has none of them."""
    return os.path.isdir(os.path.join(CHECKOUT, "configs"))


def missing_file_hint(path: str) -> str:
    """What to add to "file not found": where a relative path was looked for, and that the
    recipes are files of vltrain's git checkout, which a package installed without it lacks."""
    hint = "" if os.path.isabs(path) else f" (relative to the working directory {os.getcwd()})"
    if not in_checkout():
        hint += ("; vltrain's recipes (configs/, ds_configs/) and Slurm templates are files of its git checkout, "
                 "which this installed package lacks: clone it and `pip install -e .` there")
    return hint


def read_yaml(path: str) -> dict:
    """A config file as a mapping ({} when empty); a ConfigError naming the file otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_UniqueKeyLoader)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}{missing_file_hint(path)}") from None
    except (IsADirectoryError, UnicodeDecodeError, PermissionError) as e:
        raise ConfigError(f"config file {path} cannot be read as YAML text: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of sections (model:, data:, train:, ...) at the "
                          f"top level, got a {type(data).__name__}")
    return data or {}


def load_config(path: Optional[str] = None, overrides: list[str] | tuple = (), *, to_run: bool = True) -> Config:
    """Config from a YAML file (or defaults when ``path`` is None) plus dotted overrides.
    ``to_run``: a config about to run: ``~`` expanded in its paths, its values checked
    (``check_values``), keys set for a task that does not read them refused, and run paths
    DeepSpeed would read as a pattern refused; off for a config a run saved, which is read as
    it was (checked when it ran; its relative output_root against the reader's folder)."""
    data = read_yaml(path) if path else {}
    if path:
        try:
            config_from_dict(data, ())
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    try:
        cfg = config_from_dict(data, overrides)
    except ConfigError as e:       # the file alone is fine: an override's error
        raise ConfigError(f"command-line override: {e}" if path and overrides else str(e)) from None
    if to_run:
        expand_user_paths(cfg)
        check_task_keys(cfg)          # first: a key of another task is the cause to name
        check_values(cfg)
        check_url_credentials(cfg)
        for key, where in (("run_name", str(cfg.run_name)), ("output_root", os.path.abspath(str(cfg.output_root))),
                           ("train.resume", "" if cfg.train.resume == "auto" else str(cfg.train.resume))):
            check_no_pattern(f"config key '{key}'", where)
    return cfg


PATH_KEYS = ("output_root", "data.train", "data.val", "data.test", "data.text_train", "data.cache_dir", "data.vocab",
             "train.init_from", "train.resume", "task.scst_references")


def expand_user_paths(cfg: Config) -> None:
    """``~/...`` in a path key is the home folder, as in a shell (which leaves ``data.train=~/x``
    alone: not a variable name): else a folder named ``~`` is made in the working directory."""
    for key in PATH_KEYS:
        section, _, name = key.rpartition(".")
        owner = getattr(cfg, section) if section else cfg
        if str(getattr(owner, name)).startswith("~"):
            setattr(owner, name, os.path.expanduser(getattr(owner, name)))


def check_values(cfg: Config) -> None:
    """Values no run can mean, refused as the config loads (so the sbatch pre-check sees them),
    naming the key: what the model, data and engine would take silently or fail on later."""
    import math

    def refuse(key, msg):
        raise ConfigError(f"config key '{key}': {msg}")
    for key, value in flatten(config_to_dict(cfg)).items():
        if any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, list) else [value])):
            refuse(key, f"{value} is not a finite number")
    m, d, o, t, k = cfg.model, cfg.data, cfg.objectives, cfg.train, cfg.task
    at_least_1 = {"model.hidden_size": m.hidden_size, "model.num_layers": m.num_layers, "model.num_heads": m.num_heads,
                  "model.intermediate_size": m.intermediate_size, "model.vocab_size": m.vocab_size,
                  "model.max_position_embeddings": m.max_position_embeddings, "data.max_text_len": d.max_text_len,
                  "data.max_regions": d.max_regions, "train.micro_batch_size": t.micro_batch_size,
                  "train.grad_accum": t.grad_accum, "train.log_every": t.log_every, "task.beam_size": k.beam_size,
                  "task.val_beam_size": k.val_beam_size, "task.max_len": k.max_len, "task.scst_samples": k.scst_samples}
    # (0 turns saves, validations, clipping, retries off; torch would name no key for a negative lr)
    at_least_0 = {f"train.{n}": getattr(t, n) for n in ("lr", "weight_decay", "grad_clip", "save_every_steps",
                                                         "save_every_minutes", "keep_last", "val_every",
                                                         "global_batch")}
    at_least_0.update({"data.download_retry": d.download_retry, "data.num_workers": d.num_workers,
                       "task.vqa_question_noise": k.vqa_question_noise, "task.min_len": k.min_len})
    for low, group in ((1, at_least_1), (0, at_least_0)):
        for key, value in group.items():
            if value < low:
                refuse(key, f"must be at least 1, got {value}" if low else f"0 or more, got {value}")
    if m.hidden_size % m.num_heads:
        refuse("model.num_heads", f"{m.num_heads} does not divide model.hidden_size={m.hidden_size}")
    for key, value in (("model.hidden_dropout", m.hidden_dropout), ("model.attention_dropout", m.attention_dropout),
                       ("task.label_smoothing", k.label_smoothing)):
        if not 0.0 <= value < 1.0:
            refuse(key, f"a probability in [0, 1), got {value}")
    for key, value in (("objectives.seq2seq_prob", o.seq2seq_prob), ("objectives.mlm_prob", o.mlm_prob),
                       ("objectives.mrc_prob", o.mrc_prob), ("objectives.mrc_zero_prob", o.mrc_zero_prob),
                       ("objectives.mask_token_prob", o.mask_token_prob),
                       ("objectives.random_token_prob", o.random_token_prob),
                       ("data.text_proportion", d.text_proportion), ("train.warmup_ratio", t.warmup_ratio)):
        if not 0.0 <= value <= 1.0:
            refuse(key, f"a share in [0, 1], got {value}")
    if o.mask_token_prob + o.random_token_prob > 1.0:
        refuse("objectives.random_token_prob", f"objectives.mask_token_prob + objectives.random_token_prob = "
               f"{o.mask_token_prob + o.random_token_prob:g} is more than 1 (the rest is the share kept unchanged)")
    if o.mlm and o.mask_sampling == "count" and o.max_pred < 1:
        refuse("objectives.max_pred", f"{o.max_pred} predicts no token (objectives.mlm=true, mask_sampling=count): "
               "at least 1, or objectives.mlm=false")
    if k.min_len > k.max_len:
        refuse("task.min_len", f"{k.min_len} is more than task.max_len={k.max_len}")
    if len(t.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in t.adam_betas):
        refuse("train.adam_betas", f"two numbers in [0, 1) (Adam's beta1, beta2), got {t.adam_betas}")
    if t.adam_eps <= 0:
        refuse("train.adam_eps", f"must be more than 0, got {t.adam_eps}")
    if d.text_proportion and not d.text_train:
        refuse("data.text_proportion", f"{d.text_proportion} mixes in text-only samples from data.text_train, "
               "which is empty: set data.text_train, or data.text_proportion=0")
    if d.text_train and not 0.0 < d.text_proportion < 1.0:
        refuse("data.text_proportion", f"data.text_train is set, so the share of text-only samples must be in "
               f"(0, 1); got {d.text_proportion}")
    if d.max_sequence and d.max_sequence < 8:
        refuse("data.max_sequence", f"0 (off) or at least 8 (room for the text's special tokens, a word and a "
               f"region beside them), got {d.max_sequence}")
    name = str(cfg.run_name)
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        refuse("run_name", f"a folder name under output_root (no '/', not empty, not '.' or '..'), got {name!r}")


def check_no_pattern(what: str, path: str) -> None:
    """Refuse a checkpoint path holding * ? [: DeepSpeed finds a checkpoint's files with
    glob.glob(<its path>/...), unescaped, so one there never loads (nor converts)."""
    odd = sorted(set(path) & set("*?["))
    if odd:
        raise ConfigError(f"{what}: {path!r} holds {' '.join(odd)}, which DeepSpeed reads as a file pattern when "
                          "it loads or converts a checkpoint there: it could never be resumed; choose a path "
                          "without * ? [")


def flatten(d: Mapping, prefix: str = "") -> dict:
    """A nested mapping as one level of dotted keys: ``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``."""
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_url_credentials(cfg: Config) -> None:
    """An object-store URL with user:password@ in any key (or in S3_ENDPOINT_URL) is refused,
    naming the key, redacted (vltrain/redact.py)."""
    from vltrain.redact import credentials_errors
    problems = credentials_errors((f"config key '{k}'", v) for k, v in flatten(config_to_dict(cfg)).items())
    if problems:
        raise ConfigError("; ".join(problems))


# Keys that only some tasks read, set for another, would change nothing without a word. The task
# collators turn MLM and MRC targets off: MRC is pretraining's; caption's loss is its masked-token
# cross-entropy (no mlm_weight, no text-only rows); vqa reads the corruption split for its question
# noise only. A saved config is read as it is (load_run_config).
_PRETRAIN, _MLM = ("pretrain",), ("pretrain", "caption")
TASK_KEYS = {"data.max_sequence": _PRETRAIN, "data.text_train": _PRETRAIN,
             **{f"objectives.{k}": _PRETRAIN for k in ("mrc", "mrc_prob", "mrc_zero_prob", "mrc_mask_word",
                                                       "mrc_weight", "mlm_weight", "separate_text_mlm")},
             **{f"objectives.{k}": _MLM for k in ("mlm", "mlm_prob", "max_pred", "mask_sampling", "whole_word_mask",
                                                  "loss_reduction")},
             "objectives.mask_token_prob": _MLM + ("vqa",), "objectives.random_token_prob": _MLM + ("vqa",),
             **{f"task.{k}": ("vqa",) for k in ("vqa_question_noise", "vqa_head", "num_answers",
                                                "answer_vocab_sha256")},
             "task.mc_loss": ("mc",),
             **{f"task.{k}": ("caption",) for k in ("beam_size", "val_beam_size", "max_len", "min_len",
                                                    "length_penalty", "no_repeat_ngram", "label_smoothing", "scst",
                                                    "scst_samples", "scst_references")}}
# Keys a task fixes: caption trains every example seq2seq (VLP's lambda = 1), the understanding
# tasks every one bidirectional (lambda = 0)
TASK_FIXED = {"objectives.seq2seq_prob": {"caption": 1.0, "vqa": 0.0, "mc": 0.0, "refs": 0.0}}


def check_task_keys(cfg: Config) -> None:
    """Keys set for a task that does not read them (or away from the value a task fixes) would
    change nothing without a word: refused, naming the key and the tasks that read it. So is a
    training run with no objective to train (pretraining logged a loss of 0 and saved checkpoints)."""
    default, task, o = Config(), cfg.task.name, cfg.objectives

    def value(key):
        section, name = key.split(".")
        return getattr(getattr(cfg, section), name), getattr(getattr(default, section), name)
    if task == "caption" and cfg.data.max_sequence:
        # the shared collator would cut an evaluated image's regions by the length of the
        # reference caption it draws: decoding inputs (and CIDEr) would depend on the label
        raise ConfigError(f"config key 'data.max_sequence': {cfg.data.max_sequence} is pretraining's joint "
                          "budget; caption fine-tuning would cut an evaluated image's regions by the reference "
                          "caption drawn: set data.max_regions and data.max_text_len instead")
    for key, tasks in TASK_KEYS.items():
        v, d = value(key)
        if v != d and task not in tasks:
            raise ConfigError(f"config key '{key}': {v!r} is read by task.name={' or '.join(tasks)} only, not by "
                              f"task.name={task}")
    for key, fixed in TASK_FIXED.items():
        v, d = value(key)
        if v != d and task in fixed and v != fixed[task]:
            raise ConfigError(f"config key '{key}': task.name={task} trains every example at {key}={fixed[task]:g} "
                              f"whatever it is set to; got {v!r}")
    if task == "vqa" and not cfg.task.vqa_question_noise:
        for key in ("objectives.mask_token_prob", "objectives.random_token_prob"):
            v, d = value(key)
            if v != d:
                raise ConfigError(f"config key '{key}': {v!r} is read by task.name=vqa only with "
                                  "task.vqa_question_noise > 0 (how its noisy question words are corrupted)")
    if task == "pretrain" and not (o.mlm and o.mlm_weight > 0) and not (o.mrc and o.mrc_weight > 0):
        raise ConfigError(f"config key 'objectives.mlm': pretraining with objectives.mlm={o.mlm} "
                          f"(mlm_weight={o.mlm_weight:g}) and objectives.mrc={o.mrc} (mrc_weight={o.mrc_weight:g}) "
                          "trains nothing: turn one on with a weight above 0")
    if task == "caption" and cfg.mode == "train" and not o.mlm and not cfg.task.scst:
        raise ConfigError("config key 'objectives.mlm': caption training with objectives.mlm=false and "
                          "task.scst=false trains nothing (its loss is the masked caption words'): set "
                          "objectives.mlm=true, or task.scst=true")
    if cfg.train.init_segment_b_from_a and not cfg.train.init_from:
        raise ConfigError("config key 'train.init_segment_b_from_a': needs train.init_from (the weights whose "
                          "segment A row it copies)")
    if cfg.train.init_segment_b_from_a and cfg.model.image_token_type != 1 and (
            task == "refs" or (task == "vqa" and cfg.task.vqa_head == "vlp")):
        what = "task.name=refs" if task == "refs" else "task.name=vqa with task.vqa_head=vlp"
        raise ConfigError(f"config key 'train.init_segment_b_from_a': {what} puts no token in segment B "
                          f"(model.image_token_type={cfg.model.image_token_type}), so the copied row is never read")


PLACEHOLDER = "CHANGE-ME"      # what the cluster recipes name their data and weights with


def check_placeholders(cfg: "Config", resuming: Optional[bool] = None) -> None:
    """Refuse a run that would read a recipe's placeholder path (``s3://CHANGE-ME/...``), naming
    the key: the data and weights this mode reads (training: data.train, data.val,
    data.text_train; eval: data.<task.eval_split>; both: train.resume, and train.init_from
    unless the run resumes a checkpoint, ``resuming``; None: unknown yet, so whenever
    train.resume is set init_from is left to the check once the checkpoint is found).
    Without this the first sign was a storage error (no credentials for bucket CHANGE-ME)."""
    if resuming is None:
        resuming = bool(cfg.train.resume)
    keys = (["data.train", "data.val", "data.text_train"] if cfg.mode != "eval"
            else [f"data.{cfg.task.eval_split}"]) + ["train.resume"] + ([] if resuming else ["train.init_from"])
    for key in keys:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name, "")
        if isinstance(value, str) and PLACEHOLDER in value:
            off = {"data.val": " (or data.val= to train without validation)",
                   "train.init_from": " (or train.init_from= to start from random weights)"}.get(key, "")
            raise ConfigError(f"{key}={value} is the recipe's placeholder: set {key} to your own path{off}")


def load_run_config(path: str) -> "Config":
    """A ``config.yaml`` a run saved (its resolved config, e.g. in a checkpoint), as it was
    (no task-key check). Keys newer than the file take the value the run had then: one without
    ``train.precision`` trained fp32 (the default is ``auto`` now; runs save what it resolved
    to), one without ``objectives.mrc_zero_prob`` zeroed every predicted region (1.0), one
    without ``objectives.mrc_mask_word`` gave zeroed regions ``[IMG]`` (false)."""
    cfg = load_config(path, to_run=False)
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if "precision" not in (raw.get("train") or {}):
        cfg.train.precision = "fp32"
    if "mrc_zero_prob" not in (raw.get("objectives") or {}):
        cfg.objectives.mrc_zero_prob = 1.0
    if "mrc_mask_word" not in (raw.get("objectives") or {}):
        cfg.objectives.mrc_mask_word = False
    return cfg


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg, path: str) -> None:
    """Write the resolved config as YAML (the file ``load_config`` reads back identically, but
    for credentials in URLs, which are redacted: keys come from the environment)."""
    from vltrain.redact import redact_tree
    with open(path, "w") as f:
        yaml.safe_dump(redact_tree(config_to_dict(cfg)), f, sort_keys=False)
