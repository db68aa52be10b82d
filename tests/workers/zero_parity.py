"""2-rank worker: the same training under ZeRO 0/1/2/3, and with gradient accumulation; after
the ZeRO-3 training, cached greedy decoding through the engine's (partitioned) model beside a
plain model holding the gathered weights; and a VL-BERT model with text-only micro-batches on
one rank beside image batches on the other (VL-BERT's text mixing) under ZeRO 0/2/3.

Every configuration trains the debug model on identical per-rank batches made by the real
collator from in-memory samples, with the same seed; rank 0 writes per-step losses as JSON.
Usage: python tests/workers/zero_parity.py OUT.json STEPS
"""
import dataclasses
import json
import sys

import torch


def main(out: str, steps: int):
    import deepspeed
    from tests.fixtures.mds import make_caption_samples, make_text_samples
    from vltrain.config import load_config
    from vltrain.data.collate import PretrainCollator, StreamInfo
    from vltrain.data.schema import make_meta
    from vltrain.engine.distributed import init_distributed
    from vltrain.engine.ds_config import no_decay_param_groups, resolve_ds_config
    from vltrain.engine.schedule import linear_warmup_decay
    from vltrain.model import VLModel
    from vltrain.tasks.pretrain import PretrainTask
    from vltrain.tokenization import Tokenizer

    info = init_distributed(60)
    cfg = load_config("configs/debug.yaml", ["objectives.loss_reduction=example", f"train.max_steps={steps}",
                                             "train.micro_batch_size=8", "train.warmup_steps=2"])
    tok = Tokenizer(cfg.data.vocab)
    meta = make_meta("captions", 64, 17, ("cls_prob",))
    collator = PretrainCollator(tok, cfg.data, cfg.objectives, cfg.train.seed, [StreamInfo("mem", meta)])
    samples = make_caption_samples(16 * steps * 2, feature_dim=64, num_classes=17, seed=3)
    mine = samples[info.rank::2]                      # rank r's stream, same in every config

    decoded = {}

    def decode_both(model):
        """Decoding reads every block's weights inside Block.__call__, where ZeRO-3 gathers
        them; a use outside it would see the empty partitions (or fail)."""
        from tests.test_decoding import make_images
        from vltrain.decoding import DecodeTokens, greedy_decode
        ids = DecodeTokens.from_tokenizer(tok)
        images = make_images(B=3, N=6)
        model.eval()
        with torch.no_grad():
            decoded["zero3"] = greedy_decode(model, images, ids, max_len=6, min_len=2).tokens
            with deepspeed.zero.GatheredParameters(list(model.parameters())):
                plain = VLModel(model.config)
                plain.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})
            decoded["plain"] = greedy_decode(plain.eval(), images, ids, max_len=6, min_len=2).tokens

    # VL-BERT (its recipes' sequence, whole-image region and [END]): rank 1's micro-batches
    # alternate text-only / image, rank 0's are images, every third without a masked token or
    # region (what objectives.mask_sampling=bernoulli can draw for a small micro-batch).
    vlbert = ["model.region_embedding=vlbert", "model.type_vocab_size=3", "model.image_token_type=2",
              "model.use_cls_probs=false", "model.geometry_conf=false", "model.vlbert_geometry_dim=64",
              "model.vlbert_image_box=true", "model.vlbert_end_token=true", "objectives.seq2seq_prob=0"]
    vcfg = load_config("configs/debug.yaml", vlbert)
    streams = [StreamInfo("mem", meta), StreamInfo("text", make_meta("text", None, None))]
    vcoll = PretrainCollator(tok, vcfg.data, vcfg.objectives, vcfg.train.seed, streams, vlbert=True, image_box=True)
    nothing = dataclasses.replace(vcfg.objectives, mask_sampling="bernoulli", mlm_prob=0.0, mrc_prob=0.0)
    untargeted = PretrainCollator(tok, vcfg.data, nothing, vcfg.train.seed, streams, vlbert=True, image_box=True)
    texts = [dict(t, _stream=1) for t in make_text_samples(8 * steps, start_id=10 ** 6)]

    def vlbert_batch(step, micro, i):
        if info.rank == 1 and step % 2 == 0:
            return vcoll(texts[i:i + micro])
        if info.rank == 0 and step % 3 == 1:
            return untargeted(mine[i:i + micro])
        return vcoll(mine[i:i + micro])

    def run(stage: int, micro: int, accum: int, extra=(), make=None):
        c = load_config("configs/debug.yaml", ["objectives.loss_reduction=example", f"train.max_steps={steps}",
                                               f"train.micro_batch_size={micro}", f"train.grad_accum={accum}",
                                               "train.warmup_steps=2", *extra])
        ds = resolve_ds_config({"zero_optimization": {"stage": stage}}, c, info.world, "cpu")
        torch.manual_seed(0)
        task = PretrainTask(VLModel(c.model), c.objectives)
        engine, *_ = deepspeed.initialize(model=task, config=ds, lr_scheduler=linear_warmup_decay(c),
                                          model_parameters=no_decay_param_groups(task, c.train.weight_decay))
        losses, i = [], 0
        for step in range(steps):
            step_loss = 0.0
            for _ in range(accum):
                batch = make(step, micro, i) if make else collator(mine[i:i + micro])
                i += micro
                loss, _ = engine(batch)
                engine.backward(loss)
                engine.step()
                step_loss += float(loss) / accum
            t = torch.tensor([step_loss])
            torch.distributed.all_reduce(t)
            losses.append(float(t) / info.world)
        if stage == 3:
            decode_both(engine.module.model)
        engine.destroy()
        return losses

    result = {f"zero{s}": run(s, 8, 1) for s in (0, 1, 2, 3)}
    result["zero0_accum2"] = run(0, 4, 2)
    result["zero2_accum2"] = run(2, 4, 2)
    result["decoded"] = decoded
    for s_ in (0, 2, 3):
        result[f"vlbert_text_zero{s_}"] = run(s_, 8, 1, vlbert, vlbert_batch)
    if info.rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
