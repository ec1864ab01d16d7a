import gzip
import os
import sys

import numpy as np
import pytest
from hypothesis import settings

sys.path.insert(0, os.path.dirname(__file__))

# The fuzz tests of test_reliability.py draw as many examples as the profile says: "ci" (the default) keeps
# the suite fast; PRECOND_FUZZ=long (make fuzz) is the longer run by hand.
settings.register_profile("ci", max_examples=12, deadline=None)
settings.register_profile("long", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("PRECOND_FUZZ", "ci"))


@pytest.fixture()
def data_dir(tmp_path):
    """A prepared data folder built from synthetic documents (the real corpus needs Debian's package), for the
    benchmark harness's tests."""
    from bench_fakes import CORPUS
    from precond_bench import data

    train, val = data.split_documents(CORPUS)
    (tmp_path / "pydocs").mkdir()
    (tmp_path / "pydocs" / "train.bin").write_bytes(train)
    (tmp_path / "pydocs" / "val.bin").write_bytes(val)
    rng = np.random.default_rng(0)
    rows = np.concatenate([rng.integers(0, 17, (1797, 64)), rng.integers(0, 10, (1797, 1))], axis=1)
    (tmp_path / "digits").mkdir()
    (tmp_path / "digits" / "digits.csv.gz").write_bytes(
        gzip.compress("\n".join(",".join(str(v) for v in r) for r in rows).encode()))
    return tmp_path
