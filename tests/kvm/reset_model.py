"""KVM_RESET_DIRTY_RINGS as kernels that a signal stops part-way, for the tests of
ring.reset.signal_rearms: this host's 6.18 can show only its own (buggy) behaviour, and a
kernel before v6.17 or a fixed one is not at hand.

A modelled call is a real reset with signals held back (the host never cuts it), stopped
where planned: kvm_dirty_ring_reset() (virt/kvm/dirty_ring.c) stops at the first entry
without KVM_DIRTY_GFN_F_RESET, so that entry is made to look not yet harvested for the length
of the call. The bug of 49005a2a3d2a (the batch being coalesced is never reset on -EINTR) is
modelled by pointing that batch's entries at a slot that does not exist: the kernel counts
and invalidates them but re-protects nothing (kvm_reset_dirty_gfn() returns early).
"""
import contextlib
import struct

import numpy as np

from minivmm import vm as vmmod

DIRTY, RESET = 1, 2
NO_SUCH_SLOT = 999


def pending_batch(walked) -> int:
    """Where, in ``walked`` ((slot, offset) in ring order), the batch that
    kvm_dirty_ring_reset() still holds after the last of them begins: its loop resets a batch
    only when the next entry does not fit in it (same slot, within 64 pages)."""
    start, cur_slot, cur_off, mask = 0, None, 0, 0
    for i, (slot, off) in enumerate(walked):
        if mask and slot == cur_slot:
            delta = off - cur_off
            if 0 <= delta < 64:
                mask |= 1 << delta
                continue
            if -64 < delta < 0 and mask < 1 << (64 + delta):   # no bit shifted out
                cur_off, mask = off, (mask << -delta) | 1
                continue
        start, cur_slot, cur_off, mask = i, slot, off, 1
    return start


@contextlib.contextmanager
def cut_resets(plan, reprotects: bool):
    """Calls made with signals let in reset, in turn, the number of entries ``plan`` gives
    (None: all of them); once it is used up every such call resets nothing, as one a signal
    stops before its first entry. ``reprotects``: a cut call still write-protects every page
    it counted, as a fixed kernel would; without it the pages of its last batch stay
    writable, as since 49005a2a3d2a. Calls with signals held back are the kernel's own.
    One vCPU only: a real call resets every ring, so only one ring can be cut where planned."""
    real = vmmod.Vm.reset_dirty_rings
    steps = iter(plan)

    def reset(self, hold_signals=True):
        if hold_signals:
            return real(self)
        want = next(steps, 0)
        vcpu, = self.vcpus
        ring = vcpu.ring
        harvested = (ring.flags() & RESET) != 0
        starts = np.flatnonzero(harvested & ~np.roll(harvested, 1))
        if want is None or not len(starts):
            return real(self)
        first = int(starts[0])                   # the kernel's reset_index
        run = int(np.argmin(np.roll(harvested, -first))) or ring.entries
        if want >= run:
            return real(self)
        if want == 0:
            return 0
        at = [(first + i) % ring.entries * 16 for i in range(want)]
        if not reprotects:
            walked = [struct.unpack_from("<IQ", ring.map, a + 4) for a in at]
            for a in at[pending_batch(walked):]:
                struct.pack_into("<I", ring.map, a + 4, NO_SUCH_SLOT)
        stop = (first + want) % ring.entries * 16
        flags, = struct.unpack_from("<I", ring.map, stop)
        struct.pack_into("<I", ring.map, stop, DIRTY)
        try:
            got = real(self)
        finally:
            struct.pack_into("<I", ring.map, stop, flags)
        assert got == want, (got, want)
        return got

    vmmod.Vm.reset_dirty_rings = reset
    try:
        yield
    finally:
        vmmod.Vm.reset_dirty_rings = real
