"""x86/debug.py: a #DB's cause from DR6 and DR7, as SDM vol. 3, 18.2 and table 18-2 define
them (no KVM needed)."""
import pytest

from minivmm.x86 import debug

INIT = debug.DR6_INIT
DB = (0x10013, 0x4000_0000, 0, 0)


def dr7(n, rw, size=0):
    """DR7 enabling breakpoint n locally with this R/W and LEN field."""
    return 1 << (2 * n) | rw << (16 + 4 * n) | size << (18 + 4 * n)


@pytest.mark.parametrize("dr6,dr7_,kind,fault", [
    (INIT | debug.DR6_BS, 0, "single-step", False),
    (INIT | 1, dr7(0, 0), "code-breakpoint", True),
    (INIT | 2, dr7(1, 1, 3), "data-breakpoint", False),      # writes, 4 bytes
    (INIT | 2, dr7(1, 3, 3), "data-breakpoint", False),      # reads and writes
    (INIT | 4, dr7(2, 2), "io-breakpoint", False),
    (INIT | debug.DR6_BD, 0, "general-detect", True),
    (INIT | debug.DR6_BT, 0, "task-switch", False),
    (INIT, 0, "icebp", False),                               # INT1 sets no DR6 bit
    # B0 without DR7 enabling DR0: the CPU may set it anyway; it is no cause
    (INIT | 1, 0, "icebp", False),
    # a trap of the instruction that ran wins over a code breakpoint at the next one
    (INIT | debug.DR6_BS | 1, dr7(0, 0), "single-step", False),
    (INIT | 1 | 2, dr7(0, 0) | dr7(1, 1), "data-breakpoint", False),
])
def test_kind_and_fault_or_trap(dr6, dr7_, kind, fault):
    cause = debug.classify(dr6, dr7_, DB)
    assert (cause.kind, cause.fault) == (kind, fault)
    assert cause.dr6 == dr6 and cause.dr7 == dr7_


def test_breakpoints_say_which_register_address_type_and_length():
    cause = debug.classify(INIT | 2, dr7(1, 1, 3), DB)
    assert cause.breakpoints == [{"dr": 1, "address": 0x4000_0000, "type": "write", "len": 4}]
    # an instruction breakpoint is one byte whatever LEN says
    assert debug.classify(INIT | 1, dr7(0, 0, 3), DB).breakpoints[0]["len"] == 1


def test_describe_says_kind_fault_or_trap_and_dr6():
    text = debug.describe(debug.classify(INIT | 1, dr7(0, 0), DB).to_dict())
    assert text == ("code-breakpoint DR0 (execute 0x10013), a fault (the instruction at RIP "
                    "has not run), DR6 0xffff0ff1")
    text = debug.describe(debug.classify(INIT | debug.DR6_BS, 0, DB).to_dict())
    assert text == "single-step, a trap (the instruction before RIP ran), DR6 0xffff4ff0"


def test_unknown_without_dr6_is_named_as_a_trap():
    cause = debug.unknown("DR6 unreadable (x)")
    assert cause.kind == "unknown" and not cause.fault and cause.dr6 is None
    assert debug.describe(cause.to_dict()) == "unknown, DR6 unreadable (x): named as a trap"


def test_only_single_step_or_an_unreadable_dr6_is_a_step():
    assert debug.classify(INIT | debug.DR6_BS, 0, DB).is_step
    assert debug.unknown("DR6 unreadable (x)").is_step
    # DR6 was read and says no single-step: the cause was not found, but it is no step
    assert not debug.DebugCause("unknown", False, INIT, 0x400).is_step
    assert not debug.classify(INIT, 0, DB).is_step


def test_dr7_le_ge_and_dr6_reserved_bit_4_name_no_breakpoint():
    # DR6 bit 4 is reserved and reads 1 (DR6_INIT), DR7 bits 8-9 are LE/GE: neither is a
    # fifth breakpoint (only DR0-DR3 exist)
    cause = debug.classify(INIT | debug.DR6_BS, 3 << 8, DB)
    assert cause.kind == "single-step" and cause.breakpoints == []


@pytest.mark.parametrize("kind,words", [
    ("icebp", "icebp (INT1), trap-like, DR6 0xffff0ff0"),
    ("int-1", "int-1 (a software interrupt through the #DB gate: no debug condition), "
              "DR6 0xffff0ff0"),
])
def test_describe_names_icebp_and_int_1(kind, words):
    info = {"kind": kind, "fault": False, "dr6": INIT, "dr7": 0, "breakpoints": []}
    assert debug.describe(info) == words


def test_dr3_is_a_breakpoint_too():
    cause = debug.classify(INIT | 8, dr7(3, 1, 1), (0, 0, 0, 0x7000))
    assert cause.kind == "data-breakpoint"
    assert cause.breakpoints == [{"dr": 3, "address": 0x7000, "type": "write", "len": 2}]
