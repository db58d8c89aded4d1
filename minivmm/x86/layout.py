"""Guest-physical layout of a minivmm machine (slot 0 "system", slot 1 "data").

Not a kernel ABI: this is minivmm's own contract with its payloads, described in
the README ("Guest conventions"). Addresses are identity-mapped in long mode.
"""

PAGE = 0x1000
GIB = 1 << 30
MIB2 = 2 << 20

GDT = 0x1000
PML4 = 0x2000
PDPT = 0x3000
IDT = 0x4000              # 256 gates x 16 bytes
STUBS = 0x5000            # CPL0 exception stubs, 16 bytes per vector, then the common part
STUB_COMMON = STUBS + 32 * 16
CODE = 0x10000            # the payload is loaded here (real mode: CS = 0x1000, IP = 0)
CODE_MAX = 0x10000        # at most 64 KiB of payload
PD_BASE = 0x20000         # one page directory (2 MiB pages) per GiB mapped
PD_MAX = 32               # so at most 32 GiB of guest-physical space
VCPU_BASE = 0x40000       # per-vCPU blocks
VCPU_BLOCK = 0x8000
TSS_OFF = 0x0             # 104-byte 64-bit TSS, then an 8 KiB I/O bitmap and a 0xff byte
TSS_SIZE = 104
IOBITMAP_BYTES = 8192
# Real mode names a vCPU's stack SS = block >> 4, a 16-bit selector: only the blocks
# below 1 MiB can be named, so a real-mode payload runs at most this many vCPUs (24).
REAL_MODE_MAX_VCPUS = (0x10_0000 - VCPU_BASE) // VCPU_BLOCK
EXC_STACK_TOP_OFF = 0x6000   # RSP0: where the CPU switches to for an exception from CPL3
USER_STACK_TOP_OFF = 0x8000  # the payload's RSP at entry

DATA_GPA = 0x4000_0000    # slot 1, "data", at 1 GiB
# VMX without unrestricted guest keeps private memslots for real mode: a 3-page TSS
# (KVM_SET_TSS_ADDR) and a 1-page identity map (KVM_SET_IDENTITY_MAP_ADDR, by default
# 0xfffbc000). Just below the data slot, so a data slot of any size never overlaps them.
VMX_IDENTITY_MAP = DATA_GPA - 0x1000
VMX_TSS = DATA_GPA - 0x4000
MIN_MAPPED_GIB = 4        # map the first 4 GiB, so MMIO holes below 4 GiB are reachable

SLOT_SYSTEM = 0
SLOT_DATA = 1

# Port I/O services (README, "Guest conventions").
PORT_CONSOLE = 0x3F8
PORT_DEBUGCON = 0xE9
PORT_EXCEPTION = 0xE0
PORT_SYNC = 0xF0
PORT_EXIT = 0xF4

# Selectors.
SEL_CODE0 = 0x08
SEL_DATA0 = 0x10
SEL_CODE3 = 0x18 | 3
SEL_DATA3 = 0x20 | 3
SEL_TSS = 0x28


def vcpu_block(index: int) -> int:
    return VCPU_BASE + index * VCPU_BLOCK


def system_slot_size(vcpus: int) -> int:
    """Bytes of slot 0 for this many vCPUs, rounded up to 2 MiB."""
    end = vcpu_block(vcpus)
    return max(MIB2, (end + MIB2 - 1) // MIB2 * MIB2)


def mapped_gib(data_pages: int) -> int:
    """How many GiB of guest-physical space the identity page tables must cover."""
    end = DATA_GPA + data_pages * PAGE
    return max(MIN_MAPPED_GIB, (end + GIB - 1) // GIB)


MAX_DATA_PAGES = (PD_MAX * GIB - DATA_GPA) // PAGE
# Protected mode runs without paging, on flat 32-bit segments: its addresses (ESI, the
# share's base) end at 4 GiB, so a data slot past that is partly out of its reach.
PROTECTED_MAX_DATA_PAGES = ((1 << 32) - DATA_GPA) // PAGE
