"""2-rank worker: non-finite losses on ONE rank make every rank skip the same micro-batches.

Fault injection (not a mock): the real trainer runs; only rank 1's task returns NaN for
chosen optimizer steps. Usage: python tests/workers/nonfinite.py MODE OUT_ROOT TRAIN CACHE
MODE=transient: NaN on rank 1 at steps 3 and 7 (one micro-batch each) -> training finishes.
MODE=persistent: NaN on rank 1 from step 4 on -> abort after train.max_nonfinite_in_row.
"""
import os
import sys


def main(mode, out_root, train, cache):
    from vltrain.tasks.pretrain import PretrainTask
    from vltrain import run

    real_forward = PretrainTask.forward
    rank = int(os.environ["RANK"])
    calls = {"n": 0}

    def forward(self, batch):
        loss, metrics = real_forward(self, batch)
        calls["n"] += 1                       # micro-batches seen (skipped ones included)
        bad = calls["n"] in (3, 7) if mode == "transient" else calls["n"] >= 4
        if rank == 1 and bad and self.training:
            loss = loss * float("nan")
        return loss, metrics

    PretrainTask.forward = forward
    code = run.main(["--config", "configs/debug.yaml", "--deepspeed_config", "ds_configs/zero1.json",
                     f"output_root={out_root}", f"run_name={mode}", f"data.train={train}", "data.val=",
                     f"data.cache_dir={cache}", "train.max_steps=10", "train.log_every=1",
                     "train.max_nonfinite_in_row=3", "train.dist_timeout_s=30"])
    sys.exit(code)


if __name__ == "__main__":
    main(*sys.argv[1:])
