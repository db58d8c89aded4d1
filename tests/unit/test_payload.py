"""Payload headers, assembly errors, the keystone watchdog and the listing (no KVM needed)."""
import pytest

from minivmm import payload as P
from tests.conftest import PAYLOADS


def asm(body, header=";! mode: long\n"):
    return P.assemble_source(header + body, "t.asm")


def test_every_shipped_payload_assembles_with_a_complete_listing():
    names = sorted(p.stem for p in PAYLOADS.glob("*.asm"))
    assert {"hello_real", "hello_protected", "hello_long", "multi_vcpu", "exception", "spin",
            "mmio"} <= set(names)
    for name in names:
        p = P.load(str(PAYLOADS / f"{name}.asm"))
        assert p.listing, name
        # instructions are contiguous except where data sits between them
        assert all(i.line > 0 and i.source for i in p.listing)


def test_header_defaults_and_values():
    p = asm("nop\n", header="")
    assert (p.mode, p.cpl, p.vcpus) == ("long", 3, None)
    p = asm("nop\n", header=";! mode: long   ; a comment\n;! cpl: 0\n;! vcpus: 3\n"
                            ";! description: says #hi\n")
    assert (p.mode, p.cpl, p.vcpus, p.description) == ("long", 0, 3, "says #hi")
    p = asm("nop\n", header=";! mode: real\n")
    assert (p.mode, p.cpl, p.origin, p.bits) == ("real", 0, 0, 16)


@pytest.mark.parametrize("header,match", [
    (";! mode: banana\n", r"t.asm:1: unknown mode 'banana'"),
    (";! cpl: 2\n", r"t.asm:1: unknown cpl '2'"),
    (";! mode: real\n;! cpl: 3\n", r"t.asm:2: cpl 3 is only supported in long mode"),
    (";! vcpus: zero\n", r"t.asm:1: vcpus must be a positive integer"),
])
def test_bad_headers(header, match):
    with pytest.raises(P.PayloadError, match=match):
        asm("nop\n", header=header)


def test_assembly_error_names_file_and_line():
    with pytest.raises(P.PayloadError, match=r"^t.asm:4: "):
        asm("nop\nnop\nmov rax, rbx, rcx\nnop\n")   # header is line 1


def test_undefined_label_is_an_error_with_a_line():
    with pytest.raises(P.PayloadError, match=r"t.asm:3: "):
        asm("nop\njmp nowhere\n")


def test_truncated_operand_is_rejected_not_silently_assembled():
    # keystone alone would assemble this to a 7-byte instruction
    with pytest.raises(P.PayloadError, match=r"t.asm:2: (unbalanced brackets|incomplete)"):
        asm("mov rax, [rip+\n")
    with pytest.raises(P.PayloadError, match=r"t.asm:2: incomplete operand"):
        asm("add rax,\n")


def test_unbalanced_brackets():
    with pytest.raises(P.PayloadError, match=r"t.asm:2: unbalanced brackets"):
        asm("mov rax, [rbx\n")


def test_bang_line_that_hangs_keystone_is_refused():
    with pytest.raises(P.PayloadError, match=r"t.asm:2: unexpected '!'"):
        asm("! mode: long\n")


def test_watchdog_stops_a_hanging_assembler(monkeypatch):
    # feed keystone the input that loops forever, bypassing the syntax check
    monkeypatch.setattr(P, "ASSEMBLE_TIMEOUT_S", 1.0)
    with pytest.raises(P.PayloadError, match="did not finish within"):
        P._assemble_with_watchdog("! mode: long", "long", 0x10000, [(1, "! mode: long")], "h.asm")


def test_empty_payload():
    with pytest.raises(P.PayloadError, match="no instructions"):
        asm("; only a comment\n")


def test_missing_payload_file():
    with pytest.raises(P.PayloadError, match="not found"):
        P.load("/nonexistent/nothing.asm")


def test_semicolon_comments_are_not_statement_separators():
    p = asm("nop ; xor eax, eax\n")
    assert [i.text for i in p.listing] == ["nop"]


def test_decimal_immediates_stay_decimal_after_listings():
    # keystone reads decimals as hex once a sym_resolver was set anywhere in the process
    for _ in range(2):
        p = asm("mov al, 10\nlbl:\n.quad lbl\nmov cl, 10\n")
        assert p.code[:2] == b"\xb0\x0a" and p.listing[-1].raw == b"\xb1\x0a"


def test_listing_maps_lines_and_skips_data():
    p = asm("start:\n  lea rsi, [rip + msg]\n  jmp start\nmsg:\n  .asciz \"hi\"\n  nop\n")
    assert [(i.line, i.mnemonic) for i in p.listing] == [(3, "lea"), (4, "jmp"), (7, "nop")]
    lea, jmp, nop = p.listing
    assert lea.address == 0x10000 and jmp.address == lea.address + lea.size
    assert nop.address == jmp.address + jmp.size + 3     # "hi\0"
    assert p.instruction_ending_at(jmp.address + jmp.size) is jmp
    assert p.instruction_at(nop.address) is nop


def test_real_mode_code_is_assembled_for_ip_zero():
    p = asm("jmp here\nhere:\n  hlt\n", header=";! mode: real\n")
    assert p.listing[0].address == 0 and p.load_address == 0x10000


def test_list_payloads_reports_headers():
    rows = {r[0]: r for r in P.list_payloads(str(PAYLOADS))}
    assert rows["hello_real"][1] == "real" and rows["multi_vcpu"][3] == 4
