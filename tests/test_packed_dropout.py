"""``model.hidden_dropout_masks=packed`` (vltrain/model/packed_dropout.py): bit-packed keep masks.

CPU: the format (bit i of byte j = element 8j + i), the rate (every bit position), the
dropout's forward and backward from given bits and what it saves; through the model, compiled
blocks draw exactly eager's masks (two distinct draws per block: Inductor's CSE merged them
into one before the op was tagged as random) and save the bits, not a mask per element;
activation checkpointing redraws the same bits. The Triton kernel runs in Triton's
interpreter (tests/triton_attention_check.py) and compiles for sm90/sm80 here; on a GPU the
CUDA test runs it.
"""
import pytest
import torch

from tests.test_attention_backends import CUDA, forward_backward
from tests.test_model import make_model, random_inputs
from vltrain.model import packed_dropout as P

needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU: the keep-bit kernel runs there (CPU: in "
                                                  "Triton's interpreter, tests/triton_attention_check.py)")


def reference_bits(n: int, p: float, seed: int) -> torch.Tensor:
    """The torch draw written out: 16-bit numbers from the seeded generator, 8 per byte."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.randint(0, 1 << 16, ((n + 7) // 8, 8), dtype=torch.int32, generator=g) >= round(p * 65536)
    return sum(keep[:, i].to(torch.int32) << i for i in range(8)).to(torch.uint8)


def test_drop_probability_and_scale_are_16_bit():
    assert P.threshold(0.1) == 6554 and P.scale(0.1) == 65536 / (65536 - 6554)
    assert P.threshold(0.5) == 32768 and P.scale(0.5) == 2.0
    assert P.threshold(0.0) == 0 and P.scale(0.0) == 1.0
    # probabilities the 16-bit draw cannot take are named at model build
    for p, key, backend, masks in ((1.0, "model.hidden_dropout", "sdpa", "packed"),
                                   (1e-6, "model.hidden_dropout", "sdpa", "packed"),
                                   (1.0, "model.attention_dropout", "triton", "torch")):
        with pytest.raises(ValueError, match=rf"{key}={p}: vltrain's keep bits draw .* in steps of 1/65536"):
            make_model(backend, hidden_dropout_masks=masks, **{key.split(".")[1]: p})
    make_model(hidden_dropout=1.0)                    # torch's F.dropout takes it (zeros)
    make_model(hidden_dropout_masks="packed", hidden_dropout=0.0)


@pytest.mark.skipif(CUDA, reason="the CPU draw; the CUDA test checks the Triton kernel")
def test_cpu_draw_format_and_rate():
    n = 8 * 50_000 + 3                      # not a multiple of 8: the last byte is partial
    torch.manual_seed(7)
    bits = P.keep_bits(n, 0.1, torch.device("cpu"))
    assert bits.dtype == torch.uint8 and bits.shape == ((n + 7) // 8,)
    assert torch.equal(bits, reference_bits(n, 0.1, 7))
    keep = P.unpack(bits, torch.empty(n))
    assert keep.shape == (n,) and set(keep.unique().tolist()) <= {0.0, 1.0}
    per_bit = P.unpack(bits, torch.empty(8 * bits.numel())).view(-1, 8).mean(0)
    sigma = (0.1 * 0.9 / bits.numel()) ** 0.5
    assert ((per_bit - (1 - 6554 / 65536)).abs() < 5 * sigma).all(), per_bit       # every bit position
    torch.manual_seed(8)
    assert not torch.equal(bits, P.keep_bits(n, 0.1, torch.device("cpu")))


def test_dropout_from_bits_forward_backward_and_what_it_saves():
    torch.manual_seed(0)
    y = torch.randn(3, 7, 16, requires_grad=True)
    bits = torch.randint(0, 256, ((y.numel() + 7) // 8,), dtype=torch.uint8)
    keep = torch.tensor([(int(bits[i // 8]) >> (i % 8)) & 1 for i in range(y.numel())], dtype=torch.float32)
    keep = keep.view(y.shape)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = P.apply_bits(y, bits, 0.25)
    assert torch.equal(out, y * keep * P.scale(0.25))
    assert len(saved) == 1 and saved[0] is bits          # 1/8 byte per element, not the unpacked mask
    g = torch.randn(y.shape)
    (gy,) = torch.autograd.grad(out, y, g)
    assert torch.equal(gy, g * keep * P.scale(0.25))
    assert P.packed_dropout(y, 0.0) is y


def _model(masks: str, compiled: bool = False, **kw):
    m = make_model("sdpa", hidden_dropout=0.1, attention_dropout=0.0, hidden_dropout_masks=masks, **kw).train()
    if compiled:
        from vltrain.model.compile import compile_blocks
        compile_blocks(m, dynamic=False)
    return m


def _run(model, x, seed=5):
    torch.manual_seed(seed)
    return forward_backward(model, x, "bidirectional")


def _assert_close(a, b, tol=1e-5):
    (o0, g0), (o1, g1) = a, b
    assert (o0 - o1).abs().max() <= tol, float((o0 - o1).abs().max())
    assert all((g0[k] - g1[k]).abs().max() <= tol for k in g0), [k for k in g0 if (g0[k] - g1[k]).abs().max() > tol]


def test_compiled_blocks_draw_eagers_masks_and_save_bits():
    """The op is random (tagged nondeterministic_seeded): Inductor neither merges a block's two
    identical draws nor recomputes one in the backward; so compiled = eager, given the seed."""
    eager, compiled = _model("packed"), _model("packed", compiled=True)
    compiled.load_state_dict(eager.state_dict())
    x = random_inputs(eager.config, B=4)
    seen = []
    compiled.layers[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape))
    _run(compiled, x)                                   # compiles
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((t.dtype, t.numel())) or t, lambda t: t):
        got = _run(compiled, x)
    _assert_close(_run(eager, x), got)
    n = seen[0].numel()
    layers = eager.config.num_layers
    assert saved.count((torch.uint8, (n + 7) // 8)) == 2 * layers, saved
    assert not [s for s in saved if s[0] in (torch.bool, torch.uint8) and s[1] >= n], saved
    # and the masks are random: another seed, another result
    assert (_run(eager, x, seed=6)[0] - got[0]).abs().max() > 1e-3


def test_activation_checkpointing_redraws_the_same_bits():
    plain, ckpt = _model("packed"), _model("packed", activation_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x = random_inputs(plain.config, B=4)
    _assert_close(_run(plain, x), _run(ckpt, x), tol=0)


@pytest.mark.skipif(CUDA, reason="on a GPU the CUDA test runs the kernel")
@pytest.mark.parametrize("arch", [90, 80], ids=["sm90-H100-H200", "sm80-A100"])
def test_keep_bits_kernel_compiles_for_the_gpus_we_train_on(arch):
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    src = ASTSource(fn=P._keep_bits_kernel, signature={"SEED": "*i64", "OUT": "*u8", "n_bytes": "i32", "cut": "i32",
                                                       "BLOCK": "constexpr"},
                    constexprs={"BLOCK": P.BYTES_PER_PROGRAM})
    assert triton.compile(src, target=GPUTarget("cuda", arch, 32)).asm["cubin"]


@needs_cuda
def test_cuda_kernel_rate_compiled_step_and_no_host_sync():
    """The Triton kernel on the GPU: every bit position keeps 1 - p; a bf16 compiled step equals
    the eager one (the same bits: a different mask would differ by O(1), bf16 rounding by 1e-2);
    the draw does not wait for the device."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    n = 8 * 1_000_000
    torch.cuda.set_sync_debug_mode("error")
    try:
        bits = P.keep_bits(n, 0.1, dev)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    per_bit = P.unpack(bits, torch.empty(n, device=dev)).view(-1, 8).mean(0).cpu()
    assert ((per_bit - (1 - 6554 / 65536)).abs() < 5 * (0.09 / 1e6) ** 0.5).all(), per_bit
    eager, compiled = (_model("packed", compiled=c).to(dev, torch.bfloat16) for c in (False, True))
    compiled.load_state_dict(eager.state_dict())
    x = {k: (v.to(dev, torch.bfloat16) if v.is_floating_point() else v.to(dev))
         for k, v in random_inputs(eager.config, B=4).items()}
    _run(compiled, x)
    _assert_close(_run(eager, x), _run(compiled, x), tol=5e-2)
