"""Check minivmm's KVM UAPI mirror (minivmm.abi) against the system's UAPI header.

One C program, generated from the Python mirror and compiled once per session,
prints what the system's <linux/kvm.h> (and the <asm/kvm.h> it includes) says:
the size of every struct in ``structs.ALL_STRUCTS`` and the offset and size of
each of its fields, every ioctl number in ``ioctls.IOCTL_NAMES``, and the values
of the mirrored constants. Each test compares one struct, one ioctl or one
group of constants with the C answer. Skipped when there is no C compiler or
the header is missing.
"""
import ctypes
import shutil
import subprocess

import pytest

from minivmm.abi import constants, ioctls, structs

# Facts of include/linux/kvm_host.h, never in the UAPI header.
KERNEL_INTERNAL = {"KVM_DIRTY_RING_RSVD_ENTRIES", "KVM_DIRTY_RING_MAX_ENTRIES"}
MAY_BE_UNDEFINED = KERNEL_INTERNAL | set(constants.NEWER_THAN_6_1)

CONSTANT_PREFIXES = {
    "CAP": "KVM_CAP_", "EXIT": "KVM_EXIT_", "MEM": "KVM_MEM_", "DIRTY": "KVM_DIRTY_",
    "GUESTDBG": "KVM_GUESTDBG_", "INTERNAL_ERROR": "KVM_INTERNAL_ERROR_",
}
CONSTANT_EXACT = {"API_VERSION_AND_MMAP": (
    "KVM_API_VERSION", "KVM_PIO_PAGE_OFFSET", "KVM_COALESCED_MMIO_PAGE_OFFSET")}


def _constant_groups():
    names = [n for n, v in vars(constants).items()
             if isinstance(v, int) and not isinstance(v, bool)]
    groups = {g: sorted(n for n in names if n.startswith(p)) for g, p in CONSTANT_PREFIXES.items()}
    groups.update({g: sorted(ns) for g, ns in CONSTANT_EXACT.items()})
    return {g: ns for g, ns in groups.items() if ns}


CONSTANT_GROUPS = _constant_groups()
IOCTLS = sorted(ioctls.IOCTL_NAMES.values())


def _c_fields(cls):
    """(name, python offset, python ctype) of each field C can name; the
    members of an anonymous union (kvm_run's ``u``) stand in for the union."""
    anonymous = getattr(cls, "_anonymous_", ())
    for name, ctype, *_ in cls._fields_:
        if name in anonymous:
            for sub, sub_type, *_ in ctype._fields_:
                yield sub, getattr(cls, sub).offset, sub_type
        else:
            yield name, getattr(cls, name).offset, ctype


def _struct_checks(cls):
    """(key, C expression, Python value) for the struct's size and every field's offset and size."""
    c = cls._c_name_
    assert c, f"{cls.__name__} has no _c_name_"
    if c.startswith("struct "):      # a named C struct
        def off(f): return f"offsetof({c}, {f})"
        def size(f): return f"sizeof((({c} *)0)->{f})"
    else:                            # an expression: a member of kvm_run's exit union
        def off(f): return f"((size_t)&({c}.{f}) - (size_t)&({c}))"
        def size(f): return f"sizeof({c}.{f})"
    n = cls.__name__
    checks = [(f"{n}.sizeof", f"sizeof({c})", ctypes.sizeof(cls))]
    for field, offset, ctype in _c_fields(cls):
        checks.append((f"{n}.{field}.offset", off(field), offset))
        checks.append((f"{n}.{field}.size", size(field), ctypes.sizeof(ctype)))
    if cls is structs.kvm_cpuid2:    # the flexible array the Python header struct leaves out
        checks.append((f"{n}.entries.offset", off("entries"), structs.cpuid2_type(1).entries.offset))
    return checks


def _program():
    lines = ["#include <linux/kvm.h>", "#include <stddef.h>", "#include <stdio.h>", "",
             "int main(void)", "{"]
    for cls in structs.ALL_STRUCTS:
        for key, expr, _ in _struct_checks(cls):
            lines.append(f'    printf("%s %zu\\n", "{key}", (size_t)({expr}));')
    for name in IOCTLS:
        lines += [f"#ifdef {name}", f'    printf("%s %lu\\n", "{name}", (unsigned long){name});',
                  "#else", f'    printf("%s undefined\\n", "{name}");', "#endif"]
    for name in sorted(n for ns in CONSTANT_GROUPS.values() for n in ns):
        lines += [f"#ifdef {name}",
                  f'    printf("%s %llu\\n", "{name}", (unsigned long long)({name}));',
                  "#else", f'    printf("%s undefined\\n", "{name}");', "#endif"]
    return "\n".join(lines + ["    return 0;", "}", ""])


def _compile(cc, src, exe):
    return subprocess.run([cc, "-std=gnu11", "-o", str(exe), str(src)],
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def c_values(tmp_path_factory):
    """What the system header says: {key: int, or None where a macro is undefined}."""
    cc = next((p for p in map(shutil.which, ("cc", "gcc", "clang")) if p), None)
    if cc is None:
        pytest.skip("no C compiler found: cannot check the ABI mirror against <linux/kvm.h>")
    work = tmp_path_factory.mktemp("abi_layout")
    probe = work / "probe.c"
    probe.write_text("#include <linux/kvm.h>\nint main(void) { return 0; }\n")
    r = _compile(cc, probe, work / "probe")
    if r.returncode:
        pytest.skip(f"<linux/kvm.h> does not compile with {cc}: {r.stderr.strip()[:400]}")
    src = work / "abi_layout.c"
    src.write_text(_program())
    r = _compile(cc, src, work / "abi_layout")
    if r.returncode:
        pytest.fail(f"the generated ABI program ({src}) does not compile: a mirrored struct or "
                    f"field that <linux/kvm.h> lacks?\n{r.stderr}", pytrace=False)
    out = subprocess.run([str(work / "abi_layout")], capture_output=True, text=True, check=True)
    values = {}
    for line in out.stdout.splitlines():
        key, value = line.rsplit(" ", 1)
        values[key] = None if value == "undefined" else int(value)
    return values


@pytest.mark.parametrize("cls", structs.ALL_STRUCTS, ids=lambda cls: cls.__name__)
def test_struct_layout(cls, c_values):
    bad = [f"  {key}: python={py} C={c_values[key]}   [C: {expr}]"
           for key, expr, py in _struct_checks(cls) if c_values[key] != py]
    assert not bad, (f"{cls.__name__} does not match {cls._c_name_} in <linux/kvm.h>:\n"
                     + "\n".join(bad))


@pytest.mark.parametrize("name", IOCTLS)
def test_ioctl_number(name, c_values):
    py, c = getattr(ioctls, name), c_values[name]
    assert c is not None, f"{name} (python={py:#x}) is not defined by <linux/kvm.h>"
    assert py == c, f"{name}: python={py:#x} C={c:#x}"


@pytest.mark.parametrize("group", sorted(CONSTANT_GROUPS))
def test_constants(group, c_values):
    wrong, undefined = [], []
    for name in CONSTANT_GROUPS[group]:
        py, c = getattr(constants, name), c_values[name]
        if c is None:
            if name not in MAY_BE_UNDEFINED:
                undefined.append(name)
        elif py != c:
            wrong.append(f"  {name}: python={py} ({py:#x}) C={c} ({c:#x})")
    problems = []
    if wrong:
        problems.append("values differ from <linux/kvm.h>:\n" + "\n".join(wrong))
    if undefined:
        problems.append("not defined by <linux/kvm.h> (if newer than this header, list them in "
                        "constants.NEWER_THAN_6_1): " + ", ".join(undefined))
    assert not problems, f"constants {group}: " + "\n".join(problems)


def test_vmx_private_pages_sit_between_the_system_and_data_slots():
    # KVM_SET_TSS_ADDR takes 3 pages and the identity map 1: between slot 0 (even with
    # 4096 vCPUs) and the data slot, so no data slot size can overlap them
    from minivmm.x86 import layout as L
    assert L.system_slot_size(4096) <= L.VMX_TSS
    assert L.VMX_TSS + 3 * 0x1000 <= L.VMX_IDENTITY_MAP
    assert L.VMX_IDENTITY_MAP + 0x1000 <= L.DATA_GPA
