"""VcpuEnd.summary(): the one line `minivmm run` prints for how a vCPU ended (no KVM needed)."""
from minivmm.machine import VcpuEnd


def test_internal_error_says_what_kvm_meant():
    # the suberror was only in --json: the text said just "internal-error at ..."
    end = VcpuEnd("internal-error", rip=0x10007, instruction="int3  ; line 3",
                  detail={"suberror": 1, "suberror_name": "KVM_INTERNAL_ERROR_EMULATION",
                          "meaning": "KVM could not emulate an instruction"})
    assert end.summary() == ("internal-error (KVM_INTERNAL_ERROR_EMULATION: KVM could not "
                             "emulate an instruction) at 0x10007 (int3  ; line 3)")


def test_fail_entry_names_the_hardware_reason():
    end = VcpuEnd("fail-entry", rip=0x10000,
                  detail={"hardware_entry_failure_reason": 0x21, "cpu": 0,
                          "meaning": "invalid guest state"})
    assert end.summary() == "fail-entry (0x21: invalid guest state) at 0x10000"


def test_a_host_error_keeps_its_own_text():
    end = VcpuEnd("host-error", detail={"error": "ValueError: boom", "meaning": "x"})
    assert end.summary() == "host-error: ValueError: boom"


def test_an_error_code_is_shown_only_where_the_cpu_pushes_one():
    # the stub pushes a 0 for #DE, #BP, #UD...: "error code 0x0" there was the stub's, not
    # the CPU's (SDM vol. 3, table 6-1)
    de = VcpuEnd("exception", vector=0, rip=0x10007, instruction="div ecx  ; line 4",
                 detail={"error_code": 0, "cr2": 0})
    assert de.summary() == "CPU exception #DE divide error at 0x10007 (div ecx  ; line 4)"
    gp = VcpuEnd("exception", vector=13, rip=0x10014, instruction="hlt  ; line 12",
                 detail={"error_code": 0, "cr2": 0})
    assert gp.summary() == ("CPU exception #GP general protection, error code 0x0 at 0x10014 "
                            "(hlt  ; line 12)")


def test_an_unexpected_exit_names_which_exit_it_was():
    # it said only "unexpected-exit at 0x10002": neither the exit's name nor its number
    end = VcpuEnd("unexpected-exit", rip=0x10002, instruction="jmp 0x10001  ; line 7",
                  detail={"exit": "KVM_EXIT_IRQ_WINDOW_OPEN (7)"})
    assert end.summary() == ("unexpected exit KVM_EXIT_IRQ_WINDOW_OPEN (7) at 0x10002 "
                             "(jmp 0x10001  ; line 7)")


def test_a_write_to_a_read_only_slot_is_not_outside_ram():
    # KVM_MEM_READONLY writes exit as MMIO (api.rst 4.35): "access outside RAM" was false
    end = VcpuEnd("unhandled-mmio", rip=0x1000d, instruction="mov qword ptr [rsi], rax",
                  detail={"phys_addr": 0x40000000, "len": 8, "is_write": True, "data": 1,
                          "slot": 1, "slot_name": "data", "read_only": True})
    assert end.summary() == ('write to read-only memory (slot 1 "data", KVM_MEM_READONLY): '
                             "8 byte(s) at 0x40000000 at 0x1000d (mov qword ptr [rsi], rax)")
    hole = VcpuEnd("unhandled-mmio", rip=0x10010,
                   detail={"phys_addr": 0xD0000000, "len": 4, "is_write": True, "data": 1})
    assert hole.summary() == ("access outside RAM (MMIO): write of 4 byte(s) at 0xd0000000 "
                              "at 0x10010")


def test_a_string_io_exit_counts_its_items():
    # a `rep insb` exit for 5 bytes said "1 byte(s)"
    end = VcpuEnd("unhandled-io", rip=0x10010, detail={
        "direction": "in", "port": 0x80, "size": 1, "count": 5})
    assert end.summary() == "unhandled port I/O: in port 0x80, 5 x 1 byte(s) at 0x10010"
    one = VcpuEnd("unhandled-io", rip=0x10000, detail={
        "direction": "in", "port": 0x80, "size": 2, "count": 1})
    assert one.summary() == "unhandled port I/O: in port 0x80, 2 byte(s) at 0x10000"


def test_an_emulation_failure_shows_the_bytes_kvm_fetched():
    from minivmm.vcpu import emulation_failure_bytes
    # struct emulation_failure (uapi kvm.h): flags, then insn_size and insn_bytes[15]
    data = [1, 0xF4E6C03100D90F, 0, 0x2000]
    assert emulation_failure_bytes(1, data) == \
        "d9 00 31 c0 e6 f4 00 00 00 00 00 00 00 00 00"
    assert emulation_failure_bytes(1, [1, 0x00D902, 0]) == "d9 00"
    assert emulation_failure_bytes(1, [0, 0x2000, 0]) is None     # no INSTRUCTION_BYTES flag
    assert emulation_failure_bytes(1, []) is None                 # ndata 0 (before 5.14)
    assert emulation_failure_bytes(3, data) is None               # not an emulation failure
    end = VcpuEnd("internal-error", rip=0x1000a, instruction="fld dword ptr [rax]",
                  detail={"suberror": 1, "suberror_name": "KVM_INTERNAL_ERROR_EMULATION",
                          "meaning": "KVM could not emulate an instruction",
                          "insn_bytes": "d9 00"})
    assert end.summary() == ("internal-error (KVM_INTERNAL_ERROR_EMULATION: KVM could not "
                             "emulate an instruction; bytes KVM fetched at RIP: d9 00) at "
                             "0x1000a (fld dword ptr [rax])")
