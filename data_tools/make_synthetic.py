"""A synthetic but learnable vision-language corpus: rendered shapes, pixel features, templated text.

Every image is really rendered with PIL (``--image-size`` square, default 64): 2-4 objects,
each a shape (circle, square, triangle, cross) x colour (red, green, blue, yellow) x size
(small, large), no two with the same shape and colour, at non-overlapping random positions on
a plain or noisy grey background. That gives 16 object classes; the detector class index is
``1 + 4 * shape + colour`` with 0 = background, so ``num_classes = 17``.

Region features come FROM THE PIXELS, never from the labels: a small fixed random conv net
(seeded with a constant, the same for every split and every ``--seed``) runs over the image,
``torchvision.ops.roi_align`` pools its feature map and the raw pixels inside each box, and a
fixed random projection maps that to ``--feature-dim`` (default 64), stored float16.
Regions = every object's box (a few pixels of jitter) plus 1-2 distractor boxes on the
background, in a random order; ``image_feature`` is the same pooling over the whole image.
The detector-like outputs (``cls_prob`` (N, 17), ``obj_labels``, ``obj_conf``) are a noisy
softmax peaked at the true class (background for distractors; ~10% of objects get a wrong
peak, like a real detector's mistakes); ``obj_labels``/``obj_conf`` follow bottom-up
attention's ``objects_id``/``objects_conf`` (argmax / max over the non-background classes).

Text, from templates, all consistent with the scene:
  captions  5 per image ("a small red circle left of a blue square", "there is a large green cross")
  vqa       --questions-per-image questions ("what color is the circle?", "how many squares are
            there?", "is there a red triangle?", "what shape is left of the blue square?") with
            10 annotator answers (and the official answer type: yes/no, number, other for colour /
            shape / size): ~--answer-noise of them wrong, and surface variants ("two"/"2",
            "Yes"/"yes.", "a circle"/"circle") that the training targets' normalisation
            (normalize_answer) merges; the official accuracy compares annotator answers as given
            (only punctuation is stripped, and only when they disagree), so it counts most
            variants as misses
  refs      --refs-per-image unambiguous referring expressions ("the red circle", "the large
            square on the left") with the target region index and the object's true box
  mc        --mc-per-image 4-way multiple-choice items (question, 4 answers, one correct)
  text      --text-docs text-only documents (VL-BERT's <Text, None> mixing), split train only

Layout (local folder or s3://bucket/prefix):
  OUT/{captions,vqa,refs,mc}/{pretrain,train,val,test}/   one MDS dataset each
  OUT/vqa/<split>/answer_vocab.json                       the closed answer set (17 answers)
  OUT/text/train/
  OUT/synthetic_corpus.json                               what was written, counts, settings
Images of different splits are different renders (ids ``syn-<split>-<n>``); pretrain images
are disjoint from the fine-tuning splits. Everything is a function of ``--seed``: image n of a
split depends only on (seed, split, n), and the same seed gives byte-identical shards.
A split with 0 images is not written.
"""
from __future__ import annotations

if __package__ in (None, ""):  # run as a script: import `data_tools` as a package, and keep
    import os as _os, sys as _sys  # data_tools/inspect.py from shadowing the stdlib `inspect`
    _here = _os.path.dirname(_os.path.realpath(__file__))
    _sys.path[:] = [p for p in _sys.path if _os.path.realpath(p or ".") != _here]   # symlinks resolved
    _sys.path.insert(0, _os.path.dirname(_here))

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from data_tools.common import (BadInputError, add_output_args, join_location,
                               open_writer, run_main, upload_file)
from vltrain.data import schema
from vltrain.redact import RedactingArgumentParser

SHAPES = ("circle", "square", "triangle", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
COLOURS = ("red", "green", "blue", "yellow")
RGB = {"red": (215, 40, 40), "green": (40, 170, 60), "blue": (45, 75, 215), "yellow": (225, 205, 40)}
SIZES = ("small", "large")
CLASS_NAMES = ["background"] + [f"{c} {s}" for s in SHAPES for c in COLOURS]
NUM_CLASSES = len(CLASS_NAMES)                     # 17
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ANSWER_VOCAB = ["yes", "no", "0", "1", "2", "3", "4", *COLOURS, *SHAPES, *SIZES]
SPLITS = ("pretrain", "train", "val", "test")
SPLIT_CODE = {"pretrain": 0, "train": 1, "val": 2, "test": 3}
TEXT_CODE = 9
FEATURE_NET_SEED = 1234                            # the "detector": fixed, independent of --seed
CHUNK = 128                                        # images per conv batch
OPTIONAL = ("cls_prob", "obj_labels", "obj_conf", "image_feature")
KIND_OPTIONAL = {"vqa": ("answer_type",)}       # the optional task columns written, by kind


def class_index(shape: str, colour: str) -> int:
    return 1 + 4 * SHAPES.index(shape) + COLOURS.index(colour)


# ---------------------------------------------------------------- scenes and rendering

@dataclass
class Obj:
    shape: str
    colour: str
    size: str
    box: tuple[float, float, float, float]         # pixels x1, y1, x2, y2

    @property
    def cx(self) -> float:
        return (self.box[0] + self.box[2]) / 2

    @property
    def cy(self) -> float:
        return (self.box[1] + self.box[3]) / 2

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass
class Scene:
    objs: list[Obj]
    noisy: bool
    pixels: np.ndarray                              # (S, S, 3) uint8
    regions: np.ndarray                             # (N, 4) float32 pixels, shuffled
    region_obj: list[int]                           # region -> object index or -1 (distractor)


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _overlaps(a, b, margin: float) -> bool:
    return not (a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1])


def make_scene(rng: np.random.Generator, size: int) -> Scene:
    n_obj = int(rng.integers(2, 5))
    combos = rng.permutation(16)[:n_obj]
    objs: list[Obj] = []
    for k in combos:
        shape, colour = SHAPES[k // 4], COLOURS[k % 4]
        sz = SIZES[int(rng.integers(0, 2))]
        side = size * (0.2 if sz == "small" else 0.34) * float(rng.uniform(0.9, 1.1))
        for _ in range(100):
            x1 = float(rng.uniform(1, size - side - 1))
            y1 = float(rng.uniform(1, size - side - 1))
            box = (x1, y1, x1 + side, y1 + side)
            if not any(_overlaps(box, o.box, 2.0) for o in objs):
                objs.append(Obj(shape, colour, sz, box))
                break
    if len(objs) < 2:                                # pathological placement: try again
        return make_scene(rng, size)

    noisy = bool(rng.integers(0, 2))
    base = int(rng.integers(95, 185))
    bg = tuple(int(base + t) for t in rng.integers(-8, 9, 3))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    for o in objs:
        col = tuple(int(np.clip(c + t, 0, 255)) for c, t in zip(RGB[o.colour], rng.integers(-15, 16, 3)))
        x1, y1, x2, y2 = o.box
        if o.shape == "circle":
            draw.ellipse([x1, y1, x2, y2], fill=col)
        elif o.shape == "square":
            draw.rectangle([x1, y1, x2, y2], fill=col)
        elif o.shape == "triangle":
            draw.polygon([(x1, y2), (x2, y2), ((x1 + x2) / 2, y1)], fill=col)
        else:
            t = (x2 - x1) / 3
            draw.rectangle([x1 + t, y1, x2 - t, y2], fill=col)
            draw.rectangle([x1, y1 + t, x2, y2 - t], fill=col)
    pixels = np.asarray(img, dtype=np.float32)
    pixels += rng.normal(0.0, 10.0 if noisy else 2.0, pixels.shape)
    pixels = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)

    regions, region_obj = [], []
    for i, o in enumerate(objs):
        jit = rng.uniform(-0.06, 0.06, 4) * (o.box[2] - o.box[0])
        b = np.clip(np.array(o.box) + jit, 0, size)
        regions.append(b)
        region_obj.append(i)
    for _ in range(int(rng.integers(1, 3))):
        for _ in range(50):
            side = float(rng.uniform(0.12, 0.3)) * size
            x1, y1 = rng.uniform(0, size - side, 2)
            b = (float(x1), float(y1), float(x1) + side, float(y1) + side)
            if all(_iou(b, o.box) < 0.05 for o in objs):
                regions.append(np.array(b))
                region_obj.append(-1)
                break
    order = rng.permutation(len(regions))
    return Scene(objs, noisy, pixels, np.array([regions[i] for i in order], np.float32),
                 [region_obj[i] for i in order])


class FeatureNet:
    """The fixed "detector": random conv net + RoIAlign over it and over the pixels + projection."""

    def __init__(self, feature_dim: int):
        import torch
        with torch.random.fork_rng():
            torch.manual_seed(FEATURE_NET_SEED)
            self.net = torch.nn.Sequential(
                torch.nn.Conv2d(3, 32, 5, stride=2, padding=2), torch.nn.ReLU(),
                torch.nn.Conv2d(32, 32, 1), torch.nn.ReLU()).eval()
            in_dim = 32 * 3 * 3 + 3 * 3 * 3
            self.proj = torch.randn(in_dim, feature_dim) * (2.0 / in_dim) ** 0.5
        self.torch = torch

    def __call__(self, images: np.ndarray, boxes: list[np.ndarray]) -> list[np.ndarray]:
        """images (B, S, S, 3) uint8, boxes[b] (K_b, 4) pixels -> features[b] (K_b, D) float32."""
        from torchvision.ops import roi_align
        torch = self.torch
        with torch.no_grad():
            x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0 - 0.5
            fmap = self.net(x)
            rois = [torch.from_numpy(b.astype(np.float32)) for b in boxes]
            deep = roi_align(fmap, rois, output_size=3, spatial_scale=0.5, sampling_ratio=2, aligned=True)
            pix = roi_align(x, rois, output_size=3, spatial_scale=1.0, sampling_ratio=2, aligned=True)
            feats = torch.cat([deep.flatten(1), 4.0 * pix.flatten(1)], 1) @ self.proj
        out, i = [], 0
        for b in boxes:
            out.append(feats[i:i + len(b)].numpy())
            i += len(b)
        return out


def detector_outputs(rng: np.random.Generator, scene: Scene) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = len(scene.regions)
    logits = rng.normal(0.0, 1.0, (n, NUM_CLASSES))
    for r, oi in enumerate(scene.region_obj):
        if oi < 0:
            cls = 0
        else:
            o = scene.objs[oi]
            cls = class_index(o.shape, o.colour)
            if rng.random() < 0.1:                    # a detector mistake
                cls = int(rng.integers(1, NUM_CLASSES))
        logits[r, cls] += float(rng.uniform(3.0, 6.0))
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    # obj_labels / obj_conf as bottom-up attention writes objects_id / objects_conf: argmax and max
    # over the non-background classes (label k is class column k + 1).
    return p.astype(np.float16), p[:, 1:].argmax(1).astype(np.int32), p[:, 1:].max(1).astype(np.float32)


# ---------------------------------------------------------------- text

def _rel(a: Obj, b: Obj) -> str:
    """Where a is relative to b."""
    dx, dy = b.cx - a.cx, b.cy - a.cy
    if abs(dx) >= abs(dy):
        return "left of" if dx > 0 else "right of"
    return "above" if dy > 0 else "below"


def make_captions(rng: np.random.Generator, s: Scene, k: int = 5) -> list[str]:
    objs = s.objs
    cands = []
    for a in objs:
        cands.append(f"there is a {a.size} {a.colour} {a.shape}")
        cands.append(f"a {a.size} {a.colour} {a.shape} on a {'noisy' if s.noisy else 'plain'} grey background")
        for b in objs:
            if a is not b:
                cands.append(f"a {a.size} {a.colour} {a.shape} {_rel(a, b)} a {b.colour} {b.shape}")
                cands.append(f"a {a.colour} {a.shape} {_rel(a, b)} a {b.size} {b.colour} {b.shape}")
                cands.append(f"a {a.colour} {a.shape} and a {b.colour} {b.shape}")
    parts = [f"a {o.colour} {o.shape}" for o in objs]
    cands.append(f"{NUMBER_WORDS[len(objs)]} shapes: " + ", ".join(parts[:-1]) + f" and {parts[-1]}")
    cands.append(f"a picture of {NUMBER_WORDS[len(objs)]} objects")
    cands = list(dict.fromkeys(cands))
    pick = rng.permutation(len(cands))[:k]
    return [cands[i] for i in sorted(pick)]


def _answer_variant(rng: np.random.Generator, ans: str) -> str:
    """Surface forms an annotator might type; normalize_answer maps them all back to ``ans``."""
    if ans.isdigit():
        return NUMBER_WORDS[int(ans)] if rng.random() < 0.5 else ans
    r = rng.random()
    if ans in ("yes", "no"):
        return ans if r < 0.6 else (ans.capitalize() if r < 0.8 else ans + ".")
    if ans in SHAPES and r < 0.2:
        return "a " + ans
    return ans if r < 0.7 else (ans.capitalize() if r < 0.9 else ans + ".")


ANSWER_TYPES = {"color": list(COLOURS), "shape": list(SHAPES), "number": ["0", "1", "2", "3", "4"],
                "yes/no": ["yes", "no"], "size": list(SIZES)}
# Our question types as VQA v2's official answer types (which have no colour / shape / size).
OFFICIAL_ANSWER_TYPE = {"yes/no": "yes/no", "number": "number", "color": "other", "shape": "other", "size": "other"}


def vqa_candidates(rng: np.random.Generator, s: Scene) -> list[tuple[str, str, str]]:
    """All (question, canonical answer, answer type) facts askable about the scene."""
    objs = s.objs
    shape_count = {sh: sum(o.shape == sh for o in objs) for sh in SHAPES}
    colour_count = {c: sum(o.colour == c for o in objs) for c in COLOURS}
    out = []
    for o in objs:
        if shape_count[o.shape] == 1:
            out.append((f"what color is the {o.shape}?", o.colour, "color"))
        if colour_count[o.colour] == 1:
            out.append((f"what shape is the {o.colour} object?", o.shape, "shape"))
        out.append((f"what size is the {o.colour} {o.shape}?", o.size, "size"))
        left = [p for p in objs if p.cx < o.cx - 2]
        if len(left) == 1:
            out.append((f"what shape is left of the {o.colour} {o.shape}?", left[0].shape, "shape"))
    sh = SHAPES[int(rng.integers(0, 4))]
    out.append((f"how many {PLURALS[sh]} are there?", str(shape_count[sh]), "number"))
    present = objs[int(rng.integers(0, len(objs)))]
    out.append(("how many objects are there?", str(len(objs)), "number"))
    if rng.random() < 0.5:
        out.append((f"is there a {present.colour} {present.shape}?", "yes", "yes/no"))
    else:
        absent = [(c, h) for h in SHAPES for c in COLOURS if not any(o.colour == c and o.shape == h for o in objs)]
        c, h = absent[int(rng.integers(0, len(absent)))]
        out.append((f"is there a {c} {h}?", "no", "yes/no"))
    return out


def make_vqa(rng: np.random.Generator, s: Scene, k: int, noise: float) -> list[tuple[str, list[str], str]]:
    """``k`` (question, 10 annotator answers, official answer type) items about the scene."""
    cands = vqa_candidates(rng, s)
    pick = sorted(rng.permutation(len(cands))[:k])
    items = []
    for i in pick:
        q, ans, typ = cands[i]
        answers = []
        for _ in range(10):
            a = ans
            if rng.random() < noise:
                wrong = [x for x in ANSWER_TYPES[typ] if x != ans]
                a = wrong[int(rng.integers(0, len(wrong)))]
            answers.append(_answer_variant(rng, a))
        items.append((q, answers, OFFICIAL_ANSWER_TYPE[typ]))
    return items


def ref_expressions(s: Scene, i: int) -> list[str]:
    """Unambiguous referring expressions for object i."""
    o, objs = s.objs[i], s.objs
    same_shape = [p for p in objs if p.shape == o.shape]
    out = [f"the {o.colour} {o.shape}", f"the {o.size} {o.colour} {o.shape}"]
    if len(same_shape) == 1:
        out.append(f"the {o.shape}")
    if sum(p.colour == o.colour for p in objs) == 1:
        out.append(f"the {o.colour} object")
    if sum(p.size == o.size and p.shape == o.shape for p in objs) == 1:
        out.append(f"the {o.size} {o.shape}")
    if len(same_shape) == 2:
        other = same_shape[0] if same_shape[1] is o else same_shape[1]
        if abs(other.cx - o.cx) > 2:
            side = "left" if o.cx < other.cx else "right"
            out += [f"the {o.shape} on the {side}", f"the {o.size} {o.shape} on the {side}"]
    xs = sorted(p.cx for p in objs)
    if o.cx == xs[0] and xs[1] - xs[0] > 2:
        out.append("the leftmost object")
    if o.cx == xs[-1] and xs[-1] - xs[-2] > 2:
        out.append("the rightmost object")
    return out


def make_refs(rng: np.random.Generator, s: Scene, k: int, size: int) -> list[tuple[str, int, np.ndarray]]:
    items = []
    for oi in sorted(rng.permutation(len(s.objs))[:k]):
        exprs = ref_expressions(s, oi)
        expr = exprs[int(rng.integers(0, len(exprs)))]
        region = s.region_obj.index(oi)
        box = np.clip(np.array(s.objs[oi].box, np.float32) / size, 0, 1).astype(np.float32)
        items.append((expr, region, box))
    return items


def make_mc(rng: np.random.Generator, s: Scene, k: int) -> list[tuple[str, list[str], int]]:
    objs = s.objs
    shape_count = {sh: sum(o.shape == sh for o in objs) for sh in SHAPES}
    colour_count = {c: sum(o.colour == c for o in objs) for c in COLOURS}
    cands = []
    for o in objs:
        if shape_count[o.shape] == 1:
            cands.append((f"what color is the {o.shape}?", [f"it is {c}" for c in COLOURS], f"it is {o.colour}"))
        if colour_count[o.colour] == 1:
            cands.append((f"what shape is the {o.colour} object?", [f"it is a {h}" for h in SHAPES],
                          f"it is a {o.shape}"))
    n = len(objs)
    others = [x for x in range(1, 7) if x != n]
    nums = [n] + [others[j] for j in rng.permutation(len(others))[:3]]
    cands.append(("how many objects are in the picture?", [f"there are {x}" for x in nums], f"there are {n}"))
    leftmost = min(objs, key=lambda p: p.cx)
    if sorted(p.cx for p in objs)[1] - leftmost.cx > 2:
        names = [f"the {p.colour} {p.shape}" for p in objs]
        absent = [f"the {c} {h}" for h in SHAPES for c in COLOURS if f"the {c} {h}" not in names]
        wrong = [x for x in names if x != f"the {leftmost.colour} {leftmost.shape}"]
        wrong += [absent[j] for j in rng.permutation(len(absent))]
        cands.append(("which object is on the far left?", [f"the {leftmost.colour} {leftmost.shape}"] + wrong[:3],
                      f"the {leftmost.colour} {leftmost.shape}"))
    items = []
    for ci in sorted(rng.permutation(len(cands))[:k]):
        q, choices, correct = cands[ci]
        choices = [choices[j] for j in rng.permutation(len(choices))]
        items.append((q, choices, choices.index(correct)))
    return items


def make_text_doc(rng: np.random.Generator) -> str:
    facts = [
        lambda: "a circle is round and has no corners.",
        lambda: "a square has four equal sides and four corners.",
        lambda: "a triangle has three sides and three corners.",
        lambda: "a cross is made of two bars that meet in the middle.",
        lambda: f"{PLURALS[SHAPES[int(rng.integers(0, 4))]]} can be {COLOURS[int(rng.integers(0, 4))]}.",
        lambda: "the sky is blue and the grass is green.",
        lambda: "bananas and lemons are yellow, and cherries are red.",
        lambda: "a large shape is bigger than a small one.",
        lambda: (lambda a, b: f"{NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]} is {NUMBER_WORDS[a + b]}.")(
            int(rng.integers(0, 5)), int(rng.integers(0, 5))),
        lambda: (lambda n, c, h: f"there {'is' if n == 1 else 'are'} {NUMBER_WORDS[n]} {c} "
                                 f"{h if n == 1 else PLURALS[h]} in the box.")(
            int(rng.integers(1, 5)), COLOURS[int(rng.integers(0, 4))], SHAPES[int(rng.integers(0, 4))]),
        lambda: f"the {COLOURS[int(rng.integers(0, 4))]} {SHAPES[int(rng.integers(0, 4))]} is "
                f"{['left of', 'right of', 'above', 'below'][int(rng.integers(0, 4))]} the "
                f"{COLOURS[int(rng.integers(0, 4))]} {SHAPES[int(rng.integers(0, 4))]}.",
    ]
    n = int(rng.integers(3, 9))
    return " ".join(facts[int(rng.integers(0, len(facts)))]() for _ in range(n))


# ---------------------------------------------------------------- writing

def write_split(args: argparse.Namespace, split: str, n_images: int, net: FeatureNet) -> dict[str, int]:
    size = args.image_size
    counts = {}
    source = {"tool": "make_synthetic", "seed": args.seed, "split": split, "image_size": size,
              "num_images": n_images}
    extra = {"source": source, "class_names": CLASS_NAMES}
    with contextlib.ExitStack() as stack:
        writers = {}
        for kind in ("captions", "vqa", "refs", "mc"):
            optional = OPTIONAL + KIND_OPTIONAL.get(kind, ())
            meta = schema.make_meta(kind, args.feature_dim, NUM_CLASSES, optional, **extra)
            if kind == "vqa":
                meta.update(answer_vocab_file=schema.ANSWER_VOCAB_FILE, answer_vocab_size=len(ANSWER_VOCAB))
            w = stack.enter_context(open_writer(join_location(args.out, kind, split), kind, optional, meta,
                                                size_limit=args.size_limit, overwrite=args.overwrite))
            if kind == "vqa":
                w.add_json(schema.ANSWER_VOCAB_FILE, ANSWER_VOCAB)
            writers[kind] = w
        from vltrain.metrics.vqa import answer_scores
        vocab_index = {a: i for i, a in enumerate(ANSWER_VOCAB)}
        for start in range(0, n_images, CHUNK):
            idx = list(range(start, min(n_images, start + CHUNK)))
            rngs = [np.random.default_rng([args.seed, SPLIT_CODE[split], i]) for i in idx]
            scenes = [make_scene(r, size) for r in rngs]
            full = np.array([[0, 0, size, size]], np.float32)
            feats = net(np.stack([s.pixels for s in scenes]),
                        [np.concatenate([s.regions, full]) for s in scenes])
            for i, rng, s, f in zip(idx, rngs, scenes, feats):
                cls_prob, labels, conf = detector_outputs(rng, s)
                image = {
                    "image_id": f"syn-{split}-{i:06d}", "image_w": size, "image_h": size,
                    "features": f[:-1].astype(np.float16),
                    "boxes": np.clip(s.regions / size, 0, 1).astype(np.float32),
                    "cls_prob": cls_prob, "obj_labels": labels, "obj_conf": conf,
                    "image_feature": f[-1].astype(np.float16),
                }
                w = writers["captions"]
                w.write({"sample_id": w.count, **image, "captions": make_captions(rng, s)})
                w = writers["vqa"]
                for q, answers, answer_type in make_vqa(rng, s, args.questions_per_image, args.answer_noise):
                    sc = sorted((vocab_index[a], v) for a, v in answer_scores(answers).items())
                    w.write({"sample_id": w.count, **image, "question_id": w.count, "question": q,
                             "answers": answers, "answer_type": answer_type,
                             "target_ids": np.array([t[0] for t in sc], np.int32),
                             "target_scores": np.array([t[1] for t in sc], np.float32)})
                w = writers["refs"]
                for expr, region, box in make_refs(rng, s, args.refs_per_image, size):
                    w.write({"sample_id": w.count, **image, "expression": expr, "target_region": region,
                             "target_box": box})
                w = writers["mc"]
                for q, choices, label in make_mc(rng, s, args.mc_per_image):
                    w.write({"sample_id": w.count, **image, "question": q, "choices": choices, "label": label})
        for kind, w in writers.items():
            counts[f"{kind}/{split}"] = w.count
    return counts


def write_text(args: argparse.Namespace) -> dict[str, int]:
    meta = schema.make_meta("text", None, None, (), source={"tool": "make_synthetic", "seed": args.seed})
    with open_writer(join_location(args.out, "text", "train"), "text", (), meta,
                     size_limit=args.size_limit, overwrite=args.overwrite) as w:
        for j in range(args.text_docs):
            rng = np.random.default_rng([args.seed, TEXT_CODE, j])
            w.write({"sample_id": j, "text": make_text_doc(rng)})
    return {"text/train": w.count}


def generate(args: argparse.Namespace) -> None:
    import torch
    if args.feature_dim <= 0 or args.image_size < 32:
        raise BadInputError("--feature-dim must be positive and --image-size at least 32")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)       # one thread: bit-identical conv outputs run to run
    t0 = time.time()
    try:
        net = FeatureNet(args.feature_dim)
        counts: dict[str, int] = {}
        sizes = {"pretrain": args.images_pretrain, "train": args.images_train,
                 "val": args.images_val, "test": args.images_test}
        for split in SPLITS:
            if sizes[split] > 0:
                counts.update(write_split(args, split, sizes[split], net))
                print(f"{split}: {sizes[split]} images -> " +
                      ", ".join(f"{k.split('/')[0]} {v}" for k, v in counts.items() if k.endswith('/' + split)))
        if args.text_docs > 0:
            counts.update(write_text(args))
            print(f"text/train: {args.text_docs} documents")
    finally:
        torch.set_num_threads(threads)
    info = {"tool": "make_synthetic", "seed": args.seed, "image_size": args.image_size,
            "feature_dim": args.feature_dim, "num_classes": NUM_CLASSES, "class_names": CLASS_NAMES,
            "answer_vocab": ANSWER_VOCAB, "images": sizes, "datasets": counts}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "synthetic_corpus.json")
        with open(path, "w") as f:
            json.dump(info, f, indent=1, sort_keys=True)
        upload_file(path, join_location(args.out, "synthetic_corpus.json"))
    print(f"wrote {len(counts)} datasets to {args.out} in {time.time() - t0:.1f}s")


def build_parser() -> argparse.ArgumentParser:
    p = RedactingArgumentParser(prog="make_synthetic.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="corpus seed (default %(default)s)")
    p.add_argument("--images-pretrain", type=int, default=2000, help="default %(default)s")
    p.add_argument("--images-train", type=int, default=1000, help="default %(default)s")
    p.add_argument("--images-val", type=int, default=200, help="default %(default)s")
    p.add_argument("--images-test", type=int, default=200, help="default %(default)s")
    p.add_argument("--text-docs", type=int, default=500, help="text-only documents (default %(default)s)")
    p.add_argument("--image-size", type=int, default=64, help="rendered image side in pixels (default %(default)s)")
    p.add_argument("--feature-dim", type=int, default=64, help="region feature dimension (default %(default)s)")
    p.add_argument("--questions-per-image", type=int, default=4, help="default %(default)s")
    p.add_argument("--refs-per-image", type=int, default=2, help="default %(default)s")
    p.add_argument("--mc-per-image", type=int, default=1, help="default %(default)s")
    p.add_argument("--answer-noise", type=float, default=0.1,
                   help="probability that an annotator answers wrongly (default %(default)s)")
    add_output_args(p, skip_bad=False)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_main(generate, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
