"""2-rank worker: every sample of some micro-batches of ONE rank is bad (data.skip_bad_samples).

Fault injection (not a mock): the real trainer and loader run; rank 1's DataLoader worker
puts a NaN into every sample of its first two micro-batches of each epoch before the real
collator sees them, which then skips them all: in the first epoch no good batch has been
seen yet (the next one stands in, as after a resume), in the second the previous epoch's
last does. Usage: python tests/workers/bad_batch.py OUT_ROOT TRAIN CACHE
"""
import os
import sys

import numpy as np

from vltrain.data.collate import PretrainCollator

_real_call = PretrainCollator.__call__
_calls = {"n": 0}


def _call(self, samples):
    _calls["n"] += 1                       # in a DataLoader worker: its batches in order
    if int(os.environ["RANK"]) == 1 and _calls["n"] in (1, 2):
        for s in samples:
            s["features"] = np.array(s["features"], dtype=np.float32)
            s["features"][0, 0] = np.nan
    return _real_call(self, samples)


# At import, not in main(): the DataLoader workers (started by a forkserver, not forked from
# this rank) import this script as ``__mp_main__``, which patches the collator in them.
PretrainCollator.__call__ = _call


def main(out_root, train, cache):
    from vltrain import run
    code = run.main(["--config", "configs/debug.yaml", "--deepspeed_config", "ds_configs/zero2.json",
                     f"output_root={out_root}", "run_name=bad_batch", f"data.train={train}", "data.val=",
                     f"data.cache_dir={cache}", "train.max_steps=20", "train.log_every=1",
                     "data.skip_bad_samples=true", "train.dist_timeout_s=60",
                     # every synthetic caption is longer than 3 words and every image has >= 2
                     # regions: the truncation shares are exactly 1 (0.5 if one rank's count were lost)
                     "data.max_text_len=6", "data.max_regions=1"])
    sys.exit(code)


if __name__ == "__main__":
    main(*sys.argv[1:])
