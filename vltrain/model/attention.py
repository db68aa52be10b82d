"""Self-attention masks and backends.

The mask is a property of the *sequence*, not of a layer: ``AttentionStructure`` is built
once per forward from (padding, seq2seq targets, per-example mode) and each backend turns
it into what its kernel takes, once per forward (``prepare``), before the layers run.
``eager`` is the reference every other backend is tested against.

Rules (q = query position, k = key position, "target" = seq2seq/left-to-right text token):
    allowed(q, k) = valid(k) and (not target(k) or (target(q) and k <= q))
so the prefix (regions, [CLS], [SEP], non-target text) is bidirectional, target tokens see
the prefix and earlier targets, and nobody in the prefix sees a target. Bidirectional
examples simply have no targets. [CLS] is always a valid non-target key, so no row is
fully masked and padding rows stay finite.

Backends (``model.attention_backend``):
    eager   reference: explicit scores + additive mask, softmax in float32.
    sdpa    ``F.scaled_dot_product_attention`` with the additive mask. On CUDA it is pinned
            to the memory-efficient and cuDNN kernels (both take an arbitrary mask), so it
            can never fall back to the math kernel silently: if neither can run, it raises.
    flex    FlexAttention: a ``BlockMask`` from :func:`structure_mask_mod` (prefix-LM +
            padding + per-example mode), built once per forward; the kernel is compiled
            once per (shape, dtype, device) and cached, so fixed length buckets never
            recompile. No attention dropout (refused in training). Fused only on CUDA; on
            CPU it runs forward-only through PyTorch's unfused reference (tests).
    varlen  unpadded variable-length kernels (``flash_attn.flash_attn_varlen_func`` when
            installed, else ``torch.nn.attention.varlen.varlen_attn``, detected by feature).
            Per example, the valid tokens are packed as [prefix..., targets...]; then
              call 1: prefix rows  x prefix keys, non-causal;
              call 2: target rows  x all keys,    causal, bottom-right aligned
            which is exactly the rule above (targets see the whole prefix and the earlier
            targets). Bidirectional examples have no target rows. On CPU an SDPA emulation
            of the same two calls runs instead (reference for the tests; slow).
    triton  vltrain's own Triton kernels for short sequences (``triton_attention.py``): the
            rule computed in the tile from the two (B, L) vectors, no dense mask, blocks no
            row sees skipped; attention dropout from keep bits drawn once per call (the
            packed hidden-dropout masks' kernel). CUDA only; CPU tests run the kernels in
            Triton's interpreter.
    auto    the fastest correct backend for the device and the recipe, as measured
            (BENCHMARKS.md): sdpa on CPU and on CUDA (an H100 at our lengths: flex and
            varlen train slower, see ``resolve_auto``). The choice is logged.
"""
from __future__ import annotations

import importlib.util
import logging
import types
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from vltrain.model import triton_attention

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:          # torch < 2.5
    create_block_mask = flex_attention = None

log = logging.getLogger(__name__)
# flex_attention outside torch.compile (CPU: PyTorch's unfused reference, tests and inference)
warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")


@dataclass
class AttentionStructure:
    """Per-forward description of who may attend to whom, in sequence order."""
    key_valid: torch.Tensor   # (B, L) bool: real token or region
    target: torch.Tensor      # (B, L) bool: causal target positions

    def dense_allowed(self) -> torch.Tensor:
        """(B, L, L) bool matrix of allowed (query, key) pairs."""
        L = self.key_valid.shape[1]
        idx = torch.arange(L, device=self.key_valid.device)
        causal = idx[None, :] <= idx[:, None]                       # (q, k): k <= q
        t_q = self.target[:, :, None]
        t_k = self.target[:, None, :]
        return self.key_valid[:, None, :] & (~t_k | (t_q & causal[None]))

    def additive_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """(B, 1, L, L) additive mask: 0 where allowed, the dtype's minimum elsewhere."""
        allowed = self.dense_allowed()
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        return mask[:, None]


def _prepare_dense(structure: AttentionStructure, dtype: torch.dtype):
    return structure.additive_mask(dtype)


def eager_attention(q, k, v, mask, dropout_p: float) -> torch.Tensor:
    """Reference: softmax(q k^T / sqrt(d) + mask) v, softmax in float32. q,k,v: (B, h, L, d)."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    scores = scores + mask
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    if dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v)


# ------------------------------------------------------------------------------ sdpa

def _sdpa_gpu_kernels():
    from torch.nn.attention import SDPBackend
    # Both take an arbitrary additive mask (flash does not); math is left out on purpose.
    return [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]


def _prepare_sdpa(structure: AttentionStructure, dtype: torch.dtype):
    if structure.key_valid.is_cuda and torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")    # what autocast would cast it to, every layer
    mask = structure.additive_mask(dtype)
    return aligned_rows(mask) if pads_mask_rows(mask) else mask


def pads_mask_rows(mask: torch.Tensor) -> bool:
    """Whether ``_prepare_sdpa`` hands the kernels a row-aligned view (CUDA; tests force it on CPU)."""
    return mask.is_cuda


def aligned_rows(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` as a view of a buffer whose rows are 16 elements longer, rounded down to a
    multiple of 16. The memory-efficient kernel wants the mask's row stride 16-aligned, else
    it pads a copy on every call (every layer): padded once here instead. Always a strided
    view, whatever the length: a mask that is contiguous for some batch lengths (a multiple
    of 16) and a view for others makes the compiled blocks recompile on each switch."""
    L = mask.shape[-1]
    padded = mask.new_zeros(*mask.shape[:-1], (L + 16) // 16 * 16)
    padded[..., :L] = mask
    return padded[..., :L]


def sdpa_attention(q, k, v, mask, dropout_p: float) -> torch.Tensor:
    """``torch.nn.functional.scaled_dot_product_attention`` with the same additive mask."""
    if q.is_cuda:
        from torch.nn.attention import sdpa_kernel
        with sdpa_kernel(_sdpa_gpu_kernels()):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


# ------------------------------------------------------------------------------ flex

FLEX_DROPOUT_MESSAGE = (
    "model.attention_backend=flex: FlexAttention has no attention dropout, but "
    "model.attention_dropout={p} in training. Set model.attention_dropout=0 for this recipe, "
    "or use model.attention_backend=sdpa (or auto, which picks sdpa when dropout is on).")


FLEX_MISSING_MESSAGE = "model.attention_backend=flex needs torch.nn.attention.flex_attention (torch >= 2.5)"
FLEX_CPU_MESSAGE = ("model.attention_backend=flex: FlexAttention has no backward on CPU (its fused kernel is "
                    "GPU-only); use sdpa on CPU for training")


def flex_available() -> bool:
    return flex_attention is not None


def structure_mask_mod(key_valid: torch.Tensor, target: torch.Tensor) -> Callable:
    """FlexAttention ``mask_mod(b, h, q_idx, kv_idx) -> bool`` of the rule in the module doc."""
    def mask_mod(b, h, q_idx, kv_idx):
        return key_valid[b, kv_idx] & (~target[b, kv_idx] | (target[b, q_idx] & (kv_idx <= q_idx)))
    return mask_mod


_COMPILED_BLOCK_MASK: list = []      # torch.compile(create_block_mask), made on first use


def build_block_mask(mask_mod: Callable, B: int, L: int, device, compiled: bool, **kw):
    """``create_block_mask`` for one (B, L) bucket, same mask for every head (H=None): one
    (B, 1, L/128, L/128) block table. ``compiled`` compiles its construction (once per bucket
    shape: Dynamo guards on the shapes, not on the mask's tensors); uncompiled, evaluating the
    mask densely costs more on a GPU than the attention it saves. (torch's own
    ``_compile=True`` flag did the same and is deprecated.)"""
    build = create_block_mask
    if compiled:
        if not _COMPILED_BLOCK_MASK:
            _COMPILED_BLOCK_MASK.append(torch.compile(create_block_mask))
        build = _COMPILED_BLOCK_MASK[0]
    return build(mask_mod, B, None, L, L, device=device, **kw)


def _prepare_flex(structure: AttentionStructure, dtype: torch.dtype):
    if not flex_available():
        raise RuntimeError(FLEX_MISSING_MESSAGE)
    B, L = structure.key_valid.shape
    mask_mod = structure_mask_mod(structure.key_valid, structure.target)
    return build_block_mask(mask_mod, B, L, structure.key_valid.device,
                            compiled=structure.key_valid.is_cuda)


def _flex_call(q, k, v, block_mask):
    return flex_attention(q, k, v, block_mask=block_mask)


# Compiled FlexAttention callables, one per (shape, dtype, device, grad): the data issue's
# fixed length buckets give a handful of keys, each compiled once. Each key gets its own
# code object, so Dynamo's per-code-object recompile limit (8) is never what decides
# whether a bucket runs fused or silently falls back to the unfused implementation.
_FLEX_COMPILED: dict = {}
FLEX_COMPILE_BACKEND = "inductor"     # tests swap in "eager" to check the caching quickly


def flex_cache_key(q: torch.Tensor, k: torch.Tensor) -> tuple:
    return (tuple(q.shape), tuple(k.shape), q.dtype, q.device.type, q.requires_grad)


def compiled_flex(key: tuple) -> Callable:
    fn = _FLEX_COMPILED.get(key)
    if fn is None:
        code = _flex_call.__code__.replace(co_name=f"flex_{len(_FLEX_COMPILED)}")
        fresh = types.FunctionType(code, _flex_call.__globals__, code.co_name)
        fn = torch.compile(fresh, backend=FLEX_COMPILE_BACKEND, dynamic=False, fullgraph=True)
        _FLEX_COMPILED[key] = fn
        log.info("flex attention: compiling for %s", key)
    return fn


def flex_attention_backend(q, k, v, block_mask, dropout_p: float) -> torch.Tensor:
    if dropout_p > 0:
        raise ValueError(FLEX_DROPOUT_MESSAGE.format(p=dropout_p))
    if not q.is_cuda:
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            raise RuntimeError(FLEX_CPU_MESSAGE)
        # CPU: PyTorch's unfused reference (tests, inference); no compile, quiet about it
        # (the module's filter: a catch_warnings() per call would show other warnings again)
        return _flex_call(q, k, v, block_mask)
    if torch.compiler.is_compiling():       # inside a compiled block: Dynamo fuses it there
        return _flex_call(q, k, v, block_mask)
    return compiled_flex(flex_cache_key(q, k))(q, k, v, block_mask)


# ------------------------------------------------------------------------------ varlen

@dataclass
class VarlenPlan:
    """Unpadding metadata of one forward (built once, used by every layer).

    Static shapes, no host sync: every row vector has B*L entries, the rows of real tokens
    first (grouped per example, as the ``cu_*`` offsets say) and the rest after; kernels read
    only the rows the offsets cover, and the max lengths given to them are the padded length
    L (an upper bound is all they need). ``*_back`` invert the packing (a gather, not a
    scatter) and ``*_flat`` say which (b, pos) positions each call answers.
    """
    prefix_rows: torch.Tensor   # (B*L,) flat (b*L+pos) indices: per example its prefix tokens
    target_rows: torch.Tensor   # (B*L,) per example its target tokens, in order
    all_rows: torch.Tensor      # (B*L,) per example its prefix tokens, then its targets
    cu_prefix: torch.Tensor     # (B+1,) int32 offsets into prefix_rows
    cu_target: torch.Tensor     # (B+1,) int32 offsets into target_rows
    cu_all: torch.Tensor        # (B+1,) int32 offsets into all_rows
    prefix_back: torch.Tensor   # (B*L,) packed row of each flat position (prefix call)
    target_back: torch.Tensor   # (B*L,) packed row of each flat position (target call)
    prefix_flat: torch.Tensor   # (B*L,) bool: flat position is a real prefix token
    target_flat: torch.Tensor   # (B*L,) bool: flat position is a real target token
    length: int                 # L
    has_targets: bool           # False: the target call is skipped (known on the host)


def _packed_order(rank: torch.Tensor, keep: torch.Tensor, B: int, L: int):
    """Flat indices sorted by (example, rank, position) for kept tokens, the others after;
    and the (B+1,) int32 offsets of each example's kept tokens."""
    pos = torch.arange(L, device=keep.device)
    ex = torch.arange(B, device=keep.device)[:, None]
    key = torch.where(keep, ex * (3 * L) + rank * L + pos, B * 3 * L + ex * L + pos)
    order = torch.argsort(key.reshape(-1))
    cu = F.pad(torch.cumsum(keep.sum(1), 0), (1, 0)).to(torch.int32)
    return order, cu


def plan_varlen(structure: AttentionStructure) -> VarlenPlan:
    """Per-forward packing of the two-call scheme (see the module docstring)."""
    valid = structure.key_valid
    target = structure.target & valid
    B, L = valid.shape
    prefix = valid & ~target
    zeros = torch.zeros_like(target, dtype=torch.long)
    prefix_rows, cu_prefix = _packed_order(zeros, prefix, B, L)
    target_rows, cu_target = _packed_order(zeros, target, B, L)
    all_rows, cu_all = _packed_order(target.long(), valid, B, L)
    # Whether any example has targets is free to ask on CPU; on GPU it would cost a sync,
    # so the target call always runs there (bidirectional examples are empty segments).
    has_targets = True if target.is_cuda else bool(target.any())
    return VarlenPlan(prefix_rows, target_rows, all_rows, cu_prefix, cu_target, cu_all,
                      torch.argsort(prefix_rows), torch.argsort(target_rows),
                      prefix.reshape(-1), target.reshape(-1), L, has_targets)


def _prepare_varlen(structure: AttentionStructure, dtype: torch.dtype):
    return plan_varlen(structure)


class _UndefinedTailGrad(torch.autograd.Function):
    """Identity whose gradient is NaN in rows ``n:``: what a varlen kernel's backward leaves
    there (uninitialised memory on GPU), so that CPU tests see any leak of those rows."""

    @staticmethod
    def forward(ctx, x, n: int):
        ctx.n = n
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        g[ctx.n:] = float("nan")
        return g, None


def emulated_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal: bool, dropout_p: float = 0.0):
    """CPU reference of a varlen kernel: SDPA per segment, causal = bottom-right aligned.

    q: (Tq, h, d), k/v: (Tk, h, d). Like the GPU kernels, rows past ``cu_q[-1]`` of the output
    and rows past the offsets of dq/dk/dv are undefined: NaN here, so a caller that lets them
    through fails the CPU tests as it would corrupt training on a GPU."""
    cq, ck = cu_q.tolist(), cu_k.tolist()
    q = _UndefinedTailGrad.apply(q, cq[-1])
    k = _UndefinedTailGrad.apply(k, ck[-1])
    v = _UndefinedTailGrad.apply(v, ck[-1])
    out = torch.full_like(q, float("nan")).index_fill(0, torch.arange(cq[-1], device=q.device), 0.0)
    for i in range(len(cq) - 1):
        q0, q1, k0, k1 = cq[i], cq[i + 1], ck[i], ck[i + 1]
        if q1 == q0:
            continue
        mask = None
        if causal:   # bottom-right: query j of lq sees keys <= j + (lk - lq)
            mask = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool, device=q.device).tril(k1 - k0 - (q1 - q0))
        o = F.scaled_dot_product_attention(q[q0:q1].transpose(0, 1), k[k0:k1].transpose(0, 1),
                                           v[k0:k1].transpose(0, 1), attn_mask=mask, dropout_p=dropout_p)
        out = out.index_copy(0, torch.arange(q0, q1, device=q.device), o.transpose(0, 1))
    return out


emulated_varlen = torch.compiler.disable(emulated_varlen)   # host loop: never traced


def flash_attn_varlen():
    """``flash_attn.flash_attn_varlen_func`` when the package is installed, else None."""
    if importlib.util.find_spec("flash_attn") is None:
        return None
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception:      # installed but built for another torch/CUDA
        return None
    return flash_attn_varlen_func


def torch_varlen():
    """PyTorch's own varlen attention (``torch.nn.attention.varlen.varlen_attn``) or None."""
    try:
        from torch.nn.attention import varlen
    except ImportError:
        return None
    return getattr(varlen, "varlen_attn", None)


def varlen_kernel_name(device_type: str) -> Optional[str]:
    if device_type != "cuda":
        return "emulated"
    if flash_attn_varlen() is not None:
        return "flash_attn"
    if torch_varlen() is not None:
        return "torch"
    return None


def check_varlen_dtype(kind: Optional[str], dtype: torch.dtype) -> None:
    """The GPU varlen kernels (flash_attn's, torch's FlashAttention) take fp16/bf16 only."""
    if kind in ("flash_attn", "torch") and dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"model.attention_backend=varlen: the {kind} varlen kernel takes fp16/bf16, "
                         f"got {str(dtype).replace('torch.', '')}; train with train.precision=bf16 "
                         f"or use model.attention_backend=sdpa")


def _varlen_call(q, k, v, cu_q, cu_k, max_q, max_k, causal, dropout_p):
    kind = varlen_kernel_name(q.device.type)
    check_varlen_dtype(kind, q.dtype)
    if kind == "emulated":
        return emulated_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal, dropout_p)
    if kind == "flash_attn":
        return flash_attn_varlen()(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=dropout_p, causal=causal)
    if kind == "torch":
        if dropout_p > 0:
            raise ValueError(f"model.attention_backend=varlen with torch's varlen_attn has no attention "
                             f"dropout (model.attention_dropout={dropout_p} in training); install "
                             f"flash_attn, set the dropout to 0, or use sdpa")
        return torch_varlen()(q, k, v, cu_q, cu_k, max_q, max_k, window_size=(-1, 0) if causal else (-1, -1))
    raise RuntimeError("model.attention_backend=varlen needs flash_attn or torch.nn.attention.varlen "
                       "on CUDA; neither is available here")


def varlen_attention(q, k, v, plan: VarlenPlan, dropout_p: float) -> torch.Tensor:
    """Two varlen calls over the unpadded tokens; (B, h, L, d) in and out, padding rows zero."""
    B, h, L, d = q.shape
    # (B, h, L, d) -> (B*L, h, d): a view of the fused qkv output (no copy).
    qf, kf, vf = (t.transpose(1, 2).reshape(B * L, h, d) for t in (q, k, v))
    packed = torch.arange(B * L, device=q.device)

    def pack(x, rows, cu):
        # Rows past the offsets are undefined in the kernels' output AND in their dq/dk/dv:
        # ``where`` (not a multiply: NaN-safe both ways) keeps that garbage out of the real
        # tokens' gradients, which the gather's backward would otherwise add it to.
        return torch.where((packed < cu[-1])[:, None, None], x[rows], 0.0)

    r, cp = plan.prefix_rows, plan.cu_prefix
    out_p = _varlen_call(pack(qf, r, cp), pack(kf, r, cp), pack(vf, r, cp), cp, cp, L, L, False, dropout_p)
    out = torch.where(plan.prefix_flat[:, None, None], out_p[plan.prefix_back], 0.0)
    if plan.has_targets:
        t, a, ct, ca = plan.target_rows, plan.all_rows, plan.cu_target, plan.cu_all
        out_t = _varlen_call(pack(qf, t, ct), pack(kf, a, ca), pack(vf, a, ca), ct, ca, L, L, True, dropout_p)
        out = torch.where(plan.target_flat[:, None, None], out_t[plan.target_back], out)
    return out.view(B, L, h, d).transpose(1, 2)


# ------------------------------------------------------------------------------ triton

def _prepare_triton(structure: AttentionStructure, dtype: torch.dtype):
    return triton_attention.prepare(structure.key_valid, structure.target)


# ------------------------------------------------------------------------------ registry

@dataclass(frozen=True)
class Backend:
    name: str
    prepare: Callable          # (AttentionStructure, dtype) -> backend-specific mask object
    attend: Callable           # (q, k, v, prepared, dropout_p) -> (B, h, L, d)


BACKENDS = {
    "eager": Backend("eager", _prepare_dense, eager_attention),
    "sdpa": Backend("sdpa", _prepare_sdpa, sdpa_attention),
    "flex": Backend("flex", _prepare_flex, flex_attention_backend),
    "varlen": Backend("varlen", _prepare_varlen, varlen_attention),
    "triton": Backend("triton", _prepare_triton, triton_attention.triton_attention),
}


# ------------------------------------------------------------------------------ auto

def unusable(backend: str, device_type: str, dropout_p: float, training: bool) -> str:
    """Why ``backend`` cannot run on ``device_type`` ("" if it can): the build checks it before
    any step, where the forward would fail at the first one (the checks there stay, for direct
    use of the model)."""
    if backend == "flex":
        if not flex_available():
            return FLEX_MISSING_MESSAGE
        if training and dropout_p > 0:
            return FLEX_DROPOUT_MESSAGE.format(p=dropout_p)
        if training and device_type != "cuda":
            return FLEX_CPU_MESSAGE
    if backend == "triton":
        if not triton_attention.available():
            return triton_attention.MISSING_MESSAGE
        if not triton_attention.runs_on(device_type):
            return triton_attention.CPU_MESSAGE
    return ""


def resolve_auto(device_type: str, dropout_p: float) -> tuple[str, str]:
    """(backend name, reason) that ``auto`` uses for a device and an attention dropout."""
    if device_type != "cuda":
        return "sdpa", f"{device_type}: fused GPU kernels do not apply; sdpa is the fastest exact path"
    # Measured (BENCHMARKS.md, H100, bf16, base size, L=140): sdpa's training step is ~2x
    # flex's (compiled, dropout 0) and ~1.4x varlen's (torch's kernel, two calls; the
    # attention alone ~4.6x); at our
    # short sequences flex's 128-wide blocks save nothing and cost a BlockMask per forward.
    why = "cuda: sdpa on the efficient/cuDNN kernels, the fastest measured at our lengths"
    if dropout_p > 0:
        why += f" (and attention dropout {dropout_p}: flex has none)"
    return "sdpa", why


_LOGGED: set = set()


def _log_choice(device_type: str, dropout_p: float) -> None:
    if torch.compiler.is_compiling():
        return
    name, why = resolve_auto(device_type, dropout_p)
    if (name, device_type) not in _LOGGED:
        _LOGGED.add((name, device_type))
        log.info("model.attention_backend=auto -> %s (%s)", name, why)


def auto_attention(q, k, v, prepared, dropout_p: float) -> torch.Tensor:
    _log_choice(q.device.type, dropout_p)
    return sdpa_attention(q, k, v, prepared, dropout_p)


BACKENDS["auto"] = Backend("auto", _prepare_sdpa, auto_attention)


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"model.attention_backend={name!r} is not available; "
                         f"choose one of {sorted(BACKENDS)}")
    return BACKENDS[name]
