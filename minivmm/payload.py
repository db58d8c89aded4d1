"""Guest programs: read the header, assemble with keystone, disassemble with capstone.

Not a kernel ABI. The payload format (``;!`` header lines, Intel syntax) is
minivmm's contract with its users, documented in the README. Two keystone
hazards are handled here: it can loop forever on some malformed lines (so it
runs in a child process under a time limit) and it accepts some truncated
lines silently (so the result is checked against the source, line by line).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import re
import select
import signal
import sys
from pathlib import Path

import capstone
import keystone

from .x86 import layout as L

ASSEMBLE_TIMEOUT_S = 5.0
MODES = ("real", "protected", "long")
_HEADER = re.compile(r"^\s*;!\s*([A-Za-z_-]+)\s*:\s*(.*?)\s*$")
_LABEL = re.compile(r"^\s*([A-Za-z_.$@][\w.$@]*)\s*:\s*")
_DATA_DIRECTIVES = (".byte", ".word", ".short", ".long", ".int", ".quad", ".ascii",
                    ".asciz", ".string", ".fill", ".zero", ".space", ".align", ".balign",
                    ".p2align")


class PayloadError(ValueError):
    """A payload that cannot be used: the message is one line, naming file:line."""


@dataclasses.dataclass
class Instruction:
    address: int
    size: int
    raw: bytes
    mnemonic: str
    op_str: str
    line: int = 0          # source line number, 0 for none
    source: str = ""

    @property
    def text(self) -> str:
        return f"{self.mnemonic} {self.op_str}".strip()


@dataclasses.dataclass
class Payload:
    name: str
    path: str
    mode: str
    cpl: int
    vcpus: int | None
    description: str
    code: bytes
    load_address: int           # guest-physical address of the first byte
    origin: int                 # the address the code was assembled for (IP 0 in real mode)
    listing: list               # Instruction per source instruction line
    header: dict

    @property
    def bits(self) -> int:
        return {"real": 16, "protected": 32, "long": 64}[self.mode]

    def instruction_at(self, addr: int) -> Instruction | None:
        """The instruction starting at ``addr`` (in the payload's own address space)."""
        for ins in self.listing:
            if ins.address == addr:
                return ins
        return None

    def instruction_ending_at(self, addr: int) -> Instruction | None:
        """The instruction whose last byte is just before ``addr`` (after an out or MMIO write)."""
        for ins in self.listing:
            if ins.address + ins.size == addr:
                return ins
        return None

    def disassemble(self) -> list:
        return disassemble(self.code, self.origin, self.mode)


# -- reading --

def _strip_comment(line: str) -> str:
    """Remove a `;` comment outside quotes (keystone reads `;` as a statement separator)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == ";":
            return line[:i]
    return line


def parse_header(text: str, name: str = "<payload>") -> dict:
    header: dict = {}
    for no, line in enumerate(text.splitlines(), 1):
        m = _HEADER.match(line)
        if m:
            key, value = m.group(1).lower(), _strip_comment(m.group(2)).strip()
            header[key] = (value, no)
    return header


def _header_values(header: dict, name: str) -> tuple:
    mode, mode_line = header.get("mode", ("long", 0))
    mode = mode.lower()
    if mode not in MODES:
        raise PayloadError(f"{name}:{mode_line}: unknown mode {mode!r} "
                           f"(expected one of {', '.join(MODES)})")
    cpl_text, cpl_line = header.get("cpl", ("3" if mode == "long" else "0", 0))
    if cpl_text not in ("0", "3"):
        raise PayloadError(f"{name}:{cpl_line}: unknown cpl {cpl_text!r} (expected 0 or 3)")
    cpl = int(cpl_text)
    if mode != "long" and cpl != 0:
        raise PayloadError(f"{name}:{cpl_line}: cpl 3 is only supported in long mode")
    vcpus = None
    if "vcpus" in header:
        text, line = header["vcpus"]
        if not text.isdigit() or int(text) < 1:
            raise PayloadError(f"{name}:{line}: vcpus must be a positive integer, got {text!r}")
        vcpus = int(text)
    return mode, cpl, vcpus, header.get("description", ("", 0))[0]


def find_payload(name_or_path: str, search_dir: str | None = None) -> Path:
    """A path as given, or a bare name looked up in guest_payloads/."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    base = Path(search_dir) if search_dir else payload_dir()
    for cand in (base / name_or_path, base / f"{name_or_path}.asm"):
        if cand.is_file():
            return cand
    raise PayloadError(f"{name_or_path}: payload file not found (looked in . and {base})")


def payload_dir() -> Path:
    env = os.environ.get("MINIVMM_PAYLOADS")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent
    for cand in (here.parent / "guest_payloads",                       # a source checkout
                 Path(sys.prefix) / "share" / "minivmm" / "guest_payloads"):   # an install
        if cand.is_dir():
            return cand
    return here.parent / "guest_payloads"


def load(name_or_path: str) -> Payload:
    path = find_payload(name_or_path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise PayloadError(f"{path}: cannot read: {e}") from None
    return assemble_source(text, str(path))


# -- assembling --

_cache: dict = {}


def assemble_source(text: str, name: str = "<payload>") -> Payload:
    """Assemble a payload's source text; raise PayloadError with file:line on any problem."""
    header = parse_header(text, name)
    mode, cpl, vcpus, description = _header_values(header, name)
    origin = 0 if mode == "real" else L.CODE
    key = hashlib.sha256(f"{mode}\0{text}".encode()).hexdigest()
    if key not in _cache:
        lines = [(no, _strip_comment(line).rstrip()) for no, line in
                 enumerate(text.splitlines(), 1)]
        stmts = [(no, s) for no, s in lines if s.strip()]
        _check_syntax(stmts, name)
        code = _assemble_with_watchdog("\n".join(s for _, s in stmts), mode, origin, stmts, name)
        if not code:
            raise PayloadError(f"{name}: the payload has no instructions")
        if len(code) > L.CODE_MAX:
            raise PayloadError(f"{name}: {len(code)} bytes of code, more than the "
                               f"{L.CODE_MAX} bytes reserved for a payload")
        listing = _listing(code, mode, origin, stmts, name)
        _cache[key] = (code, listing)
    code, listing = _cache[key]
    return Payload(name=Path(name).stem, path=name, mode=mode, cpl=cpl, vcpus=vcpus,
                   description=description, code=code, load_address=L.CODE, origin=origin,
                   listing=listing, header={k: v for k, (v, _) in header.items()})


def _check_syntax(stmts, name) -> None:
    """Catch input keystone mis-handles: truncated operands and unbalanced brackets."""
    for no, s in stmts:
        body = _LABEL.sub("", s).strip()
        if not body:
            continue
        if body.count("[") != body.count("]"):
            raise PayloadError(f"{name}:{no}: unbalanced brackets in {body!r}")
        if body[-1] in "+-*,[(":
            raise PayloadError(f"{name}:{no}: incomplete operand in {body!r}")
        if body.startswith("!"):
            raise PayloadError(f"{name}:{no}: unexpected '!' (header lines start with ';!')")


def _ks(mode: str):
    ks_mode = {"real": keystone.KS_MODE_16, "protected": keystone.KS_MODE_32,
               "long": keystone.KS_MODE_64}[mode]
    return keystone.Ks(keystone.KS_ARCH_X86, ks_mode)


def _assemble_child(source: str, mode: str, origin: int, stmts) -> tuple:
    """Runs in the child: ('ok', bytes) or ('error', line, message)."""
    try:
        enc, _ = _ks(mode).asm(source, origin)
        return ("ok", bytes(enc or b""))
    except keystone.KsError as e:
        message = str(e).split(" (KS_ERR")[0]
    # Find the failing line: assemble growing prefixes with unknown symbols resolved to 0
    # (safe only here, in the short-lived child: a resolver changes keystone's radix).
    ks = _ks(mode)
    ks.sym_resolver = lambda symbol, value: True
    for i in range(1, len(stmts) + 1):
        try:
            ks.asm("\n".join(s for _, s in stmts[:i]), origin)
        except keystone.KsError as e:
            return ("error", stmts[i - 1][0], str(e).split(" (KS_ERR")[0])
    return ("error", stmts[-1][0] if stmts else 0, message)


def _assemble_with_watchdog(source, mode, origin, stmts, name) -> bytes:
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(rfd)
            data = pickle.dumps(_assemble_child(source, mode, origin, stmts))
            with os.fdopen(wfd, "wb") as f:
                f.write(data)
        finally:
            os._exit(0)
    os.close(wfd)
    chunks = []
    try:
        deadline_left = ASSEMBLE_TIMEOUT_S
        while True:
            ready, _, _ = select.select([rfd], [], [], deadline_left)
            if not ready:
                os.kill(pid, signal.SIGKILL)
                raise PayloadError(f"{name}: the assembler did not finish within "
                                   f"{ASSEMBLE_TIMEOUT_S:.0f} s (keystone loops on some "
                                   "malformed lines; check the syntax)")
            chunk = os.read(rfd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(rfd)
        os.waitpid(pid, 0)
    if not chunks:
        raise PayloadError(f"{name}: the assembler crashed")
    result = pickle.loads(b"".join(chunks))
    if result[0] == "error":
        raise PayloadError(f"{name}:{result[1]}: {result[2]}")
    return result[1]


def _cs(mode: str):
    cs_mode = {"real": capstone.CS_MODE_16, "protected": capstone.CS_MODE_32,
               "long": capstone.CS_MODE_64}[mode]
    return capstone.Cs(capstone.CS_ARCH_X86, cs_mode)


def disassemble(code: bytes, origin: int, mode: str) -> list:
    return [Instruction(i.address, i.size, bytes(i.bytes), i.mnemonic, i.op_str)
            for i in _cs(mode).disasm(code, origin)]


def disassemble_one(code: bytes, address: int, mode: str) -> Instruction | None:
    for i in _cs(mode).disasm(code, address, 1):
        return Instruction(i.address, i.size, bytes(i.bytes), i.mnemonic, i.op_str)
    return None


def _directive_size(ks, body: str, address: int) -> int:
    try:
        enc, _ = ks.asm(body, address)
    except keystone.KsError:
        word, _, args = body.partition(" ")
        if '"' in args:
            raise
        enc, _ = ks.asm(f"{word} " + re.sub(r"[A-Za-z_.$@][\w.$@]*", "0", args), address)
    return len(enc or b"")


def _listing(code: bytes, mode: str, origin: int, stmts, name) -> list:
    """Tie each source instruction line to exactly one decoded instruction.

    Data directives are sized by assembling them alone; everything must add up
    to the assembled length, or the assembler's output is not what the source says.
    """
    # No sym_resolver here: setting one makes keystone 0.9.2 read later decimal
    # immediates as hex (`mov al, 10` -> 0x10), process-wide. Symbols in a data
    # directive are replaced by 0 instead; only the size matters here.
    ks = _ks(mode)
    md = _cs(mode)
    listing = []
    offset = 0
    for no, s in stmts:
        body = s.strip()
        while True:  # peel labels
            m = _LABEL.match(body)
            if not m or body.startswith("."):
                break
            body = body[m.end():].strip()
        if not body:
            continue
        word = body.split()[0].lower()
        if word.startswith("."):
            if word in (".align", ".balign", ".p2align"):
                arg = int(body.split()[1].rstrip(","), 0)
                align = 1 << arg if word == ".p2align" else arg
                addr = origin + offset
                offset += (-addr) % align
            elif word in _DATA_DIRECTIVES:
                offset += _directive_size(ks, body, origin + offset)
            continue
        decoded = next(md.disasm(code[offset:offset + 16], origin + offset, 1), None)
        if decoded is None:
            raise PayloadError(f"{name}:{no}: assembler output does not decode as an "
                               f"instruction for {body!r}")
        listing.append(Instruction(decoded.address, decoded.size, bytes(decoded.bytes),
                                   decoded.mnemonic, decoded.op_str, no, body))
        offset += decoded.size
    if offset != len(code):
        raise PayloadError(f"{name}: assembler output ({len(code)} bytes) does not match the "
                           f"source ({offset} bytes accounted for)")
    return listing


def list_payloads(directory: str | None = None) -> list:
    """(name, mode, cpl, description) for every payload in the directory."""
    base = Path(directory) if directory else payload_dir()
    rows = []
    for path in sorted(base.glob("*.asm")):
        header = parse_header(path.read_text(), str(path))
        try:
            mode, cpl, vcpus, desc = _header_values(header, str(path))
        except PayloadError as e:
            mode, cpl, vcpus, desc = "?", "?", None, f"(bad header: {e})"
        rows.append((path.stem, mode, cpl, vcpus, desc))
    return rows
