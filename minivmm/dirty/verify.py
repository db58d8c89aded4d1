"""Truth checks for dirty tracking: what the guest really wrote, and what it planned to.

Not a kernel interface: these are the two oracles the kernel's own
tools/testing/selftests/kvm/dirty_log_test.c uses in spirit. The content oracle:
the payload writes the iteration number into each page it dirties, so every page
whose first u64 changed since the previous collection must have been reported
(a miss is a kernel or VMM bug). The plan oracle: the shipped dirty payloads are
deterministic, so the pages each vCPU writes in each iteration follow from the
payload's parameters (README, "Dirty payloads").
"""
from __future__ import annotations

import numpy as np

PAGE_WORDS = 4096 // 8
# Above this many pages the content check reads only reported and planned pages:
# reading every page of a huge sparse slot would fault in its whole page table.
FULL_SCAN_PAGES = 1 << 18

LCG_MUL = 6364136223846793005
LCG_ADD = 1442695040888963407
MASK64 = (1 << 64) - 1


class ContentOracle:
    """Remembers the first u64 of every data page at the previous collection."""

    def __init__(self, data_map, pages: int):
        self.map, self.pages = data_map, pages
        self.full = pages <= FULL_SCAN_PAGES
        self.prev = self._read(None) if self.full else {}

    def _read(self, idx):
        view = np.frombuffer(self.map, dtype="<u8", count=self.pages * PAGE_WORDS)
        try:
            first = view[::PAGE_WORDS]
            return first.copy() if idx is None else first[idx]
        finally:
            del view

    def check(self, reported: np.ndarray, expected: np.ndarray | None = None) -> dict:
        """Compare against the previous call; return changed, missed and extra pages."""
        reported = np.asarray(reported, np.int64)
        if self.full:
            cur = self._read(None)
            changed = np.flatnonzero(cur != self.prev)
            self.prev = cur
        else:
            cand = reported if expected is None else np.union1d(reported, expected)
            cand = cand.astype(np.int64)
            values = self._read(cand)
            old = np.array([self.prev.get(int(p), 0) for p in cand], np.uint64)
            changed = cand[values != old]
            self.prev.update(zip(cand.tolist(), values.tolist()))
        missed = np.setdiff1d(changed, reported, assume_unique=True)
        extra = np.setdiff1d(reported, changed, assume_unique=True)
        return {"changed": changed, "missed": missed, "extra": extra,
                "scope": "every page" if self.full else "reported and planned pages"}


def plan(payload: str, vcpus: int, pages: int, iteration: int, params: dict) -> dict | None:
    """{vCPU index: data-slot page indices it writes in ``iteration``} for the shipped dirty
    payloads, or None for a payload without a known plan."""
    share = pages // vcpus
    out = {}
    for i in range(vcpus):
        base = i * share
        if payload == "dirty_seq":
            rel = np.arange(share)
        elif payload == "dirty_stride":
            rel = np.arange(0, share, max(1, params.get("stride", 1)))
        elif payload == "dirty_random":
            rel = np.unique(lcg_pages(params.get("seed", 0) + i, share,
                                      params.get("writes", 0), iteration))
        else:
            return None
        out[i] = (rel + base).astype(np.int64)
    return out


def lcg_pages(seed: int, share: int, writes: int, iteration: int) -> np.ndarray:
    """Replays dirty_random.asm's generator: the pages written in ``iteration`` (1-based)."""
    if share == 0 or writes == 0:
        return np.empty(0, np.int64)
    x = seed & MASK64
    skip = (iteration - 1) * writes
    # jump ahead: x_{n+k} = A^k x_n + C (A^{k-1} + ... + 1), computed by squaring
    a, c = _lcg_power(skip)
    x = (a * x + c) & MASK64
    out = np.empty(writes, np.int64)
    for k in range(writes):
        x = (x * LCG_MUL + LCG_ADD) & MASK64
        out[k] = (x >> 33) % share
    return out


def _lcg_power(k: int) -> tuple:
    a, c = 1, 0                   # identity
    ma, mc = LCG_MUL, LCG_ADD     # one step
    while k:
        if k & 1:
            a, c = (ma * a) & MASK64, (ma * c + mc) & MASK64
        ma, mc = (ma * ma) & MASK64, (ma * mc + mc) & MASK64
        k >>= 1
    return a, c
