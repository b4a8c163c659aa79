"""Batch sizing for the teacher workers: pure arithmetic (the Ray executor itself runs in
tests/integration/test_generate.py)."""

import math

import pytest

from distill.core.executor import balanced_batch_size


@pytest.mark.parametrize("n,batch,workers", [(40, 8, 2), (136, 16, 2), (100, 7, 3), (3, 16, 2), (1, 16, 4)])
def test_batches_split_evenly_over_workers(n, batch, workers):
    size = balanced_batch_size(n, batch, workers)
    batches = math.ceil(n / size)
    assert 1 <= size <= batch
    assert batches % workers == 0 or batches < workers  # no round with idle workers but the last partial one
