"""PageSet: the three forms a collection may keep give the same sorted pages and counts."""
import numpy as np
import pytest

from minivmm.dirty import pageset as P
from minivmm.dirty.bitmap import encode, popcount


@pytest.mark.parametrize("seed", range(30))
def test_every_form_gives_the_same_pages(seed):
    rng = np.random.default_rng(seed)
    npages = int(rng.integers(1, 5000))
    pages = np.unique(rng.integers(0, npages, int(rng.integers(0, npages + 1))))
    seen = np.zeros(npages, bool)
    seen[pages] = True
    words = encode(pages.astype(np.uint64), npages)
    forms = [P.PageSet.from_indices(pages, npages),
             P.PageSet("map", seen, npages, int(seen.sum())),
             P.PageSet("bitmap", words, npages, popcount(words))]
    for f in forms:
        assert len(f) == len(pages)
        got = f.indices()
        assert got.dtype == np.int64 and got.tolist() == pages.tolist()
        assert f.indices() is got                      # made once


@pytest.mark.parametrize("seed", range(20))
def test_popcount_counts_set_bits_of_any_buffer(seed):
    import ctypes
    rng = np.random.default_rng(seed)
    words = rng.integers(0, 2**63, int(rng.integers(0, 300)), dtype=np.uint64) << np.uint64(1)
    words |= rng.integers(0, 2, len(words), dtype=np.uint64)
    want = int(np.unpackbits(words.view(np.uint8)).sum())
    assert popcount(words) == want
    assert popcount((ctypes.c_uint64 * len(words))(*words.tolist())) == want


def test_unknown_kind():
    with pytest.raises(ValueError, match="kind"):
        P.PageSet("list", np.zeros(1), 1, 0)
