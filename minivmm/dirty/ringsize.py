"""Dirty-ring size rules, checked before the kernel is asked.

Mirrors ``kvm_vm_ioctl_enable_dirty_log_ring()`` in virt/kvm/kvm_main.c and
``kvm_dirty_ring_get_rsvd_entries()`` in virt/kvm/dirty_ring.c: the size in
bytes must be a power of two, at least one page and at least the reserved
entries (64, plus 512 with Intel PML), and at most the capability's value
(KVM_DIRTY_RING_MAX_ENTRIES x 16 bytes). abi.md rules 7-11.
"""
from __future__ import annotations

from .. import abi

ENTRY_BYTES = 16
PAGE = 4096
PML_ENTRIES = 512


def pml_enabled() -> bool:
    """Intel PML adds 512 reserved entries (kvm_cpu_dirty_log_size() on VMX)."""
    try:
        with open("/sys/module/kvm_intel/parameters/pml") as f:
            return f.read().strip() in ("Y", "1")
    except OSError:
        return False


def ring_limits(kvm) -> dict:
    """min/max entries for this host, and the reserved (soft-limit) margin."""
    max_bytes = max(kvm.check_extension(abi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL),
                    kvm.check_extension(abi.KVM_CAP_DIRTY_LOG_RING))
    rsvd = abi.KVM_DIRTY_RING_RSVD_ENTRIES + (PML_ENTRIES if pml_enabled() else 0)
    min_bytes = max(PAGE, rsvd * ENTRY_BYTES)
    min_bytes = 1 << (min_bytes - 1).bit_length()
    return {"min_entries": min_bytes // ENTRY_BYTES, "max_entries": max_bytes // ENTRY_BYTES,
            "reserved_entries": rsvd}


def validate_entries(entries: int, limits: dict) -> None:
    """Raise ValueError with the reason when ``entries`` is not a usable ring size."""
    if entries <= 0 or entries & (entries - 1):
        raise ValueError(f"ring size {entries} is not a power of two")
    if limits["max_entries"] == 0:
        raise ValueError("this kernel offers no dirty ring (KVM_CAP_DIRTY_LOG_RING is 0)")
    if entries < limits["min_entries"]:
        raise ValueError(f"ring size {entries} is too small: at least {limits['min_entries']} "
                         f"entries ({limits['reserved_entries']} are reserved by KVM)")
    if entries > limits["max_entries"]:
        raise ValueError(f"ring size {entries} is too large: at most {limits['max_entries']} "
                         "entries (KVM_CAP_DIRTY_LOG_RING)")
