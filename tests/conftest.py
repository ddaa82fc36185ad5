import os
import pathlib

# One intra-op thread for the suite and the processes it starts: on a shared 2-core machine torch's
# OpenMP threads spin against other jobs and small kernels run 10x slower; results do not depend on it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    return FIXTURES
