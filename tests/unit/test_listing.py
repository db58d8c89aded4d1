"""The listing `minivmm disasm` prints: every row the bytes the CPU runs, on its source line."""
import pytest

from minivmm import payload as P


def asm(body, header=";! mode: long\n"):
    return P.assemble_source(header + body, "t.asm")


def _rows_match_code(p):
    for ins in p.listing:
        at = ins.address - p.origin
        assert p.code[at:at + ins.size] == ins.raw


@pytest.mark.parametrize("header", [";! mode: long\n", ";! mode: protected\n",
                                    ";! mode: real\n"])
def test_a_hash_comment_line_is_not_listed_as_the_next_bytes(header):
    # keystone skips `# ...` as a comment; the listing took the line for an instruction and
    # listed the alignment's padding (`nop dword ptr [rax]`) as line 2
    p = asm("nop\n# a comment\n.balign 4\nhlt\n", header)
    assert [(i.line, i.mnemonic) for i in p.listing] == [(2, "nop"), (5, "hlt")]
    assert p.listing[1].address == p.origin + 4
    _rows_match_code(p)


def test_a_hash_comment_does_not_escape_the_value_check():
    with pytest.raises(P.PayloadError, match=r"t.asm:2: value 0x1234 does not fit"):
        asm("mov al, 0x1234 # a comment\nhlt\n")
    p = asm(".byte 1 # one byte\nmov al, '#'\n.ascii \"#;\"  # quoted: not comments\nhlt\n")
    assert p.code == b"\x01\xb0\x23#;\xf4"
    assert [i.source for i in p.listing] == ["mov al, '#'", "hlt"]


@pytest.mark.parametrize("header", [";! mode: long\n", ";! mode: real\n"])
def test_wait_forms_of_x87_instructions_are_listed_as_the_cpu_runs_them(header):
    # `fstsw ax` is `wait` then `fnstsw ax`: refused as "assembler output (4 bytes) does not
    # match the source (3 bytes accounted for)", no line named
    p = asm("finit\nfstsw ax\nfwait\nhlt\n", header)
    assert [(i.line, i.text) for i in p.listing] == [
        (2, "wait"), (2, "fninit"), (3, "wait"), (3, "fnstsw ax"), (4, "wait"), (5, "hlt")]
    _rows_match_code(p)
    assert p.instruction_ending_at(p.listing[-1].address).text == "wait"


def test_disasm_shows_every_loaded_byte_data_included(tmp_path, capsys):
    # the data and padding bytes were left out: "37 bytes loaded", 15 listed
    from minivmm import cli
    src = tmp_path / "d.asm"
    src.write_text(";! mode: real\nmov si, msg\n.balign 4\nhlt\nmsg: .ascii \"0123456789\"\n")
    assert cli.main(["disasm", str(src)]) == 0
    head, *rows = capsys.readouterr().out.splitlines()
    assert head.endswith("15 bytes loaded at 0x10000 (addresses are IP, CS = 0x1000)")
    p = P.load(str(src))
    listed = b""
    for row in rows:
        address, rest = row.split("  ", 1)
        assert int(address, 16) == p.origin + len(listed)
        listed += bytes.fromhex(rest[:24])
    assert listed == p.code
    assert rows[1].endswith("(data)") and "hlt" in rows[2] and rows[-1].endswith("(data)")
