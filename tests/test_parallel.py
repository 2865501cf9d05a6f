"""fork_map: results in job order, equal to the serial map, closures over large data, errors raised."""

import numpy as np
import pytest

from vggt_sfm.parallel import fork_map


def test_forked_results_equal_the_serial_map_in_order():
    data = np.random.default_rng(0).normal(size=(2000, 500))  # inherited by the workers, never pickled

    def row_norm(k: int) -> float:
        return float(np.linalg.norm(data[k]))

    jobs = list(range(0, 2000, 7))
    serial = list(fork_map(row_norm, jobs, workers=1))
    forked = list(fork_map(row_norm, jobs, workers=2, chunksize=3))
    assert forked == serial == [float(np.linalg.norm(data[k])) for k in jobs]


def test_an_error_in_a_worker_reaches_the_caller():
    def fails_on_five(k: int) -> int:
        if k == 5:
            raise ValueError("job five")
        return k

    with pytest.raises(ValueError, match="job five"):
        list(fork_map(fails_on_five, range(10), workers=2))
