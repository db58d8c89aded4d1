"""PageSet: the three forms a collection may keep give the same sorted pages and counts."""
import numpy as np
import pytest

from minivmm.dirty import pageset as P
from minivmm.dirty.bitmap import encode


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
             P.PageSet("bitmap", words, npages, P.popcount(words))]
    for f in forms:
        assert len(f) == len(pages)
        got = f.indices()
        assert got.dtype == np.int64 and got.tolist() == pages.tolist()
        assert f.indices() is got                      # made once


def test_popcount_without_bitwise_count(monkeypatch):
    words = np.array([0, 1, 3, np.iinfo(np.uint64).max], np.uint64)
    want = 0 + 1 + 2 + 64
    assert P.popcount(words) == want
    monkeypatch.delattr(np, "bitwise_count", raising=False)   # numpy < 2
    assert P.popcount(words) == want


def test_unknown_kind():
    with pytest.raises(ValueError, match="kind"):
        P.PageSet("list", np.zeros(1), 1, 0)
