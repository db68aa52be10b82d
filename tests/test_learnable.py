"""Issue 3: the synthetic corpus is learnable. The foundation's debug model (2 layers, hidden
64, BERT's vocabulary) with VLP's VQA head, trained from scratch in a plain single-process
torch loop (no DeepSpeed, no distributed, no DataLoader: rows read once, batches drawn with a
seeded generator), answers the held-out VQA split (other images) clearly above always giving
the training split's majority answer, scored with the official VQA accuracy."""
import json
import os

import numpy as np
import torch

from tests.fixtures.tasks import read_rows
from vltrain.config import debug_model_config, load_config
from vltrain.data.collate import StreamInfo
from vltrain.data.datasets import read_meta
from vltrain.metrics.vqa import majority_answer_baseline, vqa_accuracy
from vltrain.model import VLModel
from vltrain.tasks.collate_tasks import VQACollator
from vltrain.tasks.vqa import VQATask
from vltrain.tokenization import Tokenizer

STEPS, BATCH, LR = 200, 32, 1e-3
MARGIN = 12.0          # accuracy points over the majority answer (reached: ~20, see the message)


def test_debug_model_answers_synthetic_vqa_above_the_majority_answer(synthetic_corpus):
    train_dir = os.path.join(synthetic_corpus, "vqa", "train")
    val_dir = os.path.join(synthetic_corpus, "vqa", "val")
    cfg = load_config("configs/vqa_debug.yaml", [f"data.train={train_dir}", f"data.val={val_dir}"])
    cfg.model = debug_model_config()
    tok = Tokenizer(cfg.data.vocab)
    with open(os.path.join(train_dir, "answer_vocab.json")) as f:
        answers = json.load(f)
    train, val = read_rows(train_dir), read_rows(val_dir)
    train_collate = VQACollator(cfg, tok, [StreamInfo(train_dir, read_meta(train_dir))], train=True)
    val_collate = VQACollator(cfg, tok, [StreamInfo(val_dir, read_meta(val_dir))], train=False)

    torch.manual_seed(0)
    task = VQATask(VLModel(cfg.model), "vlp", answers)
    opt = torch.optim.AdamW(task.parameters(), lr=LR, weight_decay=0.01)
    rng = np.random.default_rng(0)
    losses = []
    for step in range(STEPS):
        for g in opt.param_groups:
            g["lr"] = LR * min(1.0, (step + 1) / 20)
        batch = train_collate([train[i] for i in rng.choice(len(train), BATCH, replace=False)])
        loss, _ = task(batch)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(task.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())

    task.eval()
    scores = []
    with torch.no_grad():
        for i in range(0, len(val), 64):
            batch = val_collate(val[i:i + 64])
            pred = task(batch, predict=True)["logits"].argmax(1).tolist()
            scores += [vqa_accuracy(answers[p], gt) for p, gt in zip(pred, batch.task["answers"])]
    acc = 100.0 * float(np.mean(scores))
    majority, base = majority_answer_baseline(train, val, answers)
    print(f"VQA accuracy {acc:.2f} vs majority answer {majority!r} {base:.2f}; loss "
          f"{np.mean(losses[:20]):.3f} -> {np.mean(losses[-20:]):.3f}")
    assert np.mean(losses[-20:]) < 0.6 * np.mean(losses[:20])
    assert acc >= base + MARGIN, f"accuracy {acc:.1f} vs majority answer {majority!r} {base:.1f}"
