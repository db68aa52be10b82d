"""Shared fixtures. Each area keeps its fixtures in tests/fixtures/<area>.py; import them here."""
import os

# One thread per process: the CI machine has 2 cores and multi-rank tests start 2 processes.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

torch.set_num_threads(1)

from tests.fixtures.assets import *  # noqa: E402,F401,F403
from tests.fixtures.s3 import *  # noqa: E402,F401,F403
from tests.fixtures.slurm import *  # noqa: E402,F401,F403
from tests.fixtures.mds import *  # noqa: E402,F401,F403
from tests.fixtures.corpus import *  # noqa: E402,F401,F403
