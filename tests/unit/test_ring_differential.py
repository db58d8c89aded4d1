"""RingTracker's fast path (dirty_count, take, Stage, PageSets, ring-full guesses, resets)
against the plain Python oracle of tests/fuzz_ring.py, over a model of the kernel's half
of the ring: a few seeded worlds of the fuzzer, so CI runs the whole string of it. The
fuzzer itself runs as many as asked: `.venv/bin/python tests/fuzz_ring.py 20000`."""
import random

import pytest

from tests.fuzz_ring import dedupe_case, harvest_case, run_world


@pytest.mark.parametrize("seed", range(0, 6000, 50))
def test_fast_path_equals_the_oracle(seed):
    # every step is checked inside (fuzz_ring.Mismatch names the first difference)
    assert run_world(seed) >= 1


@pytest.mark.parametrize("seed", range(100))
def test_harvest_and_page_sets_equal_the_oracle(seed):
    rnd = random.Random(seed ^ 0x5EED)
    harvest_case(rnd)
    dedupe_case(rnd)
