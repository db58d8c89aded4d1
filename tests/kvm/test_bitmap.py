"""The dirty bitmap's edges on the real /dev/kvm: odd slot sizes, first and last pages,
64-page piece boundaries, GET/CLEAR ordering, a slot replaced under a SlotBitmap, and
struct fields too wide for the kernel's u32/u64 (api.rst 4.8, 4.117, 7.18)."""
import ctypes
import struct

import numpy as np
import pytest

from minivmm import Kvm, KvmError, abi
from minivmm.dirty.bitmap import SlotBitmap, decode, enable_manual_protect
from minivmm.dirty.tracker import BitmapTracker, DirtySession
from minivmm.machine import Machine
from minivmm.payload import assemble_source

LOG = abi.KVM_MEM_LOG_DIRTY_PAGES
TABLE_GPA = 0x2000_0000          # below the data slot, inside the mapped first 4 GiB

# R8 = a table of qwords: n >= 0 writes page n of the data slot (a fresh sequence
# number, so its content changes), -1 syncs (out 0xf0, EAX = round), -2 ends
SCRIPT = assemble_source("""\
;! mode: long
;! vcpus: 1
    mov rbx, r8
    mov r15, 1
    mov r14, 1
next:
    mov rax, qword ptr [rbx]
    add rbx, 8
    cmp rax, -2
    je done
    cmp rax, -1
    je sync
    shl rax, 12
    mov qword ptr [rsi + rax], r15
    inc r15
    jmp next
sync:
    mov eax, r14d
    out 0xf0, eax
    inc r14
    jmp next
done:
    xor eax, eax
    out 0xf4, al
""", "bitmap_script.asm")


def put_table(vm, rounds):
    ops = [op for r in rounds for op in (*r, -1)] + [-2]
    data = struct.pack(f"<{len(ops)}q", *ops)
    mem = vm.add_memory(2, TABLE_GPA, -(-len(data) // 4096) * 4096, 0, "table")
    mem.write(TABLE_GPA, data)


def plain_decode(raw: bytes) -> list:
    """The oracle: bit b of byte i of the little-endian u64 words is page 8 * i + b."""
    return [8 * i + b for i, byte in enumerate(raw) for b in range(8) if byte >> b & 1]


@pytest.mark.parametrize("npages", [1, 63, 65, 129, 4097, 8192 * 64 + 65])
@pytest.mark.parametrize("manual", [True, False])
def test_edge_pages_are_collected_exactly(npages, manual, monkeypatch):
    edges = sorted({p for p in (0, 1, 63, 64, 127, 128, npages - 65, npages - 64,
                                npages - 63, npages - 1, 8192 * 64 - 1, 8192 * 64)
                    if 0 <= p < npages})
    rounds = [edges, edges[::2], edges[1::2], [], [npages - 1], [0]]
    raws = []
    collect = SlotBitmap.collect

    def spy(self, clear):
        buf, n = collect(self, clear)
        if self.slot == 1:
            raws.append(bytes(buf))
        return buf, n
    monkeypatch.setattr(SlotBitmap, "collect", spy)
    with DirtySession(SCRIPT, tracker=BitmapTracker(manual), vcpus=1, pages=npages,
                      iterations=len(rounds), stride=TABLE_GPA) as s:
        put_table(s.machine.vm, rounds)
        recs = s.run(timeout=60)
        assert s.result.ok
    assert [r.iteration for r in recs] == list(range(1, len(rounds) + 1))
    for r, want, raw in zip(recs, rounds, raws):
        assert len(raw) == -(-npages // 64) * 8          # ALIGN(npages, 64) / 8 bytes
        assert r.data_pages.tolist() == plain_decode(raw) == sorted(set(want))
        assert r.ok and not len(r.extra)


def test_clear_takes_only_the_collected_bits():
    """A page first dirtied after GET keeps its bit through the CLEAR of what GET saw."""
    npages = 4097
    rounds = [[0, npages - 1], [64, 0], [], []]
    seen = []

    def before(m):
        enable_manual_protect(m.vm)
    with Machine(SCRIPT, vcpus=1, pages=npages, data_flags=LOG, before_vcpus=before,
                 regs={"r8": TABLE_GPA}) as m:
        put_table(m.vm, rounds)
        bm = SlotBitmap(m.vm, 1, npages)
        held = {}

        def on_sync(st, tag):
            buf = (ctypes.c_uint64 * bm.nwords)()
            m.vm.get_dirty_log(1, ctypes.addressof(buf))
            seen.append(plain_decode(bytes(buf)))
            assert seen[-1] == decode(np.frombuffer(buf, np.uint64), npages).tolist()
            if tag == 1:
                held["first"] = buf                    # cleared one round later
            elif tag == 2:
                bm.clear_collected(held.pop("first"))
        m.on_sync = on_sync
        assert m.run(timeout=60).ok
    # page 64, dirtied between GET 1 and its CLEAR, is still there at GET 3
    assert seen == [[0, npages - 1], [0, 64, npages - 1], [64], [64]]


@pytest.mark.parametrize("new_pages", [32, 65])
def test_a_slot_replaced_under_its_bitmap_is_refused_before_the_get(new_pages):
    # KVM writes the new slot's bitmap size into a buffer made for the old one (65 pages:
    # 16 bytes into 8; a bigger slot overruns the heap and crashes, so it is not tried)
    with Kvm() as kvm, kvm.create_vm() as vm:
        enable_manual_protect(vm)
        vm.add_memory(1, 1 << 30, 64 * 4096, LOG)
        bm = SlotBitmap(vm, 1, 64)
        bm.collect(True)
        vm.remove_memory(1)
        with pytest.raises(KvmError, match="KVM_GET_DIRTY_LOG.*ENOENT"):
            bm.collect(True)
        vm.add_memory(1, 1 << 30, new_pages * 4096, LOG)
        with pytest.raises(ValueError, match=f"slot 1 now holds {new_pages} pages, not the 64"):
            bm.collect(True)
        vm.remove_memory(1)
        vm.add_memory(1, 1 << 30, 64 * 4096, LOG)       # the same size again: fine
        assert bm.collect(True)[1] == 0


def test_a_slot_bitmap_of_the_wrong_size_is_refused_before_any_get():
    with Kvm() as kvm, kvm.create_vm() as vm:
        vm.add_memory(1, 1 << 30, 65 * 4096, LOG)
        with pytest.raises(ValueError, match="slot 1 holds 65 pages, not 64"):
            SlotBitmap(vm, 1, 64)         # its GET wrote 16 bytes into 8
        assert SlotBitmap(vm, 1, 65).collect(False)[1] == 0


@pytest.mark.parametrize("first,num", [(0, 128), (64, 64), (128, 0)])
def test_a_clear_past_the_slots_end_is_not_blamed_on_alignment(first, num):
    # kvm_clear_dirty_log_protect(): aligned fields, but past a 65-page slot's end
    with Kvm() as kvm, kvm.create_vm() as vm:
        enable_manual_protect(vm)
        vm.add_memory(1, 1 << 30, 65 * 4096, LOG)
        buf = np.zeros(2, np.uint64)
        with pytest.raises(KvmError, match=r"EINVAL.*must lie inside the slot"):
            vm.clear_dirty_log(1, first, num, buf.ctypes.data)
        vm.clear_dirty_log(1, 64, 1, buf.ctypes.data)      # the unaligned tail: fine


@pytest.mark.parametrize("where", ["id", "address space"])
def test_a_get_of_a_slot_id_out_of_range_names_the_cause(where):
    # kvm_get_dirty_log_protect(): an id >= KVM_USER_MEM_SLOTS, or an address space past
    # the last (x86 with SMM has two), is EINVAL before the slot is looked up
    with Kvm() as kvm, kvm.create_vm() as vm:
        spaces = max(1, vm.check_extension(abi.KVM_CAP_MULTI_ADDRESS_SPACE))
        slot = 40000 if where == "id" else spaces << 16 | 1
        vm.add_memory(1, 1 << 30, 64 * 4096, LOG)
        buf = np.zeros(1, np.uint64)
        with pytest.raises(KvmError, match=r"EINVAL.*not below KVM_CAP_NR_MEMSLOTS"):
            vm.get_dirty_log(slot, buf.ctypes.data)


def test_dirty_log_fields_too_wide_are_refused_not_truncated():
    with Kvm() as kvm, kvm.create_vm() as vm:
        enable_manual_protect(vm, initially_set=True)       # every page starts dirty
        vm.add_memory(1, 1 << 30, 128 * 4096, LOG)
        ones = np.full(2, ~np.uint64(0))
        buf = np.zeros(2, np.uint64)
        with pytest.raises(ValueError, match="KVM_GET_DIRTY_LOG: slot 4294967297 "):
            vm.get_dirty_log(2 ** 32 + 1, buf.ctypes.data)             # not slot 1
        with pytest.raises(ValueError, match="KVM_CLEAR_DIRTY_LOG: slot 4294967297 "):
            vm.clear_dirty_log(2 ** 32 + 1, 0, 64, ones.ctypes.data)
        with pytest.raises(ValueError, match="num_pages 4294967360 does not fit in 32"):
            vm.clear_dirty_log(1, 0, 2 ** 32 + 64, ones.ctypes.data)   # not 64 pages
        with pytest.raises(ValueError, match="first_page -64 does not fit in 64"):
            vm.clear_dirty_log(1, -64, 64, ones.ctypes.data)
        vm.get_dirty_log(1, buf.ctypes.data)
        assert buf.tolist() == [2 ** 64 - 1] * 2                    # nothing was cleared
