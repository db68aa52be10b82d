"""vltrain/engine/ds_readbacks.py: DeepSpeed's ZeRO-1/2 step without its host-device waits
gives the same bits as DeepSpeed's own, with finite and non-finite gradients, and applies only
to the code it was written for. (That Trainer.train() then reads nothing back in DeepSpeed's
step: tests/test_host_syncs.py.)"""
import textwrap

import pytest
import torch

from tests.fixtures.corpus import run_one_rank
from vltrain.engine import ds_readbacks

SCRIPT = textwrap.dedent(r"""
    import hashlib, json, sys
    import torch, deepspeed
    torch.set_num_threads(1)
    from tests.fixtures.host_sync import HostSyncRecorder
    from vltrain.config import Config, debug_model_config
    from vltrain.engine import ds_readbacks
    from vltrain.engine.distributed import init_distributed
    from vltrain.engine.ds_config import no_decay_param_groups, resolve_ds_config
    info = init_distributed(timeout_s=60)
    NONFINITE_STEP = 4                  # the last: inf gradients x 0 leave NaN weights (DeepSpeed's as ours)

    def engine(stage):
        cfg = Config(model=debug_model_config())
        cfg.train.micro_batch_size, cfg.train.grad_accum, cfg.train.precision = 4, 1, "bf16"
        cfg.train.lr, cfg.train.warmup_steps, cfg.train.max_steps, cfg.train.grad_clip = 1e-2, 0, 10, 1.0
        ds = resolve_ds_config({"zero_optimization": {"stage": stage}}, cfg, info.world, info.accelerator)
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Embedding(16, 8), torch.nn.Flatten(), torch.nn.Linear(24, 16),
                                torch.nn.GELU(), torch.nn.LayerNorm(16), torch.nn.Linear(16, 1))
        return deepspeed.initialize(model=m, model_parameters=no_decay_param_groups(m, 0.01), config=ds)[0]

    def train(eng):
        g = torch.Generator().manual_seed(1)
        states, norms, finite = [], [], []
        rec = HostSyncRecorder(packages=("deepspeed", "vltrain"))
        for step in range(5):
            x = torch.randint(0, 16, (4, 3), generator=g)
            y = 10 * torch.randn(4, 1, generator=g)               # large: the clip at 1.0 acts
            with rec:
                loss = (eng(x).float() - y).pow(2).mean()
                if step == NONFINITE_STEP:
                    loss = loss * float("inf")                    # inf/NaN gradients
                eng.backward(loss)
                eng.step()
            h = hashlib.sha256()
            for t in [*eng.module.parameters(), *eng.optimizer.single_partition_of_fp32_groups]:
                h.update(t.detach().float().numpy().tobytes())
            states.append(h.hexdigest())
            norms.append(float(eng.get_global_grad_norm()))
            finite.append(all(bool(torch.isfinite(p).all()) for p in eng.module.parameters()))
        return dict(states=states, norms=norms, finite=finite,
                    syncs=sorted({w.rsplit(":", 1)[0] for _, w in rec.calls}))

    out = {}
    for stage in (1, 2):
        out[f"deepspeed-{stage}"] = train(engine(stage))
    for stage in (1, 2):
        eng = engine(stage)
        known = dict(ds_readbacks.KNOWN_SOURCES)
        ds_readbacks.KNOWN_SOURCES["unscale_and_clip_grads"] = "another version"
        refused = ds_readbacks.drop_step_readbacks(eng.optimizer)
        untouched = "unscale_and_clip_grads" not in vars(eng.optimizer)
        ds_readbacks.KNOWN_SOURCES.update(known)
        applied = ds_readbacks.drop_step_readbacks(eng.optimizer)
        out[f"vltrain-{stage}"] = dict(train(eng), refused=refused, untouched=untouched, applied=applied)
    print("RESULTS " + json.dumps(out), flush=True)
""")


@pytest.fixture(scope="module")
def runs():
    return run_one_rank(SCRIPT)


@pytest.mark.parametrize("stage", [1, 2])
def test_same_bits_as_deepspeeds_step_without_its_waits(runs, stage):
    theirs, ours = runs[f"deepspeed-{stage}"], runs[f"vltrain-{stage}"]
    assert ours["refused"] is False and ours["untouched"], ours     # another DeepSpeed's code: left alone
    assert ours["applied"] is True
    assert ours["states"] == theirs["states"]                       # weights and fp32 masters, every step
    assert ours["norms"] == theirs["norms"]
    assert min(theirs["norms"][:4]) > 1.0, theirs["norms"]           # clipping acted at every finite step
    assert theirs["norms"][4] == float("inf")                        # the non-finite step
    assert theirs["finite"] == [True] * 4 + [False], theirs["finite"]
    assert len(set(theirs["states"])) == 5                           # every step changed something
    # DeepSpeed's own step waits (host-built constants, the norm read back); ours does not
    assert theirs["syncs"] == ["deepspeed/runtime/utils.py:is_invalid_grad_norm",
                               "deepspeed/runtime/utils.py:mask_nan_or_inf_with_val_inplace",
                               "deepspeed/runtime/zero/stage_1_and_2.py:unscale_and_clip_grads"], theirs["syncs"]
    assert ours["syncs"] == [], ours["syncs"]


def test_only_zero12_optimizers_are_touched():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    assert ds_readbacks.drop_step_readbacks(opt) is False
    assert "unscale_and_clip_grads" not in vars(opt)


def test_the_clip_computes_deepspeeds_values_for_every_norm():
    """DeepSpeed's unscale_and_clip_grads and ours on the same inputs: finite, zero, negative
    (DeepSpeed's -1 sentinel), infinite and NaN norms; loss scale 1 and 1024 (fp16); clipping
    on and off; flat gradients and lists of sub-partitions; no norm (DeepSpeed's
    compute_grad_norm=false, without clipping; ours hands it to DeepSpeed's method)."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    class Optimizer(DeepSpeedZeroOptimizer):     # just the fields the method reads
        loss_scale = property(lambda self: self._scale)

        def __init__(self, clip, scale):         # no DeepSpeed set-up
            self.clip_grad, self._scale, self.device = clip, scale, "cpu"

    def grads():
        g = torch.Generator().manual_seed(0)
        return [torch.randn(5, generator=g), [torch.randn(3, generator=g), torch.randn(2, generator=g)]]

    def flat(gs):
        return torch.cat([t.view(-1) for x in gs for t in (x if isinstance(x, list) else [x])])

    norms = [2.5, 0.3, 0.0, -0.0, -1.0, float("inf"), float("-inf"), float("nan")]
    seen = set()
    for scale in (1.0, 1024.0):
        for clip in (0.0, 1.0):
            for norm in [torch.tensor(v) for v in norms] + ([None] if clip == 0.0 else []):
                opt = Optimizer(clip, scale)
                theirs, ours = grads(), grads()
                DeepSpeedZeroOptimizer.unscale_and_clip_grads(opt, theirs, norm)
                ds_readbacks.unscale_and_clip_grads(opt, ours, norm)
                a, b = flat(theirs), flat(ours)
                assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()), \
                    (scale, clip, norm, a, b)
                seen.add("unchanged" if torch.equal(a, flat(grads())) else "zero" if not a.any() else "scaled")
    assert seen == {"unchanged", "scaled", "zero"}, seen      # zero: an invalid norm clips to nothing


def test_the_replacements_compute_deepspeeds_values():
    from deepspeed.runtime.utils import mask_nan_or_inf_with_val_inplace as theirs
    for v in (2.5, float("inf"), float("-inf"), float("nan"), 0.0):
        a, b = torch.tensor([v]), torch.tensor([v])
        theirs(a, device="cpu")
        ds_readbacks.mask_nan_or_inf_with_val_inplace(b, device="cpu")
        assert torch.equal(a, b), (v, a, b)
