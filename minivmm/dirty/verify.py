"""Truth checks for dirty tracking: what the guest really wrote, and what it planned to.

Not a kernel interface: these are the two oracles the kernel's own
tools/testing/selftests/kvm/dirty_log_test.c uses in spirit. The content oracle:
the payload writes the iteration number into each page it dirties, so every page
whose first u64 changed since the previous collection must have been reported
(a miss is a kernel or VMM bug). The plan oracle: the shipped dirty payloads are
deterministic, so the pages each vCPU writes in each iteration follow from the
payload's parameters (plan() below; README, "Dirty pages: ring vs bitmap").
"""
from __future__ import annotations

import ctypes

import functools

import numpy as np

PAGE_WORDS = 4096 // 8

LCG_MUL = 6364136223846793005
LCG_ADD = 1442695040888963407
MASK64 = (1 << 64) - 1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def resident_pages(addr: int, pages: int) -> np.ndarray:
    """Indices of the pages of [addr, addr + pages*4096) that are in memory (mincore(2)).

    A page never touched is not resident and still reads as zero; not reading it keeps
    the shared zero page out of the guest's way (a later first write would then need a
    copy-on-write fault instead of a plain one).
    """
    vec = np.zeros(pages, np.uint8)
    if _libc.mincore(addr, pages * 4096, vec.ctypes.data) != 0:
        raise OSError(ctypes.get_errno(), "mincore failed")
    return np.flatnonzero(vec & 1)


class ContentOracle:
    """Remembers the first u64 of every data page at the previous collection.

    A fresh anonymous slot is all zero, so nothing is read up front; each snapshot reads
    only the resident pages (the guest wrote there, or something read them).
    """

    def __init__(self, mem, pages: int):
        self.mem, self.pages = mem, pages
        self.prev = np.zeros(pages, np.uint64)   # calloc'd: costs only what is written
        self.scope = "every resident page (the others still hold zero)"

    def snapshot(self) -> tuple:
        """(page indices, first u64 of each): take it while the vCPUs are paused."""
        idx = resident_pages(self.mem.host_addr, self.pages)
        view = np.frombuffer(self.mem.map, dtype="<u8", count=self.pages * PAGE_WORDS)
        try:
            return idx, view[idx * PAGE_WORDS]
        finally:
            del view

    def compare(self, snap: tuple, reported: np.ndarray) -> dict:
        """Changed pages since the previous compare; which of them were missed; extras."""
        idx, values = snap
        reported = np.asarray(reported, np.int64)
        changed = idx[values != self.prev[idx]].astype(np.int64)
        self.prev[idx] = values
        missed = np.setdiff1d(changed, reported, assume_unique=True)
        extra = np.setdiff1d(reported, changed, assume_unique=True)
        return {"changed": changed, "missed": missed, "extra": extra, "scope": self.scope}

    def check(self, reported: np.ndarray) -> dict:
        """snapshot() and compare() in one go (when nothing runs concurrently)."""
        return self.compare(self.snapshot(), reported)


PLANNED = ("dirty_seq", "dirty_stride", "dirty_random")


def has_plan(payload) -> bool:
    """Whether plan() describes ``payload``: it is keyed by name, so only a payload whose
    code is the shipped payload's of that name (a user's file called dirty_seq.asm that
    writes other pages is not described by it, and would be "missing" pages it never
    wrote)."""
    if payload.name not in PLANNED:
        return False
    from ..payload import PayloadError, load, payload_dir
    try:
        shipped = load(str(payload_dir() / f"{payload.name}.asm"))
    except PayloadError:
        return False
    return (shipped.code, shipped.mode, shipped.cpl) == (payload.code, payload.mode, payload.cpl)


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
            rel = lcg_page_set(params.get("seed", 0) + i, share, params.get("writes", 0),
                               iteration)
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
    steps_a, steps_c = _lcg_steps(min(writes, _LCG_CHUNK))
    out = np.empty(writes, np.int64)
    for start in range(0, writes, _LCG_CHUNK):
        n = min(_LCG_CHUNK, writes - start)
        # x_k = A_k x + C_k for a chunk at once (uint64 arithmetic wraps mod 2**64)
        xs = steps_a[:n] * np.uint64(x) + steps_c[:n]
        out[start:start + n] = (xs >> np.uint64(33)) % np.uint64(share)
        x = int(xs[-1])
    return out


_LCG_CHUNK = 1 << 20      # steps kept: 16 MiB


def lcg_page_set(seed: int, share: int, writes: int, iteration: int) -> np.ndarray:
    """np.unique(lcg_pages(...)) in memory of the share and a chunk, not of ``writes``:
    --writes may be 2**32-1 (32 GiB of page numbers, which the guest writes in seconds).
    Stops once every page of the share was hit: later writes change nothing."""
    if share == 0 or writes == 0:
        return np.empty(0, np.int64)
    a, c = _lcg_power((iteration - 1) * writes)
    x = (a * (seed & MASK64) + c) & MASK64
    steps_a, steps_c = _lcg_steps(min(writes, _LCG_CHUNK))
    seen = np.zeros(share, bool)
    for start in range(0, writes, _LCG_CHUNK):
        n = min(_LCG_CHUNK, writes - start)
        xs = steps_a[:n] * np.uint64(x) + steps_c[:n]
        seen[((xs >> np.uint64(33)) % np.uint64(share)).astype(np.int64)] = True
        x = int(xs[-1])
        if seen.all():
            break
    return np.flatnonzero(seen).astype(np.int64)


@functools.lru_cache(maxsize=2)
def _lcg_steps(n: int) -> tuple:
    """(A_k, C_k) for k = 1..n, with x_k = A_k x_0 + C_k: built by doubling, since
    x_{m+j} = A_j x_m + C_j. A million writes take milliseconds, not the second a
    Python loop over them took (which let --writes outlast --timeout)."""
    a, c = np.empty(n, np.uint64), np.empty(n, np.uint64)
    a[0], c[0] = LCG_MUL, LCG_ADD
    m = 1
    while m < n:
        k = min(m, n - m)
        a[m:m + k] = a[:k] * a[m - 1]
        c[m:m + k] = a[:k] * c[m - 1] + c[:k]
        m += k
    a.flags.writeable = c.flags.writeable = False
    return a, c


def _lcg_power(k: int) -> tuple:
    a, c = 1, 0                   # identity
    ma, mc = LCG_MUL, LCG_ADD     # one step
    while k:
        if k & 1:
            a, c = (ma * a) & MASK64, (ma * c + mc) & MASK64
        ma, mc = (ma * ma) & MASK64, (ma * mc + mc) & MASK64
        k >>= 1
    return a, c
