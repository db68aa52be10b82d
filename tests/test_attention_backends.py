"""Attention backends against the eager reference (issue 8).

CPU: sdpa, varlen (SDPA emulation of its two kernel calls), auto and flex (forward; no
CPU backward) equal eager through the whole model, forward and backward; triton's kernels
equal eager in Triton's interpreter (a subprocess: tests/triton_attention_check.py); the flex
mask_mod evaluated densely equals ``AttentionStructure.dense_allowed()``; the varlen
packing and its bottom-right causal call equal eager on raw q, k, v; per-shape flex
compilation never recompiles a shape; ``auto`` logs its choice; compiled blocks equal
eager. GPU tests run the real FlexAttention / varlen / triton kernels and skip without CUDA.
"""
import logging

import pytest
import torch

from tests.test_model import make_model, random_inputs
from vltrain.data.batch import MODE_BIDIRECTIONAL, MODE_LEFT_TO_RIGHT, MODE_SEQ2SEQ
from vltrain.model import attention as A

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU: the FlexAttention, varlen and triton kernels "
                                                  "are GPU-only")

MODES = {"bidirectional": "bidirectional", "seq2seq": "seq2seq", "left_to_right": "left_to_right",
         "mixed": torch.tensor([MODE_SEQ2SEQ, MODE_BIDIRECTIONAL, MODE_LEFT_TO_RIGHT, MODE_SEQ2SEQ])}


def inputs_for(cfg, case: str):
    x = random_inputs(cfg, B=4)
    if case == "targets_inside":
        # Targets not at the end of the sequence: segment-1 tokens followed by segment-0 ones.
        tt = torch.zeros_like(x["token_type_ids"])
        tt[:, 3:7] = 1
        x["token_type_ids"] = tt * x["attention_mask"]
    return x


def forward_backward(model, x, mode, backward=True):
    model.zero_grad()
    with torch.set_grad_enabled(backward):
        out = model(**x, mode=mode)
    tv, rv = x["attention_mask"].bool(), x["region_mask"]
    if backward:
        (out.text_hidden[tv].square().mean() + out.region_hidden[rv].square().mean()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return torch.cat([out.text_hidden[tv], out.region_hidden[rv]]).detach(), grads


def assert_same(ref, got):
    (o0, g0), (o1, g1) = ref, got
    assert (o0 - o1).abs().max() < 1e-5
    assert g0.keys() == g1.keys()
    scale = max(float(g.abs().max()) for g in g0.values()) if g0 else 1.0
    for n in g0:
        assert float((g0[n] - g1[n]).abs().max()) / scale < 1e-5, n


def pair(backend, **kw):
    ref = make_model("eager", **kw)
    other = make_model(backend, **kw)
    other.load_state_dict(ref.state_dict())
    return ref, other


# --------------------------------------------------------------------------- whole model, CPU

@pytest.mark.parametrize("backend", ["varlen", "auto"])
@pytest.mark.parametrize("mode", [*MODES, "targets_inside"])
def test_cpu_backend_equals_eager_forward_and_backward(backend, mode):
    ref, other = pair(backend)
    x = inputs_for(ref.config, mode)
    m = "seq2seq" if mode == "targets_inside" else MODES[mode]
    assert_same(forward_backward(ref, x, m), forward_backward(other, x, m))


@pytest.mark.parametrize("mode", [*MODES, "targets_inside"])
def test_flex_forward_equals_eager_on_cpu(mode):
    ref, flex = pair("flex")
    x = inputs_for(ref.config, mode)
    m = "seq2seq" if mode == "targets_inside" else MODES[mode]
    o0, _ = forward_backward(ref, x, m, backward=False)
    o1, _ = forward_backward(flex, x, m, backward=False)
    assert (o0 - o1).abs().max() < 1e-5


def test_flex_refuses_attention_dropout_in_training_and_cpu_backward():
    model = make_model("flex", attention_dropout=0.1).train()
    x = random_inputs(model.config, B=2)
    with pytest.raises(ValueError, match="attention_dropout=0.1.*attention_dropout=0"):
        model(**x, mode="seq2seq")
    model.eval()                                   # no dropout in eval: fine
    with torch.no_grad():
        assert torch.isfinite(model(**x, mode="seq2seq").text_hidden).all()
    with pytest.raises(RuntimeError, match="no backward on CPU"):
        model(**x, mode="seq2seq")


@pytest.mark.skipif(CUDA, reason="on a GPU the GPU tests below run the kernels themselves")
def test_triton_kernels_equal_eager_in_the_triton_interpreter():
    """The ``triton`` backend's kernels, run by Triton's CPU interpreter (its own process:
    Triton reads TRITON_INTERPRET at import), against eager (tests/triton_attention_check.py):
    raw q/k/v over every mode and padding, head dims 16 and 24, 16- and 32-wide blocks across
    L = 23, dropout with eager given the same keep mask; the whole model (every mode, VL-BERT's
    slots, the last block at selected rows, compiled blocks); dropout in training only, the
    backend's own draw keeping 1 - p, and the same draw again where activation checkpointing
    recomputes the blocks; bounds that fall on block edges, and blocks no row sees left unread;
    and model.hidden_dropout_masks=packed's keep-bit kernel."""
    import subprocess
    import sys
    from tests.fixtures.corpus import REPO, script_env
    p = subprocess.run([sys.executable, "-m", "tests.triton_attention_check"], cwd=REPO,
                       env=script_env(TRITON_INTERPRET=1), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    assert "triton attention: all 30 checks passed" in p.stdout


def kernel_signature(fn, dtype: str, dropout: bool) -> dict:
    """Triton's compile-time signature of one of triton_attention's kernels."""
    import inspect
    pointers = {**dict.fromkeys("Q K V O DO DQ DK DV".split(), f"*{dtype}"), "VALID": "*i8", "TARGET": "*i8",
                "ENDS": "*i32", "KEEP": "*u8" if dropout else "*i8", "LSE": "*fp32", "DELTA": "*fp32"}
    sig = {}
    for name in inspect.signature(fn.fn).parameters:
        if name in ("DROPOUT", "BLOCK", "BLOCK_D", "PREC"):
            sig[name] = "constexpr"
        else:
            sig[name] = pointers.get(name, "fp32" if name.endswith("scale") else "i32")
    return sig


@pytest.mark.skipif(CUDA, reason="on a GPU the GPU tests below compile and run the kernels")
@pytest.mark.parametrize("arch", [90, 80], ids=["sm90-H100-H200", "sm80-A100"])
def test_triton_kernels_compile_for_the_gpus_we_train_on(arch):
    """The interpreter runs the kernels' Python; this compiles them as a GPU would (Triton's
    own compiler down to a cubin, ptxas included, no device needed): bf16 as training runs them
    (32/64-wide, with and without dropout) and fp32 (tests, 32-wide), within the arch's shared
    memory (H100/H200 227 KB, A100 163 KB per block)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from vltrain.model import triton_attention as T
    smem = {90: 227 * 1024, 80: 163 * 1024}[arch]
    cases = [("bf16", True, 64), ("bf16", False, 64), ("bf16", True, 32), ("fp32", True, 32)]
    for fn in (T._attention_fwd_kernel, T._attention_bwd_kernel, T._attention_bwd_delta_kernel):
        for dtype, dropout, block in cases[:2 if arch == 80 else None]:
            sig = kernel_signature(fn, dtype, dropout)
            constexprs = {"DROPOUT": dropout, "BLOCK": block, "BLOCK_D": 64,
                          "PREC": "ieee" if dtype == "fp32" else "tf32"}
            src = ASTSource(fn=fn, signature=sig, constexprs={k: v for k, v in constexprs.items() if k in sig})
            kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32))
            assert kernel.asm["cubin"] and kernel.metadata.shared <= smem, (fn.fn.__name__, dtype, block)


def test_triton_backend_refuses_cpu_tensors_naming_the_setting():
    model = make_model("triton")
    with pytest.raises(RuntimeError, match="attention_backend=triton runs Triton GPU kernels.*use "
                                           "model.attention_backend=sdpa"):
        model(**random_inputs(model.config, B=2), mode="seq2seq")


def test_varlen_gpu_kernels_refuse_fp32_by_name():
    """flash_attn's and torch's varlen kernels take fp16/bf16 only; fp32 (train.precision=fp32 on a
    GPU) gets the keys to change instead of FlashAttention's own error. The CPU emulation takes any."""
    from vltrain.model.attention import check_varlen_dtype
    for kind in ("flash_attn", "torch"):
        with pytest.raises(ValueError, match=f"{kind} varlen kernel takes fp16/bf16, got float32; "
                                             "train with train.precision=bf16"):
            check_varlen_dtype(kind, torch.float32)
        check_varlen_dtype(kind, torch.bfloat16)
        check_varlen_dtype(kind, torch.float16)
    check_varlen_dtype("emulated", torch.float32)


# --------------------------------------------------------------------------- flex mask_mod

def structures():
    """Every mode, padding inside (regions) and at the end (text), targets anywhere."""
    g = torch.Generator().manual_seed(0)
    B, L = 6, 23
    valid = torch.rand(B, L, generator=g) > 0.25
    valid[:, 0] = True
    valid[1] = True                                          # one unpadded example
    target = torch.zeros(B, L, dtype=torch.bool)
    target[0, 12:] = True                                    # seq2seq: targets at the end
    target[2, 1:] = True                                     # left-to-right
    target[3, 5:9] = True                                    # targets inside the sequence
    target[4] = torch.rand(L, generator=g) > 0.5             # scattered
    target[:, 0] = False                                     # [CLS] is never a target
    # example 5: bidirectional (no targets)
    yield A.AttentionStructure(valid, target & valid)
    yield A.AttentionStructure(valid, target)                # targets on padding too: ignored
    yield A.AttentionStructure(torch.ones(B, L, dtype=torch.bool), torch.zeros(B, L, dtype=torch.bool))


@pytest.mark.parametrize("i", range(3))
def test_flex_mask_mod_evaluated_densely_equals_dense_mask(i):
    from torch.nn.attention.flex_attention import create_mask
    st = list(structures())[i]
    B, L = st.key_valid.shape
    mask_mod = A.structure_mask_mod(st.key_valid, st.target)
    dense = create_mask(mask_mod, B, 1, L, L, device="cpu")[:, 0]        # FlexAttention's own evaluation
    assert torch.equal(dense, st.dense_allowed())
    b, q, k = torch.meshgrid(torch.arange(B), torch.arange(L), torch.arange(L), indexing="ij")
    assert torch.equal(mask_mod(b, 0, q, k), st.dense_allowed())        # plain broadcasting too


def test_compiled_block_mask_equals_uncompiled_and_compiles_once_per_shape(monkeypatch):
    """The BlockMask construction compiled as on CUDA (here on CPU, Inductor's C++ backend)
    gives the uncompiled one's block tables for every structure of one bucket shape, with one
    graph for all of them, and without torch's deprecated ``_compile`` flag."""
    import warnings
    from torch._dynamo.utils import counters
    monkeypatch.setattr(A, "_COMPILED_BLOCK_MASK", [])
    torch._dynamo.reset()
    counters.clear()
    fields = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
              "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")
    for st in structures():
        B, L = st.key_valid.shape
        mask_mod = A.structure_mask_mod(st.key_valid, st.target)
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)
            got = A.build_block_mask(mask_mod, B, L, "cpu", compiled=True, BLOCK_SIZE=8)
        ref = A.build_block_mask(mask_mod, B, L, "cpu", compiled=False, BLOCK_SIZE=8)
        for f in fields:
            assert torch.equal(getattr(got, f), getattr(ref, f)), f
        assert torch.equal(got.to_dense(), ref.to_dense())
    assert counters["stats"]["unique_graphs"] == 1


def test_flex_block_mask_is_built_once_per_forward(monkeypatch):
    calls = []
    real = A._prepare_flex
    monkeypatch.setitem(A.BACKENDS, "flex", A.Backend("flex", lambda *a: calls.append(1) or real(*a),
                                                      A.flex_attention_backend))
    model = make_model("flex")
    with torch.no_grad():
        model(**random_inputs(model.config, B=2), mode="seq2seq")
    assert len(calls) == 1 and model.config.num_layers > 1


def test_flex_compiled_once_per_shape_beyond_dynamo_recompile_limit(monkeypatch):
    """Each (shape, dtype, device, grad) key gets its own compiled callable: a new batch of
    a known bucket never recompiles, and more buckets than Dynamo's per-function recompile
    limit (8) all stay compiled."""
    from torch._dynamo.utils import counters
    monkeypatch.setattr(A, "FLEX_COMPILE_BACKEND", "eager")     # fast; the caching is what is tested
    monkeypatch.setattr(A, "_FLEX_COMPILED", {})
    torch._dynamo.reset()
    counters.clear()
    lengths = [8, 8, 9, 8, 10, 11, 12, 13, 14, 15, 16, 17, 9]
    for i, L in enumerate(lengths):
        g = torch.Generator().manual_seed(i)
        valid = torch.rand(2, L, generator=g) > 0.3
        valid[:, 0] = True
        st = A.AttentionStructure(valid, torch.zeros_like(valid).index_fill_(1, torch.arange(L // 2, L), True) & valid)
        q, k, v = torch.randn(3, 2, 2, L, 4, generator=g).unbind(0)
        with torch.no_grad():
            out = A.compiled_flex(A.flex_cache_key(q, k))(q, k, v, A._prepare_flex(st, q.dtype))
            ref = A.eager_attention(q, k, v, st.additive_mask(q.dtype), 0.0)
        assert ((out - ref) * valid[:, None, :, None]).abs().max() < 1e-5
    distinct = len(set(lengths))
    assert len(A._FLEX_COMPILED) == distinct > 8
    assert counters["stats"]["unique_graphs"] == distinct


# --------------------------------------------------------------------------- varlen scheme

def test_varlen_plan_packs_prefix_then_targets_per_example():
    st = next(structures())
    plan = A.plan_varlen(st)
    B, L = st.key_valid.shape
    valid, target = st.key_valid, st.target & st.key_valid
    cu_all, cu_t, cu_p = plan.cu_all.tolist(), plan.cu_target.tolist(), plan.cu_prefix.tolist()
    for b in range(B):
        rows = plan.all_rows[cu_all[b]:cu_all[b + 1]].tolist()
        pre = [b * L + i for i in range(L) if valid[b, i] and not target[b, i]]
        tgt = [b * L + i for i in range(L) if target[b, i]]
        assert rows == pre + tgt                      # prefix first, then targets in order
        assert plan.prefix_rows[cu_p[b]:cu_p[b + 1]].tolist() == pre
        assert plan.target_rows[cu_t[b]:cu_t[b + 1]].tolist() == tgt
    assert cu_all[-1] == int(valid.sum()) and plan.all_rows.numel() == B * L


@pytest.mark.parametrize("i", range(3))
def test_varlen_two_call_scheme_equals_eager_on_unpadded_tensors(i):
    """The two kernel calls (prefix: non-causal; targets: causal bottom-right over all keys),
    emulated with SDPA on the unpadded CPU tensors, equal eager: fp32, forward and backward."""
    st = list(structures())[i]
    B, L = st.key_valid.shape
    g = torch.Generator().manual_seed(i)
    q0, k0, v0 = torch.randn(3, B, 3, L, 8, generator=g, dtype=torch.float64).float().unbind(0)
    go = torch.randn(B, 3, L, 8, generator=g)
    rows = st.key_valid[:, None, :, None]
    res = []
    for attend, prep in ((A.eager_attention, st.additive_mask(torch.float32)), (A.varlen_attention, A.plan_varlen(st))):
        q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
        out = attend(q, k, v, prep, 0.0)
        (out * rows * go).sum().backward()          # only real query rows carry a gradient
        res.append((out * rows, q.grad, k.grad, v.grad))
    for a, b in zip(*res):
        assert (a - b).abs().max() < 1e-5
    # varlen's own output (not masked above) is zero at padding rows, as its docstring says
    assert torch.all(out.detach()[~rows.expand_as(out)] == 0) and not torch.all(out.detach() == 0)


def test_emulated_varlen_causal_is_bottom_right_aligned():
    q, k, v = torch.randn(3, 5, 2, 4).unbind(0)
    cu_q, cu_k = torch.tensor([0, 2], dtype=torch.int32), torch.tensor([0, 5], dtype=torch.int32)
    out = A.emulated_varlen(q[:2], k, v, cu_q, cu_k, 2, 5, causal=True)
    # Query 0 of 2 sees keys 0..3, query 1 sees 0..4 (aligned to the bottom-right corner).
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    ref = torch.nn.functional.scaled_dot_product_attention(q[:2].transpose(0, 1), k.transpose(0, 1),
                                                           v.transpose(0, 1), attn_mask=mask).transpose(0, 1)
    assert torch.allclose(out, ref, atol=1e-6)


# --------------------------------------------------------------------------- auto, sdpa pinning

def test_auto_picks_an_existing_backend_and_logs_it(caplog, monkeypatch):
    monkeypatch.setattr(A, "_LOGGED", set())
    model = make_model("auto")
    with caplog.at_level(logging.INFO, logger="vltrain.model.attention"):
        with torch.no_grad():
            model(**random_inputs(model.config, B=2), mode="seq2seq")
    msgs = [r.getMessage() for r in caplog.records if "attention_backend=auto" in r.getMessage()]
    assert msgs and "-> sdpa" in msgs[0]
    for dev, p in (("cpu", 0.0), ("cuda", 0.0), ("cuda", 0.1)):
        name, why = A.resolve_auto(dev, p)
        assert name in A.BACKENDS and name != "auto" and why
    assert A.resolve_auto("cuda", 0.1)[0] == "sdpa"          # flex has no dropout
    assert A.resolve_auto("cuda", 0.0)[0] == "sdpa"          # measured fastest on an H100


def test_sdpa_is_pinned_to_mask_capable_fused_kernels_on_gpu():
    from torch.nn.attention import SDPBackend
    kernels = A._sdpa_gpu_kernels()
    assert SDPBackend.MATH not in kernels and SDPBackend.FLASH_ATTENTION not in kernels
    assert set(kernels) == {SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION}


# --------------------------------------------------------------------------- compile

def test_compiled_blocks_equal_eager_forward_and_backward():
    from vltrain.model.compile import compile_blocks, is_compiled
    ref, comp = pair("sdpa")
    names = [n for n, _ in comp.named_parameters()]
    compile_blocks(comp)
    assert is_compiled(comp) and [n for n, _ in comp.named_parameters()] == names   # state dict keys kept
    x = random_inputs(ref.config, B=4)
    assert_same(forward_backward(ref, x, MODES["mixed"]), forward_backward(comp, x, MODES["mixed"]))


@pytest.mark.parametrize("aligned", [False, True], ids=["cpu-mask", "cuda-aligned-mask"])
def test_compiled_blocks_graphs_stop_growing_over_recipe_shapes(aligned, monkeypatch):
    """model.compile=true is on in every cluster recipe, whose batches are padded to their
    longest (``data.pad_to=longest``): each batch a new length, region counts vary, an epoch
    ends in a short batch, and validation runs without grad or dropout. Dynamo specialises the
    layer function on the first shape and then makes it dynamic; the number of graphs must stop
    growing after the first epoch, well below Dynamo's recompile limit (past it the blocks
    would silently run eagerly). ``aligned``: sdpa's mask as CUDA gets it, a view of a
    row-aligned buffer (padded only where L % 16, it recompiled on every switch: 5 graphs, 6).
    The recipes' dropout 0.1 (0 in eval): no graph break at the hidden dropout (a symbolic
    ``p > 0`` broke each block in three graphs once eval had run)."""
    from torch._dynamo.utils import counters
    from vltrain.model.compile import compile_blocks
    monkeypatch.setattr(A, "pads_mask_rows", lambda mask: aligned)
    torch._dynamo.reset()
    counters.clear()
    model = compile_blocks(make_model("sdpa", hidden_dropout=0.1, attention_dropout=0.1),
                           backend="eager")      # Dynamo's guards, no codegen
    cfg = model.config

    def epoch(seed):
        g = torch.Generator().manual_seed(seed)
        T, N = (torch.randint(8, 20, (6,), generator=g).tolist(), torch.randint(3, 9, (6,), generator=g).tolist())
        model.train()
        for i, B in enumerate((4, 4, 4, 3)):
            mode = torch.tensor([MODE_SEQ2SEQ, MODE_BIDIRECTIONAL, MODE_SEQ2SEQ, MODE_SEQ2SEQ][:B])
            forward_backward(model, random_inputs(cfg, B=B, T=T[i], N=N[i], seed=seed * 10 + i), mode)
        model.eval()
        for i, B in ((4, 4), (5, 2)):
            forward_backward(model, random_inputs(cfg, B=B, T=T[i], N=N[i], seed=seed * 10 + i), "seq2seq",
                             backward=False)
    epoch(0)
    after_one = counters["stats"]["unique_graphs"]
    epoch(1)
    epoch(2)
    assert counters["stats"]["unique_graphs"] == after_one <= torch._dynamo.config.recompile_limit // 2, \
        (after_one, counters["stats"]["unique_graphs"])
    assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.parametrize("L", [7, 16, 140])
def test_the_aligned_mask_is_the_same_mask_in_16_aligned_rows_whatever_the_length(L):
    mask = torch.randn(3, 1, L, L)
    view = A.aligned_rows(mask)
    assert torch.equal(view, mask) and view.stride(-2) % 16 == 0 and view.stride(-2) > L


def test_compile_config_field_and_maybe_compile():
    from vltrain.config import load_config
    from vltrain.model.compile import is_compiled, maybe_compile
    assert load_config(None, ["model.compile=true"]).model.compile is True
    model = make_model("sdpa")
    assert not is_compiled(maybe_compile(model))
    model = make_model("sdpa", compile=True)
    assert is_compiled(maybe_compile(model))


# --------------------------------------------------------------------------- GPU kernels

def cuda_inputs(cfg, mode):
    x = {k: v.cuda() for k, v in random_inputs(cfg, B=4).items()}
    return x, (MODES[mode].cuda() if torch.is_tensor(MODES[mode]) else MODES[mode])


@needs_cuda
@pytest.mark.parametrize("backend", ["sdpa", "flex", "triton", "auto"])
@pytest.mark.parametrize("mode", list(MODES))
def test_gpu_backend_equals_eager_fp32(backend, mode):
    """The real kernels (pinned efficient/cuDNN SDPA, compiled FlexAttention, vltrain's Triton
    kernels with fp32 products) in fp32."""
    ref, other = pair(backend)
    ref, other = ref.cuda(), other.cuda()
    x, m = cuda_inputs(ref.config, mode)
    assert_same(forward_backward(ref, x, m), forward_backward(other, x, m))


@needs_cuda
@pytest.mark.parametrize("backend", ["varlen", "triton"])
@pytest.mark.parametrize("mode", list(MODES))
def test_gpu_bf16_backend_as_close_to_fp32_eager_as_eager(backend, mode):
    """Under bf16 autocast (varlen kernels are fp16/bf16 only; the recipes train triton so) a
    backend must be as close to the fp32 eager reference as eager itself is under the same
    autocast."""
    if backend == "varlen" and A.varlen_kernel_name("cuda") is None:
        pytest.skip("no flash_attn and no torch.nn.attention.varlen")
    ref, var = pair(backend)
    ref, var = ref.cuda(), var.cuda()
    x, m = cuda_inputs(ref.config, mode)
    o32, g32 = forward_backward(ref, x, m)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        o_e, g_e = forward_backward(ref, x, m)
        o_v, g_v = forward_backward(var, x, m)
    err_e, err_v = (o_e.float() - o32).abs().max(), (o_v.float() - o32).abs().max()
    assert err_v <= 2 * err_e + 1e-3, (float(err_v), float(err_e))
    for n in g32:
        e, v = (g_e[n].float() - g32[n]).abs().max(), (g_v[n].float() - g32[n]).abs().max()
        assert v <= 2 * e + 1e-3 * float(g32[n].abs().max()) + 1e-6, (n, float(v), float(e))


@needs_cuda
def test_gpu_triton_own_draw_and_unread_blocks():
    """What training runs and the tests above do not: the backend's own keep-bit draw (the
    packed kernel, viewed as rows of bits) keeps 1 - p; blocks no row sees are not read (NaN
    there reaches no output), in bf16 with 64-wide blocks (tests/triton_attention_check.py)."""
    from tests import triton_attention_check as C
    assert C.check_the_backends_own_draw_keeps_1_minus_p("cuda", torch.bfloat16) == 1
    assert C.check_fully_masked_blocks_are_not_read("cuda", torch.bfloat16, block=64) == 1


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_triton_dropout_equals_eager_with_the_same_keep_mask(dtype):
    """The kernels' dropout on a GPU: output and q/k/v gradients of eager given the same mask."""
    from vltrain.model import triton_attention as T
    st = next(structures())
    valid, target = st.key_valid.cuda(), st.target.cuda()
    B, L = valid.shape
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(B, L, 3, 4, 64, device="cuda", generator=g).to(dtype).requires_grad_()
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    keep = torch.rand(B, 4, L, L, device="cuda", generator=g) >= 0.25
    out = T.triton_attention(q, k, v, T.prepare(valid, target), 0.25, keep=keep)
    q32, k32, v32 = (t.float() for t in (q, k, v))
    probs = torch.softmax(q32 @ k32.transpose(-1, -2) * 64 ** -0.5
                          + A.AttentionStructure(valid, target).additive_mask(torch.float32), -1)
    ref = (probs * keep / 0.75) @ v32
    w = torch.randn(ref.shape, device="cuda", generator=g)
    (gq,) = torch.autograd.grad((out.float() * w).sum(), qkv)
    (gr,) = torch.autograd.grad((ref * w).sum(), qkv)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert float((out.float() - ref).abs().max()) < tol * max(1.0, float(ref.abs().max()))
    assert float((gq.float() - gr.float()).abs().max()) < tol * float(gr.float().abs().max())


@needs_cuda
@pytest.mark.parametrize("block", [32, 64])
def test_gpu_triton_at_the_training_shape_bf16(block, monkeypatch):
    """What pretraining runs: L = 140 (several blocks), head dim 64, bf16, dropout 0.1: output
    and q/k/v gradients as close to the fp32 reference (same keep mask) as eager in bf16 is."""
    from vltrain.model import triton_attention as T
    monkeypatch.setattr(T, "BLOCK", block)
    g = torch.Generator().manual_seed(0)
    B, h, L, d = 2, 2, 140, 64
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[1, 120:] = False                                   # padding
    target = torch.zeros(B, L, dtype=torch.bool)
    target[0, 105:] = True                                   # seq2seq: a caption after [CLS], 100 regions ...
    valid, target = valid.cuda(), target.cuda()
    qkv = torch.randn(B, L, 3, h, d, generator=g).cuda()
    keep = (torch.rand(B, h, L, L, generator=g) >= 0.1).cuda()
    w = torch.randn(B, h, L, d, generator=g).cuda()
    mask = A.AttentionStructure(valid, target).additive_mask(torch.float32)

    def run(attend, dtype):
        x = qkv.to(dtype).requires_grad_()
        q, k, v = (t.transpose(1, 2) for t in x.unbind(2))
        out = attend(q, k, v)
        (gx,) = torch.autograd.grad((out.float() * w).sum(), x)
        return out.float(), gx.float()

    def eager(q, k, v):
        probs = torch.softmax((q @ k.transpose(-1, -2) * d ** -0.5).float() + mask, -1)
        return (probs * keep / 0.9).to(v.dtype) @ v

    ref, e16 = run(eager, torch.float32), run(eager, torch.bfloat16)
    tri = run(lambda q, k, v: T.triton_attention(q, k, v, T.prepare(valid, target), 0.1, keep=keep), torch.bfloat16)
    for r, e, t in zip(ref, e16, tri):
        err_e, err_t = float((e - r).abs().max()), float((t - r).abs().max())
        assert err_t <= 2 * err_e + 1e-3 * float(r.abs().max()), (block, err_t, err_e)


@needs_cuda
def test_gpu_sdpa_never_falls_back_to_math():
    st = next(structures())
    st = A.AttentionStructure(st.key_valid.cuda(), st.target.cuda())
    q, k, v = torch.randn(3, 6, 4, 23, 64, device="cuda", dtype=torch.bfloat16).unbind(0)
    out = A.sdpa_attention(q, k, v, A._prepare_sdpa(st, q.dtype), 0.0)   # raises if no fused kernel fits
    ref = A.eager_attention(q.float(), k.float(), v.float(), st.additive_mask(torch.float32), 0.0)
    rows = st.key_valid[:, None, :, None]
    assert ((out.float() - ref) * rows).abs().max() < 2e-2


def test_unusable_names_what_a_backend_needs_on_the_device():
    """The build's check (tests/test_resume_edges.py runs it in a trainer): every refusal the
    forward would raise at the first step, said before it."""
    from vltrain.model import triton_attention
    assert A.unusable("flex", "cpu", 0.0, training=True) == A.FLEX_CPU_MESSAGE
    assert A.unusable("flex", "cpu", 0.0, training=False) == ""           # eval: the CPU reference runs
    assert A.unusable("flex", "cuda", 0.1, training=True) == A.FLEX_DROPOUT_MESSAGE.format(p=0.1)
    assert A.unusable("flex", "cuda", 0.1, training=False) == ""
    assert A.unusable("triton", "cpu", 0.0, training=True) in (
        triton_attention.CPU_MESSAGE if not triton_attention.interpreting() else "",
        triton_attention.MISSING_MESSAGE)
    for name in ("eager", "sdpa", "varlen", "auto"):
        assert A.unusable(name, "cpu", 0.1, training=True) == ""
