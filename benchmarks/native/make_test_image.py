#!/usr/bin/env python3
"""Write small test images for minivmm-native (see IMAGE_FORMAT.md).

    python3 make_test_image.py [OUTDIR [NVCPUS]]

Real mode (emulated by KVM on a PVM host):
  exits.img      1000 sync exits
  dirty.img      3 rounds of writing one byte to each of 64 tracked pages
  dirty-w4.img   the same, but every page is written 4 times per round
64-bit CPL3 long mode (runs natively on PVM; needs /dev/kvm for the CPUID):
  long-exits.img, long-dirty.img   the same two guests as exits/dirty.img

With NVCPUS > 1 every vCPU runs the same code (and so dirties the same pages).
Plain python3 standard library only. Not a kernel ABI mirror: the image format is
minivmm's own (IMAGE_FORMAT.md); the register blocks in it are raw struct kvm_regs /
kvm_sregs bytes (arch/x86/include/uapi/asm/kvm.h).
"""
import fcntl
import os
import struct
import sys

KVM_MEM_LOG_DIRTY_PAGES = 1


def segment(base, limit, selector, type_, present=1, dpl=0, db=0, s=1, l=0, g=0):
    # struct kvm_segment: u64 base; u32 limit; u16 selector;
    # u8 type, present, dpl, db, s, l, g, avl, unusable, padding  -> 24 bytes
    return struct.pack("<QIH10B", base, limit, selector,
                       type_, present, dpl, db, s, l, g, 0, 0, 0)


def dtable(base, limit):
    return struct.pack("<QH3H", base, limit, 0, 0, 0)   # 16 bytes


def real_mode_sregs(cs_selector):
    data = segment(0, 0xffff, 0, 3)                     # read/write, accessed
    sregs = b"".join([
        segment(cs_selector << 4, 0xffff, cs_selector, 11),   # cs: exec/read, accessed
        data, data, data, data, data,                   # ds es fs gs ss
        segment(0, 0xffff, 0, 11, s=0),                 # tr: busy 32-bit TSS
        segment(0, 0xffff, 0, 2, s=0),                  # ldt
        dtable(0, 0xffff), dtable(0, 0xffff),           # gdt, idt
        # cr0 (CD|NW|ET, the reset value), cr2, cr3, cr4, cr8, efer, apic_base
        struct.pack("<7Q", 0x60000010, 0, 0, 0, 0, 0, 0xfee00900),
        bytes(32),                                      # interrupt_bitmap
    ])
    assert len(sregs) == 312
    return sregs


def regs(rip, rax=0, rflags=0x2, rsp=0):
    # struct kvm_regs: rax rbx rcx rdx rsi rdi rsp rbp r8..r15 rip rflags
    r = [0] * 18
    r[0], r[6], r[16], r[17] = rax, rsp, rip, rflags
    return struct.pack("<18Q", *r)


def image(slots, vcpus, cpuid=b"", ncpuid=0):
    """slots: [(slot_id, flags, gpa, size, content)], vcpus: [(regs, sregs)]"""
    out = [b"MVMMIMG1", struct.pack("<II", 1, len(slots))]
    for slot_id, flags, gpa, size, content in slots:
        out += [struct.pack("<IIQQQ", slot_id, flags, gpa, size, len(content)), content]
    out.append(struct.pack("<I", len(vcpus)))
    for r, s in vcpus:
        out += [r, s]
    out += [struct.pack("<I", ncpuid), cpuid]
    return b"".join(out)


def code_at(offset, code):
    # Only the used prefix is stored; the rest of the slot is zero-filled.
    return bytes(offset) + code


# (a) mov cx, 1000; L: out 0xf0, al; dec cx; jnz L; out 0xf4, al
EXITS_CODE = bytes.fromhex("b9e803" "e6f0" "49" "75fb" "e6f4")

def rel8(frm, to):
    d = to - frm
    assert -128 <= d < 128
    return struct.pack("<b", d)


def dirty_code(rounds=3, npages=64, writes=1):
    """(b) `rounds` times: write a byte `writes` times to each of `npages`
    pages at GPA 0x80000 (ES steps by 0x100 = one page), then out 0xf0 with
    AL = remaining rounds; finally out 0xf4 with AL = 0."""
    c = bytearray()
    c += b"\xba" + struct.pack("<H", rounds)        # mov dx, rounds
    outer = len(c)
    c += b"\xb8\x00\x80"                           # mov ax, 0x8000
    c += b"\xb9" + struct.pack("<H", npages)        # mov cx, npages
    inner = len(c)
    c += b"\x8e\xc0"                               # mov es, ax
    c += b"\x26\x88\x16\x00\x00" * writes            # mov [es:0], dl
    c += b"\x05\x00\x01"                           # add ax, 0x100
    c += b"\x49"                                   # dec cx
    c += b"\x75" + rel8(len(c) + 2, inner)          # jnz inner
    c += b"\x88\xd0"                               # mov al, dl
    c += b"\xe6\xf0"                               # out 0xf0, al
    c += b"\x4a"                                   # dec dx
    c += b"\x75" + rel8(len(c) + 2, outer)          # jnz outer
    c += b"\xb0\x00\xe6\xf4"                       # mov al, 0; out 0xf4, al
    return bytes(c)


# The hand-assembled listing of the default (b) loop, as a cross-check.
assert dirty_code() == bytes.fromhex(
    "ba0300" "b80080" "b94000" "8ec0" "2688160000" "050001" "49" "75f3"
    "88d0" "e6f0" "4a" "75e6" "b000" "e6f4")


# ---- 64-bit CPL3 long mode ------------------------------------------------
# Layout of slot 0: PML4 0x1000, PDPT 0x2000, PD 0x3000 (two 2 MiB user pages
# identity-mapping 0..4 MiB), GDT 0x4000, IDT 0x5000, TSS 0x6000, code 0x10000.
# Tracked slot 1: 64 pages at 0x200000.
LONG_CODE_GPA, LONG_DATA_GPA = 0x10000, 0x200000

# mov ecx, 1000; L: out 0xf0, al; dec ecx; jnz L; out 0xf4, al
LONG_EXITS_CODE = bytes.fromhex("b9e8030000" "e6f0" "ffc9" "75fa" "e6f4")

#  0: mov edx, 3            5: outer: mov edi, 0x200000    10: mov ecx, 64
# 15: inner: mov [rdi], dl  17: add edi, 0x1000   23: dec ecx   25: jnz inner
# 27: mov eax, edx          29: out 0xf0, al      31: dec edx   33: jnz outer
# 35: xor eax, eax; out 0xf4, al
LONG_DIRTY_CODE = bytes.fromhex(
    "ba03000000" "bf00002000" "b940000000" "8817" "81c700100000" "ffc9" "75f4"
    "89d0" "e6f0" "ffca" "75e2" "31c0e6f4")


def supported_cpuid():
    """KVM_GET_SUPPORTED_CPUID: returns (raw kvm_cpuid_entry2 bytes, count)."""
    nent = 256
    # _IOWR(KVMIO=0xAE, 0x05, struct kvm_cpuid2 /* 8 bytes */)
    req = (3 << 30) | (8 << 16) | (0xAE << 8) | 0x05
    buf = bytearray(struct.pack("<II", nent, 0) + bytes(40 * nent))
    fd = os.open("/dev/kvm", os.O_RDWR)
    try:
        fcntl.ioctl(fd, req, buf)
    finally:
        os.close(fd)
    nent = struct.unpack_from("<I", buf)[0]
    return bytes(buf[8:8 + 40 * nent]), nent


def long_mode_sregs():
    # 64-bit user code (dpl 3, L=1) and user data; selectors carry RPL 3.
    cs = segment(0, 0xffffffff, 0x33, 11, dpl=3, l=1, g=1)
    ds = segment(0, 0xffffffff, 0x2b, 3, dpl=3, db=1, g=1)
    tr = segment(0x6000, 0x67, 0x40, 11, s=0)           # busy 64-bit TSS
    ldt = struct.pack("<QIH10B", 0, 0xffff, 0, 2, 1, 0, 0, 0, 0, 0, 0, 1, 0)  # unusable
    sregs = b"".join([
        cs, ds, ds, ds, ds, ds, tr, ldt,
        dtable(0x4000, 0x4f), dtable(0x5000, 0xfff),
        # cr0 PE|MP|ET|NE|WP|PG, cr2, cr3, cr4 PAE|OSFXSR|OSXMMEXCPT, cr8,
        # efer LME|LMA, apic_base
        struct.pack("<7Q", 0x80050033, 0, 0x1000, 0x620, 0, 0x500, 0xfee00900),
        bytes(32),
    ])
    assert len(sregs) == 312
    return sregs


def long_mode_low_memory(code):
    mem = bytearray(LONG_CODE_GPA)
    struct.pack_into("<Q", mem, 0x1000, 0x2000 | 0x7)          # P|RW|US
    struct.pack_into("<Q", mem, 0x2000, 0x3000 | 0x7)
    struct.pack_into("<Q", mem, 0x3000, 0x000000 | 0x87)       # 2 MiB page, user
    struct.pack_into("<Q", mem, 0x3008, 0x200000 | 0x87)
    # Only consulted on segment reloads: kernel/user code+data and the TSS.
    for sel, desc in ((0x08, 0x00af9b000000ffff), (0x10, 0x00cf93000000ffff),
                      (0x28, 0x00cff3000000ffff), (0x30, 0x00affb000000ffff),
                      (0x40, 0x00008b0060000067)):
        struct.pack_into("<Q", mem, 0x4000 + sel, desc)
    return bytes(mem) + code


def write_long_images(outdir, nvcpus):
    cpuid, ncpuid = supported_cpuid()
    # IOPL 3 lets CPL3 code use `out`; the stack is never touched.
    cpus = [(regs(LONG_CODE_GPA, rflags=0x3002, rsp=0x8000), long_mode_sregs())] * nvcpus
    for name, code in (("long-exits.img", LONG_EXITS_CODE),
                       ("long-dirty.img", LONG_DIRTY_CODE)):
        slots = [(0, 0, 0, LONG_DATA_GPA, long_mode_low_memory(code)),
                 (1, KVM_MEM_LOG_DIRTY_PAGES, LONG_DATA_GPA, 64 * 4096, b"")]
        with open(os.path.join(outdir, name), "wb") as f:
            f.write(image(slots, cpus, cpuid, ncpuid))


def main():
    outdir = sys.argv[1] if len(sys.argv) > 1 else "."
    nvcpus = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    os.makedirs(outdir, exist_ok=True)
    cpus = [(regs(0), real_mode_sregs(0x1000))] * nvcpus
    low = (0, 0, 0, 1 << 20)
    with open(os.path.join(outdir, "exits.img"), "wb") as f:
        f.write(image([low + (code_at(0x10000, EXITS_CODE),)], cpus))
    # dirty-w4.img writes every page 4 times per round: 256 ring entries per
    # round, enough to hit KVM_EXIT_DIRTY_RING_FULL with --ring-entries 256.
    for name, writes in (("dirty.img", 1), ("dirty-w4.img", 4)):
        with open(os.path.join(outdir, name), "wb") as f:
            # Slot 0 ends where the tracked slot starts: slots must not overlap.
            code = code_at(0x10000, dirty_code(writes=writes))
            f.write(image([(0, 0, 0, 0x80000, code),
                           (1, KVM_MEM_LOG_DIRTY_PAGES, 0x80000, 64 * 4096, b"")],
                          cpus))
    try:
        write_long_images(outdir, nvcpus)
    except OSError as e:
        print(f"skipping long-mode images (no /dev/kvm?): {e}", file=sys.stderr)


if __name__ == "__main__":
    main()
