"""One slot's collected page set, kept in the form the collection produced it.

Mirrors nothing in the kernel by itself: it holds what KVM reported through either
interface, a page map filled from ring entries (``struct kvm_dirty_gfn``,
Documentation/virt/kvm/api.rst 7.36) or the words of a dirty bitmap (api.rst 4.8, bit i
of the little-endian u64 words = page i of the slot). Turning it into sorted page
indices is work for whoever reads it, done once on first use: a collection itself only
marks and counts, as the native baseline does.
"""
from __future__ import annotations

import numpy as np

from .bitmap import decode


class PageSet:
    """``count`` distinct pages of one slot; ``indices()`` gives them sorted (int64)."""
    __slots__ = ("kind", "data", "npages", "count", "_indices")

    def __init__(self, kind: str, data, npages: int, count: int):
        """``data``: int64 indices, or any contiguous buffer: a byte per page ("map") or
        little-endian u64 bitmap words ("bitmap")."""
        if kind not in ("indices", "map", "bitmap"):
            raise ValueError(f"unknown page set kind {kind!r}")
        self.kind, self.data, self.npages, self.count = kind, data, npages, count
        self._indices = data if kind == "indices" else None

    @classmethod
    def from_indices(cls, pages, npages: int) -> "PageSet":
        pages = np.asarray(pages, dtype=np.int64)
        return cls("indices", pages, npages, len(pages))

    def indices(self) -> np.ndarray:
        if self._indices is None:
            if self.kind == "map":             # a byte per page (bool array or bytes)
                self._indices = np.flatnonzero(np.frombuffer(self.data, np.uint8))
            else:                               # bitmap words
                words = np.frombuffer(self.data, np.uint64)
                self._indices = decode(words, self.npages).astype(np.int64)
            self.data = None                    # the indices say it all now
        return self._indices

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return f"PageSet({self.count} of {self.npages} pages, from a {self.kind})"

