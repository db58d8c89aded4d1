"""Checks: the dirty bitmap, KVM_GET_DIRTY_LOG / KVM_CLEAR_DIRTY_LOG and
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (abi.md rules 48-59), plus a dirty_log_test-style
correctness run.

Guests here are long-mode CPL3 payloads (native on kvm_pvm) that write the iteration
number into the first qword of chosen pages of the data slot (slot 1 at 0x40000000) and
stop at a sync port, so every collection happens with the vCPU outside KVM_RUN.

Also home of small helpers the memslot and misc checks share.
"""
from __future__ import annotations

import ctypes

import numpy as np

from .. import abi
from ..dirty.bitmap import enable_manual_protect, encode
from ..dirty.verify import LCG_ADD, LCG_MUL, lcg_pages
from ..memory import GuestMemory
from ..x86 import layout as L
from .checks_entries import LCG_WRITE, NEXT_ITERATION, first_words
from .registry import Skip, check, expect, expect_eq, expect_errno, expect_ok

LOG = abi.KVM_MEM_LOG_DIRTY_PAGES
RO = abi.KVM_MEM_READONLY
PAGE = L.PAGE
MP = abi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
INIT_SET = abi.KVM_DIRTY_LOG_INITIALLY_SET
SCRATCH_GPA = 0x1_0000_0000       # VM-only tests place their slots from 4 GiB up
CANARY = 0xAA

MAIN = "virt/kvm/kvm_main.c"


# --------------------------------------------------------------------------------------
# helpers (also used by checks_memslots and checks_misc)

def bitmap_bytes(npages: int) -> int:
    """kvm_dirty_bitmap_bytes(): ALIGN(npages, 64) / 8."""
    return (npages + 63) // 64 * 8


def bits_of(raw) -> list:
    """Every set bit of a bitmap (bytes or u64 words), bit i of the little-endian u64
    words = index i. Bits past the slot's end are included, so stray ones show up."""
    data = np.frombuffer(bytes(raw), dtype=np.uint8)
    return np.flatnonzero(np.unpackbits(data, bitorder="little")).tolist()


def spans(pages) -> str:
    """[0, 1, 2, 5] -> "0-2,5": long page lists, readable in expected/observed."""
    out, pages = [], sorted(pages)
    for k, p in enumerate(pages):
        if k and p == pages[k - 1] + 1:
            out[-1][1] = p
        else:
            out.append([p, p])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in out) or "none"


def bitmap_for(pages, npages: int) -> np.ndarray:
    """u64 words with the given bits set (a CLEAR argument, relative to its first_page);
    at least one word, so that even an empty CLEAR passes a valid pointer."""
    return encode(list(pages), max(npages, 1))


def get_raw(vm, slot: int, nbytes: int, fill: int = CANARY) -> bytes:
    """KVM_GET_DIRTY_LOG into an ``nbytes`` buffer pre-filled with ``fill``; its bytes."""
    buf = (ctypes.c_ubyte * nbytes)(*([fill] * nbytes))
    vm.get_dirty_log(slot, ctypes.addressof(buf))
    return bytes(buf)


def get_pages(vm, slot: int, npages: int) -> list:
    """KVM_GET_DIRTY_LOG of an npages slot (exact-size buffer): the set bits."""
    return bits_of(get_raw(vm, slot, bitmap_bytes(npages), 0))


def clear_pages(vm, slot: int, first: int, num: int, pages=()) -> None:
    """KVM_CLEAR_DIRTY_LOG of [first, first+num) with the bits of ``pages`` (absolute
    page numbers) set in the argument."""
    words = bitmap_for([p - first for p in pages], num)
    vm.clear_dirty_log(slot, first, num, words.ctypes.data)


def host_memory(ctx, pages: int) -> GuestMemory:
    """Anonymous host memory for a slot a check creates by hand; freed with the check."""
    mem = GuestMemory(0, 0, pages * PAGE, 0, "abi-check scratch")
    ctx.on_close(mem.close)
    return mem


def writes_body(plan) -> str:
    """A CPL3 guest: iteration k (from 1) writes k into the first qword of each page in
    plan[k-1] (page numbers within the data slot), then syncs with tag k; at the end it
    exits with code 0."""
    lines = ["    mov r12, rsi"]
    for it, pages in enumerate(plan, 1):
        for p in pages:
            lines.append(f"    mov qword ptr [r12 + {p * PAGE}], {it}")
        lines += [f"    mov eax, {it}", "    out 0xf0, eax"]
    lines += ["    xor eax, eax", "    out 0xf4, al"]
    return "\n".join(lines)


def run_sync(ctx, m, tag: int) -> None:
    """Run vCPU 0 to its next sync, which must carry ``tag``."""
    ctx.expect_event(ctx.run_to_port(m), "sync", f"the guest reaches sync {tag}", tag)


def run_exit(ctx, m) -> None:
    ctx.expect_event(ctx.run_to_port(m), "exit", "the guest exits with code 0", 0)


def require_manual_protect(ctx, need_initially_set: bool = False) -> int:
    value = ctx.require(abi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
    if need_initially_set and not value & INIT_SET:
        raise Skip(f"KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = {value} does not offer "
                   "KVM_DIRTY_LOG_INITIALLY_SET")
    return value


def _log_slot(vm, slot: int, pages: int, flags: int = LOG, index: int = 0):
    """A fresh slot of ``pages`` pages (flags default LOG) at 4 GiB + index * 16 MiB."""
    return vm.add_memory(slot, SCRATCH_GPA + index * (16 << 20), pages * PAGE, flags)


# --------------------------------------------------------------------------------------
# rule 48: the ring makes the bitmap ioctls unavailable

@check("bitmap.ring_enxio", 48, f"{MAIN} kvm_get_dirty_log_protect(), "
       "kvm_clear_dirty_log_protect() (kvm_use_dirty_bitmap); commits b2cc64c4f382, "
       "044c59c409b7", fault="errno_swap")
def ring_enxio(ctx):
    """With the dirty ring enabled, KVM_GET_DIRTY_LOG and KVM_CLEAR_DIRTY_LOG are ENXIO"""
    vm = ctx.vm()
    entries = ctx.min_ring()
    cap = ctx.enable_ring(vm, entries)
    ctx.diag(f"ring enabled with {abi.CAP_NAMES.get(cap, cap)}, {entries} entries")
    _log_slot(vm, 1, 65)
    buf = np.zeros(2, dtype="<u8")
    expect_errno(lambda: vm.get_dirty_log(1, buf.ctypes.data), "ENXIO",
                 "KVM_GET_DIRTY_LOG on a LOG_DIRTY_PAGES slot of a ring VM")
    expect_errno(lambda: vm.clear_dirty_log(1, 0, 64, buf.ctypes.data), "ENXIO",
                 "KVM_CLEAR_DIRTY_LOG on a LOG_DIRTY_PAGES slot of a ring VM")


# --------------------------------------------------------------------------------------
# rules 49-51: which slot, which pointer

@check("bitmap.get.enoent", 49, f"{MAIN} kvm_get_dirty_log_protect() (no memslot or "
       "no dirty_bitmap)", fault="errno_swap")
def get_enoent(ctx):
    """KVM_GET_DIRTY_LOG on a slot without LOG_DIRTY_PAGES, or on no slot at all, is ENOENT"""
    vm = ctx.vm()
    _log_slot(vm, 1, 16, LOG, 0)
    _log_slot(vm, 2, 16, 0, 1)
    expect_ok(lambda: get_pages(vm, 1, 16), "KVM_GET_DIRTY_LOG on a logged slot (control)")
    buf = np.zeros(1, dtype="<u8")
    expect_errno(lambda: vm.get_dirty_log(2, buf.ctypes.data), "ENOENT",
                 "KVM_GET_DIRTY_LOG on a slot without KVM_MEM_LOG_DIRTY_PAGES")
    expect_errno(lambda: vm.get_dirty_log(5, buf.ctypes.data), "ENOENT",
                 "KVM_GET_DIRTY_LOG on slot 5, never created")


@check("bitmap.slot_id.einval", 50, f"{MAIN} kvm_get_dirty_log_protect(), "
       "kvm_clear_dirty_log_protect() (as_id >= kvm_arch_nr_memslot_as_ids(kvm), v6.8+, or "
       "id >= KVM_USER_MEM_SLOTS)", fault="errno_swap")
def slot_id_einval(ctx):
    """Slot id >= KVM_CAP_NR_MEMSLOTS or as_id >= the number of address spaces is EINVAL"""
    vm = ctx.vm()
    nr_slots = vm.check_extension(abi.KVM_CAP_NR_MEMSLOTS)
    multi = vm.check_extension(abi.KVM_CAP_MULTI_ADDRESS_SPACE)
    nr_as = max(1, multi)
    ctx.diag(f"KVM_CAP_NR_MEMSLOTS = {nr_slots}, address spaces = {nr_as} "
             f"(KVM_CAP_MULTI_ADDRESS_SPACE = {multi})")
    expect(0 < nr_slots <= 0xFFFF, "KVM_CAP_NR_MEMSLOTS fits the u16 slot id", "1..65535",
           nr_slots)
    _log_slot(vm, 1, 64)
    buf = np.zeros(1, dtype="<u8")
    addr = buf.ctypes.data
    expect_ok(lambda: vm.get_dirty_log(1, addr), "KVM_GET_DIRTY_LOG(as_id 0, slot 1) (control)")
    expect_errno(lambda: vm.get_dirty_log(nr_slots - 1, addr), "ENOENT",
                 f"KVM_GET_DIRTY_LOG on slot {nr_slots - 1} (the last valid id, unused)")
    expect_errno(lambda: vm.get_dirty_log(nr_slots, addr), "EINVAL",
                 f"KVM_GET_DIRTY_LOG on slot {nr_slots} (= KVM_CAP_NR_MEMSLOTS)")
    expect_errno(lambda: vm.get_dirty_log(0xFFFF, addr), "EINVAL",
                 "KVM_GET_DIRTY_LOG on slot 0xffff")
    bad_as = nr_as << 16 | 1
    expect_errno(lambda: vm.get_dirty_log(bad_as, addr), "EINVAL",
                 f"KVM_GET_DIRTY_LOG on as_id {nr_as}, slot 1 ({bad_as:#x})")
    expect_errno(lambda: vm.clear_dirty_log(nr_slots, 0, 64, addr), "EINVAL",
                 f"KVM_CLEAR_DIRTY_LOG on slot {nr_slots}")
    expect_errno(lambda: vm.clear_dirty_log(bad_as, 0, 64, addr), "EINVAL",
                 f"KVM_CLEAR_DIRTY_LOG on as_id {nr_as}, slot 1")


@check("bitmap.bad_pointer.efault", 51, f"{MAIN} kvm_get_dirty_log_protect() copy_to_user, "
       "kvm_clear_dirty_log_protect() copy_from_user", fault="errno_swap")
def bad_pointer_efault(ctx):
    """A dirty_bitmap pointer KVM cannot access (8) is EFAULT, for GET and for CLEAR"""
    vm = ctx.vm()
    _log_slot(vm, 1, 65)
    expect_ok(lambda: get_pages(vm, 1, 65), "KVM_GET_DIRTY_LOG with a good buffer (control)")
    expect_errno(lambda: vm.get_dirty_log(1, 8), "EFAULT", "KVM_GET_DIRTY_LOG(dirty_bitmap=8)")
    expect_errno(lambda: vm.clear_dirty_log(1, 0, 64, 8), "EFAULT",
                 "KVM_CLEAR_DIRTY_LOG(first_page 0, num_pages 64, dirty_bitmap=8)")


# --------------------------------------------------------------------------------------
# rule 52: size and bit order

@check("bitmap.layout.size_and_bit_order", 52, f"include/linux/kvm_host.h "
       f"kvm_dirty_bitmap_bytes(); {MAIN} kvm_get_dirty_log_protect(); api.rst 4.8",
       fault="bitmap_flip")
def layout(ctx):
    """A 65-page slot's bitmap is 16 bytes (ALIGN(65,64)/8); bit i = page i; no stray bits"""
    m = ctx.guest(writes_body([[0, 1, 64]]), pages=65)
    run_sync(ctx, m, 1)
    raw = get_raw(m.vm, L.SLOT_DATA, 32, CANARY)
    ctx.diag(f"32-byte buffer after GET: {raw.hex()}")
    expect_eq(raw[16:], bytes([CANARY]) * 16,
              "bytes 16..31 of the buffer (KVM must write exactly ALIGN(65,64)/8 = 16 bytes)")
    words = np.frombuffer(raw[:16], dtype="<u8")
    expect_eq(bits_of(raw[:16]), [0, 1, 64], "set bits after the guest wrote pages 0, 1, 64")
    expect_eq((int(words[0]), int(words[1])), (0b11, 1),
              "little-endian u64 words (word 1 bits 1..63 are past the slot and must be 0)")
    run_exit(ctx, m)


# --------------------------------------------------------------------------------------
# rule 53: without manual protect, GET returns and clears

@check("bitmap.get.returns_and_clears", 53, f"{MAIN} kvm_get_dirty_log_protect() (xchg "
       "path); api.rst 4.8", fault="bitmap_flip")
def get_returns_and_clears(ctx):
    """Without manual protect, GET returns and clears: the next GET is empty until a re-write"""
    m = ctx.guest(writes_body([[0, 2, 5], [5]]), pages=65)
    run_sync(ctx, m, 1)
    expect_eq(get_pages(m.vm, 1, 65), [0, 2, 5], "first GET after writes to pages 0, 2, 5")
    expect_eq(get_pages(m.vm, 1, 65), [], "second GET, nothing written in between")
    run_sync(ctx, m, 2)
    expect_eq(get_pages(m.vm, 1, 65), [5], "GET after the guest re-wrote page 5 "
              "(the first GET re-protected it)")
    expect_eq(get_pages(m.vm, 1, 65), [], "GET again")
    run_exit(ctx, m)


# --------------------------------------------------------------------------------------
# rule 54: enabling KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2

@check("bitmap.manual_protect.args", 54, f"{MAIN} kvm_vm_ioctl_enable_cap_generic() "
       "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2; api.rst 7.18", fault="errno_swap")
def manual_protect_args(ctx):
    """ENABLE_CAP(168): args[0] 0, 1 or 3 (INITIALLY_SET only with ENABLE), flags 0; else EINVAL"""
    value = require_manual_protect(ctx)
    vm = ctx.vm()
    cap = abi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2
    expect_ok(lambda: vm.enable_cap(cap, MP), "args[0] = 1 (MANUAL_PROTECT_ENABLE)")
    if value & INIT_SET:
        expect_ok(lambda: vm.enable_cap(cap, MP | INIT_SET), "args[0] = 3 (| INITIALLY_SET)")
    else:
        ctx.diag(f"capability value {value}: INITIALLY_SET not offered, args 3 not tried")
    expect_ok(lambda: vm.enable_cap(cap, 0), "args[0] = 0 (turn it off)")
    expect_errno(lambda: vm.enable_cap(cap, INIT_SET), "EINVAL",
                 "args[0] = 2 (INITIALLY_SET without MANUAL_PROTECT_ENABLE)")
    expect_errno(lambda: vm.enable_cap(cap, 4), "EINVAL", "args[0] = 4 (unknown bit)")
    expect_errno(lambda: vm.enable_cap(cap, MP | 4), "EINVAL", "args[0] = 5 (1 | unknown bit)")
    expect_errno(lambda: vm.enable_cap(cap, 1 << 63), "EINVAL", "args[0] = 1 << 63")
    expect_errno(lambda: vm.enable_cap(cap, MP, flags=1), "EINVAL", "flags = 1, args[0] = 1")
    # allowed at any time: after memslots and vCPUs exist
    _log_slot(vm, 1, 16)
    vm.create_vcpu(0)
    expect_ok(lambda: vm.enable_cap(cap, MP), "args[0] = 1 after a memslot and a vCPU exist")
    expect_ok(lambda: vm.enable_cap(cap, 0), "args[0] = 0 after a memslot and a vCPU exist")


@check("bitmap.manual_protect.toggle", (54, 53, 55), f"{MAIN} kvm_vm_ioctl_enable_cap_generic()"
       ", kvm_get_dirty_log_protect() (kvm->manual_dirty_log_protect); api.rst 7.18",
       fault="bitmap_flip")
def manual_protect_toggle(ctx):
    """Manual protect enabled mid-run stops GET from clearing; args 0 turns that off again"""
    require_manual_protect(ctx)
    m = ctx.guest(writes_body([[0, 3]]), pages=65)
    run_sync(ctx, m, 1)
    expect_ok(lambda: enable_manual_protect(m.vm), "ENABLE_CAP(168, 1) with a vCPU and dirty "
              "bits present")
    expect_eq(get_pages(m.vm, 1, 65), [0, 3], "GET with manual protect on")
    expect_eq(get_pages(m.vm, 1, 65), [0, 3], "GET again: manual protect keeps the bits")
    expect_ok(lambda: m.vm.enable_cap(abi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 0),
              "ENABLE_CAP(168, 0)")
    expect_eq(get_pages(m.vm, 1, 65), [0, 3], "GET after turning it off: returns the bits")
    expect_eq(get_pages(m.vm, 1, 65), [], "GET again: the previous GET cleared them")
    run_exit(ctx, m)


# --------------------------------------------------------------------------------------
# rule 55: manual protect: GET keeps, CLEAR clears exactly and re-arms

@check("bitmap.manual_protect.clear_rearms", 55, f"{MAIN} kvm_clear_dirty_log_protect() "
       "(kvm_arch_mmu_enable_log_dirty_pt_masked); api.rst 4.117, 7.18",
       fault="clear_log_ignored")
def manual_protect_clear_rearms(ctx):
    """With manual protect, GET keeps bits; CLEAR clears exactly the given bits and re-arms them"""
    require_manual_protect(ctx)
    npages = 130
    m = ctx.guest(writes_body([[0, 1, 2, 70, 129], [0, 3]]), pages=npages,
                  before_vcpus=lambda mm: enable_manual_protect(mm.vm))
    vm = m.vm
    run_sync(ctx, m, 1)
    first = [0, 1, 2, 70, 129]
    expect_eq(get_pages(vm, 1, npages), first, "GET after writes to 0, 1, 2, 70, 129")
    expect_eq(get_pages(vm, 1, npages), first, "GET again (manual protect: not cleared)")
    clear_pages(vm, 1, 0, 64, [0, 2, 5])          # page 5 was never dirty: a no-op bit
    expect_eq(get_pages(vm, 1, npages), [1, 70, 129], "GET after CLEAR of pages 0, 2 (and 5)")
    run_sync(ctx, m, 2)                            # the guest re-writes 0, writes 3
    expect_eq(get_pages(vm, 1, npages), [0, 1, 3, 70, 129],
              "GET after the guest re-wrote page 0 (cleared: re-armed, so logged again) and "
              "wrote page 3; page 2 (cleared, not re-written) stays clear; 1, 70, 129 stay set")
    clear_pages(vm, 1, 64, npages - 64, [70, 129])    # a piece that reaches the slot's end
    expect_eq(get_pages(vm, 1, npages), [0, 1, 3], "GET after CLEAR of [64, 130) bits 70, 129")
    run_exit(ctx, m)


# --------------------------------------------------------------------------------------
# rule 56: INITIALLY_SET

@check("bitmap.initially_set", 56, f"{MAIN} kvm_prepare_memory_region() "
       "(kvm_dirty_log_manual_protect_and_init_set); api.rst 7.18", fault="bitmap_flip")
def initially_set(ctx):
    """INITIALLY_SET: bitmaps allocated afterwards start as npages ones; older ones untouched"""
    require_manual_protect(ctx, need_initially_set=True)
    vm = ctx.vm()
    _log_slot(vm, 1, 65, LOG, 0)          # has a bitmap before the capability
    _log_slot(vm, 2, 65, 0, 1)            # will get one by toggling LOG on afterwards
    enable_manual_protect(vm, initially_set=True)
    _log_slot(vm, 3, 65, LOG, 2)          # created afterwards
    mem2 = vm.memory[2]
    vm.set_user_memory_region(2, LOG, mem2.gpa, mem2.size, mem2.host_addr)
    all65 = spans(range(65))
    raw = get_raw(vm, 3, 32, CANARY)
    ctx.diag(f"new slot's bitmap: {raw[:16].hex()}")
    expect_eq(raw[16:], bytes([CANARY]) * 16, "bytes past ALIGN(65,64)/8 untouched")
    expect_eq(spans(bits_of(raw[:16])), all65,
              "slot created after INITIALLY_SET: bits 0..64 set, bits 65..127 clear")
    expect_eq(spans(get_pages(vm, 2, 65)), all65,
              "slot whose LOG_DIRTY_PAGES was turned on after INITIALLY_SET: all 65 bits set")
    expect_eq(spans(get_pages(vm, 1, 65)), "none",
              "slot whose bitmap existed before: untouched (empty)")


# --------------------------------------------------------------------------------------
# rules 57, 58: CLEAR without manual protect, and CLEAR's range rules

@check("bitmap.clear.without_manual_protect", 57, f"{MAIN} kvm_clear_dirty_log_protect() "
       "(no manual_dirty_log_protect test); api.rst 4.117", fault="clear_log_ignored")
def clear_without_manual_protect(ctx):
    """KVM_CLEAR_DIRTY_LOG works (0, and clears) without manual protect"""
    m = ctx.guest(writes_body([[0, 4, 64]]), pages=65)
    run_sync(ctx, m, 1)
    expect_ok(lambda: clear_pages(m.vm, 1, 0, 65, [0, 64]),
              "KVM_CLEAR_DIRTY_LOG(first 0, num 65, bits 0 and 64) without manual protect")
    expect_eq(get_pages(m.vm, 1, 65), [4], "GET after that CLEAR (pages 0, 64 cleared)")
    run_exit(ctx, m)


@check("bitmap.clear.range_einval", 58, f"{MAIN} kvm_clear_dirty_log_protect(); api.rst 4.117",
       fault="errno_swap")
def clear_range_einval(ctx):
    """CLEAR: first_page%64, num_pages%64 short of the end, or a range past the slot are EINVAL"""
    vm = ctx.vm()
    npages = 130
    _log_slot(vm, 1, npages)
    buf = np.zeros(4, dtype="<u8")
    a = buf.ctypes.data
    for first, num, why in ((1, 64, "first_page not a multiple of 64"),
                            (32, 98, "first_page not a multiple of 64, range reaching the end"),
                            (0, 63, "num_pages not a multiple of 64, short of the end"),
                            (64, 65, "num_pages 65 from 64, one short of the end"),
                            (0, 129, "num_pages 129, one short of the end"),
                            (192, 0, "first_page 192 > npages 130"),
                            (128, 64, "num_pages 64 > npages - first_page = 2"),
                            (0, 131, "num_pages 131 > npages 130"),
                            (0, 0xFFFFFFFF, "num_pages 2^32-1")):
        expect_errno(lambda: vm.clear_dirty_log(1, first, num, a), "EINVAL",
                     f"CLEAR(first_page {first}, num_pages {num}): {why}")


@check("bitmap.clear.ranges_accepted", (58, 55), f"{MAIN} kvm_clear_dirty_log_protect(); "
       "api.rst 4.117", fault="clear_log_ignored")
def clear_ranges_accepted(ctx):
    """CLEAR accepts num_pages 0 and a tail piece reaching the slot's end; clears only its range"""
    require_manual_protect(ctx, need_initially_set=True)
    vm = ctx.vm()
    npages = 130
    enable_manual_protect(vm, initially_set=True)   # a bitmap of ones to clear, no guest
    _log_slot(vm, 1, npages)
    everything = list(range(npages))

    def dirty():
        return spans(get_pages(vm, 1, npages))
    expect_eq(dirty(), spans(everything), "INITIALLY_SET bitmap (precondition)")
    expect_ok(lambda: clear_pages(vm, 1, 0, 0), "CLEAR(first 0, num 0)")
    expect_ok(lambda: clear_pages(vm, 1, 128, 0), "CLEAR(first 128, num 0)")
    expect_eq(dirty(), spans(everything), "num_pages 0 clears nothing")
    expect_ok(lambda: clear_pages(vm, 1, 128, 2, [128, 129]),
              "CLEAR(first 128, num 2): reaches the end, so num_pages % 64 may be non-zero")
    expect_eq(dirty(), spans(everything[:128]), "after clearing pages 128, 129")
    expect_ok(lambda: clear_pages(vm, 1, 64, 64, range(64, 128)), "CLEAR(first 64, num 64)")
    expect_eq(dirty(), spans(everything[:64]), "after clearing pages 64..127")
    expect_ok(lambda: clear_pages(vm, 1, 0, npages, [0, 63]), "CLEAR(first 0, num 130) "
              "of bits 0 and 63")
    expect_eq(dirty(), spans(everything[1:63]), "after clearing pages 0 and 63")


@check("bitmap.clear.enoent", 58, f"{MAIN} kvm_clear_dirty_log_protect() (no memslot or "
       "no dirty_bitmap)", fault="errno_swap")
def clear_enoent(ctx):
    """KVM_CLEAR_DIRTY_LOG on a slot without LOG_DIRTY_PAGES, or on no slot, is ENOENT"""
    vm = ctx.vm()
    _log_slot(vm, 1, 64, LOG, 0)
    _log_slot(vm, 2, 64, 0, 1)
    expect_ok(lambda: clear_pages(vm, 1, 0, 64, [0]), "CLEAR on the logged slot (control)")
    expect_errno(lambda: clear_pages(vm, 2, 0, 64, [0]), "ENOENT",
                 "CLEAR on a slot without KVM_MEM_LOG_DIRTY_PAGES")
    expect_errno(lambda: clear_pages(vm, 5, 0, 64, [0]), "ENOENT", "CLEAR on slot 5, never "
                 "created")


# --------------------------------------------------------------------------------------
# rule 59: logging off frees the bitmap; read-only slots are never logged

@check("bitmap.log_off.frees_bitmap", 59, f"{MAIN} kvm_prepare_memory_region() "
       "(KVM_MR_FLAGS_ONLY without LOG_DIRTY_PAGES: new->dirty_bitmap = NULL), "
       "kvm_commit_memory_region() (kvm_destroy_dirty_bitmap(old))", fault="errno_swap")
def log_off_frees(ctx):
    """Turning LOG_DIRTY_PAGES off frees the bitmap: GET is ENOENT; on again starts empty"""
    m = ctx.guest(writes_body([[0, 3]]), pages=65)
    run_sync(ctx, m, 1)
    data = m.data
    m.vm.set_user_memory_region(1, 0, data.gpa, data.size, data.host_addr)
    buf = np.zeros(2, dtype="<u8")
    expect_errno(lambda: m.vm.get_dirty_log(1, buf.ctypes.data), "ENOENT",
                 "GET after turning LOG_DIRTY_PAGES off (pages 0, 3 were dirty)")
    expect_errno(lambda: clear_pages(m.vm, 1, 0, 65, [0]), "ENOENT",
                 "CLEAR after turning LOG_DIRTY_PAGES off")
    m.vm.set_user_memory_region(1, LOG, data.gpa, data.size, data.host_addr)
    expect_eq(get_pages(m.vm, 1, 65), [], "GET after turning it on again: a fresh, empty bitmap")
    run_exit(ctx, m)


@check("bitmap.readonly.not_logged", 59, "arch/x86/kvm/mmu (write to a read-only memslot "
       "-> KVM_EXIT_MMIO); api.rst 4.35 KVM_MEM_READONLY", fault="bitmap_flip")
def readonly_not_logged(ctx):
    """A READONLY + LOG_DIRTY_PAGES slot: a guest write exits MMIO and the bitmap stays 0"""
    if not ctx.cap(abi.KVM_CAP_READONLY_MEM):
        raise Skip("KVM_CAP_READONLY_MEM is 0: no read-only memslots")
    m = ctx.guest(writes_body([[0]]), pages=65, data_flags=RO | LOG)
    ev = ctx.run_to_port(m)
    info = ev.info or {}
    expect(ev.kind == "other" and ev.value == abi.KVM_EXIT_MMIO and info.get("is_write")
           and info.get("phys_addr") == L.DATA_GPA,
           "the guest's write to page 0 of the read-only slot",
           f"KVM_EXIT_MMIO write at {L.DATA_GPA:#x}", f"{ev.kind} {ev.value} {info}")
    raw = get_raw(m.vm, 1, 32, CANARY)
    expect_eq(raw[:16], bytes(16), "the read-only slot's bitmap after the write attempt")
    expect_eq(raw[16:], bytes([CANARY]) * 16, "bytes past ALIGN(65,64)/8 untouched")
    first = m.data.read(L.DATA_GPA, 8)
    ctx.diag(f"page 0 holds {first.hex()} after the write attempt")
    # the diagnostic said "not applied" without looking: an applied write passed
    expect_eq(first, bytes(8), "page 0 of the read-only slot after the store (rule 29: "
              "not applied)")


# --------------------------------------------------------------------------------------
# a dirty_log_test-style correctness run (abi.md 4.1, clear-log mode)

MID = 0x8000_0000

RANDOM_BODY = f"""
    mov r12, rsi
    mov r13, rdx                  ; pages (one vCPU: the whole slot)
    mov r14, rcx                  ; iterations
    mov r15, 1
    mov rbx, r9                   ; LCG state
    mov rsi, {LCG_MUL}
    mov rdi, {LCG_ADD}
iteration:
    mov rcx, r10
    call writes
    mov eax, r15d
    or eax, {MID:#x}
    out 0xf0, eax                 ; mid-iteration collection
    mov rcx, r10
    call writes
    mov rax, r13
    dec rax
    shl rax, 12
    mov qword ptr [r12 + rax], r15   ; always the last page (the partial bitmap word)
""" + NEXT_ITERATION + """writes:
""" + LCG_WRITE + """    dec rcx
    jnz writes
    ret
"""


@check("bitmap.correctness.random_writes", (52, 55), "tools/testing/selftests/kvm/"
       "dirty_log_test.c (clear-log mode); api.rst 4.8, 4.117, 7.18", fault="bitmap_flip")
def correctness_random_writes(ctx):
    """Random writes to a 4099-page slot, GET+CLEAR twice per iteration: no page missed or stale"""
    value = require_manual_protect(ctx)
    init_set = bool(value & INIT_SET)
    npages, iterations, half, seed = 4099, 16, 1024, 0x5EED
    flags = MP | (INIT_SET if init_set else 0)
    m = ctx.guest(RANDOM_BODY, pages=npages,
                  regs={"rcx": iterations, "r9": seed, "r10": half},
                  before_vcpus=lambda mm: mm.vm.enable_cap(
                      abi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, flags))
    vm, data = m.vm, m.data
    nwords = (npages + 63) // 64
    words = np.zeros(nwords, dtype="<u8")
    tail = ~np.uint64((1 << (npages % 64)) - 1) if npages % 64 else np.uint64(0)

    def collect(what):
        vm.get_dirty_log(1, words.ctypes.data)
        expect(not int(words[-1] & tail), f"{what}: bits past page {npages - 1}", "0",
               hex(int(words[-1])))
        pages = np.flatnonzero(np.unpackbits(words.view(np.uint8), bitorder="little"))
        vm.clear_dirty_log(1, 0, npages, words.ctypes.data)
        return pages

    if init_set:
        pages = collect("INITIALLY_SET bitmap")
        expect_eq(len(pages), npages, "bits set in the INITIALLY_SET bitmap")
    expect_eq(len(collect("after CLEAR of everything")), 0, "bits left after a full CLEAR")

    prev = first_words(data, npages)
    total_dirty = total_clean = over = 0
    for it in range(1, iterations + 1):
        # the guest's one generator, run on across both halves: blocks 2it-1 and 2it
        plans = [lcg_pages(seed, npages, half, 2 * it - k).tolist() for k in (1, 0)]
        plans[1].append(npages - 1)
        union = np.zeros(npages, bool)
        for part, (tag, plan) in enumerate(((it | MID, plans[0]), (it, plans[1]))):
            run_sync(ctx, m, tag)
            what = f"iteration {it} {'mid' if part == 0 else 'end'}"
            pages = collect(what)
            now = first_words(data, npages)
            reported = np.zeros(npages, bool)
            reported[pages] = True
            union |= reported
            written = np.zeros(npages, bool)
            written[plan] = True
            missed = np.flatnonzero(written & ~reported)
            expect(not len(missed), f"{what}: pages the guest wrote since the last CLEAR are "
                   "reported", "none missing", f"{len(missed)} missing, e.g. {missed[:8].tolist()}")
            changed = np.flatnonzero((now != prev) & ~reported)
            expect(not len(changed), f"{what}: every page whose content changed is reported",
                   "none missing", f"{len(changed)} changed unreported, e.g. "
                   f"{changed[:8].tolist()}")
            stale = np.flatnonzero(reported & (now != it))
            expect(not len(stale), f"{what}: reported pages hold this iteration's value {it}",
                   "none stale", f"{len(stale)} stale, e.g. {stale[:8].tolist()} = "
                   f"{now[stale[:8]].tolist()}")
            over += int(np.count_nonzero(reported & ~written))
            prev = now
        unreported_new = np.flatnonzero(~union & (prev == it))
        expect(not len(unreported_new), f"iteration {it}: pages not reported hold an older value",
               f"< {it}", f"{len(unreported_new)} pages hold {it}, e.g. "
               f"{unreported_new[:8].tolist()}")
        dirty = int(np.count_nonzero(union))
        total_dirty += dirty
        total_clean += npages - dirty
    run_exit(ctx, m)
    ctx.diag(f"{iterations} iterations x {2 * half + 1} writes to {npages} pages (seed "
             f"{seed:#x}, manual protect{' + INITIALLY_SET' if init_set else ''}): "
             f"bits checked dirty {total_dirty}, clear {total_clean}")
    if over:
        ctx.diag(f"{over} page(s) reported at a collection although not written since the "
                 "last CLEAR (holding the current value): allowed, the ABI promises no misses")
