"""Guest programs: read the header, assemble with keystone, disassemble with capstone.

Not a kernel ABI. The payload format (``;!`` header lines, Intel syntax) is
minivmm's contract with its users, documented in the README. Two keystone
hazards are handled here: it can loop forever on some malformed lines (so it
runs in a child process under a time limit) and it accepts some truncated
lines silently (so the result is checked against the source, line by line).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import operator
import os
import pickle
import re
import select
import sys
import threading
from pathlib import Path

import capstone
import keystone
from capstone import x86 as cs_x86

from . import _sys
from .x86 import layout as L

# Every capstone.Cs() tries `from . import ccapstone` (an optional Cython build) and
# swallows the failure: a full import, under Python's import locks, at each decode. A
# Ctrl-C landing in that import in the main thread can leave the global import lock
# held for good (CPython), and every vCPU thread's next decode (its end) then waits on
# it for ever. Settled once here: with the package attribute set, `from . import` looks
# no further (None in sys.modules alone still took the module lock on Python 3.10).
try:
    importlib.import_module("capstone.ccapstone")
except ImportError:
    sys.modules.setdefault("capstone.ccapstone", None)
    if not hasattr(capstone, "ccapstone"):
        capstone.ccapstone = None

ASSEMBLE_TIMEOUT_S = 5.0
# the listing, made under the same watchdog, checks every line again: about 0.1 ms a
# line here (32000 jmps near CODE_MAX: 4 s), so the limit grows by ten times that
LISTING_S_PER_LINE = 0.001
MODES = ("real", "protected", "long")
_HEADER = re.compile(r"^\s*;!\s*([A-Za-z_-]+)\s*:\s*(.*?)\s*$")
_LABEL = re.compile(r"^\s*([A-Za-z_.$@][\w.$@]*)\s*:\s*")
_DATA_DIRECTIVES = (".byte", ".word", ".short", ".long", ".int", ".quad", ".ascii",
                    ".asciz", ".string", ".fill", ".zero", ".space", ".skip", ".align",
                    ".balign", ".p2align")
_SIZE_DIRECTIVES = (".space", ".skip", ".zero")   # size[, fill byte]
# `.code16` etc. say again what the header says; another width would be decoded wrongly
_CODE_DIRECTIVES = {".code16": "real", ".code32": "protected", ".code64": "long"}
# Every directive a payload may use; keystone mishandles the others without a word: it
# ignores many (.foo, .globl, .err, .if, .comm), drops the rest of the file (.end,
# .stabs), emits bytes the listing cannot account for (.sleb128, .double, .rept), loops
# (.tfloat, .zero -1) or aborts with LLVM's diagnostic (.cfi_*)
_SUPPORTED_DIRECTIVES = _DATA_DIRECTIVES + (".equ", ".set", ".equiv", ".intel_syntax") \
    + tuple(_CODE_DIRECTIVES)
# what to write instead, for directives a GAS user is likely to reach for
_DIRECTIVE_HINTS = {
    ".asciiz": "use .asciz", ".hword": "use .word", ".2byte": "use .word",
    ".value": "use .word", ".4byte": "use .long", ".8byte": "use .quad",
    ".octa": "use two .quad", ".eqv": "use .equ",
    ".org": "use .space or .align to move ahead", ".end": "delete it",
    ".att_syntax": "payloads are Intel syntax", ".nops": "use .fill N, 1, 0x90",
    ".float": "write the bits with .long", ".single": "write the bits with .long",
    ".double": "write the bits with .quad",
    ".rept": "no macros or repetition: write the lines out",
    ".irp": "no macros or repetition: write the lines out",
    ".irpc": "no macros or repetition: write the lines out",
    ".macro": "no macros or repetition: write the lines out",
    ".globl": "a payload has no symbol table: delete it",
    ".global": "a payload has no symbol table: delete it",
}
_ALIGN_DIRECTIVES = (".align", ".balign", ".p2align")
# keystone has no fill-width variants: LLVM aborts the whole process on them
_WIDE_ALIGN = (".balignw", ".balignl", ".p2alignw", ".p2alignl")
# Section switches: a payload is one flat image
_SECTION_DIRECTIVES = (".section", ".text", ".data", ".bss", ".previous", ".pushsection",
                       ".popsection", ".subsection")
ALIGN_MAX = 4096           # keystone pads to any alignment, even gigabytes of it
# `.equ X, 5`, `.set X, 5`, `.equiv X, 5`, `X = 5`: constants, no bytes
_CONST_DEF = re.compile(r"^(?:\.(?:equ|set|equiv)\s+([A-Za-z_.$@][\w.$@]*)\s*,"
                        r"|([A-Za-z_.$@][\w.$@]*)\s*=)\s*(.*)$", re.IGNORECASE)
# The literals keystone reads: 10h, 0x10, 0b10, 010 (octal), 10, 'a'. Anything
# else (1f, 08, 'ab') is left unevaluated, so never refused by the value check.
_NUMBER = (r"[0-9][0-9a-f]*h|0x[0-9a-f]+|0b[01]+|0[0-7]*|[1-9][0-9]*|'[^'\\]'")
_TOKEN = re.compile(rf"\s*(?:(?P<num>{_NUMBER})(?![\w.$@'])|(?P<name>[A-Za-z_.$@][\w.$@]*)"
                    r"|(?P<op><<|>>|[-+*/%&|^~()]))", re.IGNORECASE)
# a name in an expression (not the x of 0x10 nor the h of 10h)
_NAME = re.compile(r"(?<![\w.$@'])[A-Za-z_.$@][\w.$@]*")
_LITERAL = re.compile(rf"(?<![\w.$@])(?:{_NUMBER})(?![\w.$@'])", re.IGNORECASE)
# `ds:0x1234` without brackets is a memory operand too
_SEG_ABS = re.compile(r"^(?:\w+\s+ptr\s+)?[c-gs]s\s*:\s*([^\[\]]+)$", re.IGNORECASE)
_REL8_ONLY = ("loop", "loope", "loopne", "jcxz", "jecxz", "jrcxz")
_ADDR_MASK = {"real": 0xFFFF, "protected": 0xFFFFFFFF, "long": (1 << 64) - 1}
_MASK64 = (1 << 64) - 1
_REGISTER = re.compile(r"^(?:[re]?[a-d]x|[a-d][lh]|[re]?(?:si|di|bp|sp)|(?:si|di|bp|sp)l"
                       r"|r(?:[89]|1[0-5])[bwdl]?|[c-gs]s|[re]?ip|(?:cr|dr)\d+|st|mm\d"
                       r"|[xyz]mm\d+|k[0-7])$", re.IGNORECASE)
# `$` (NASM's current address, AT&T's immediate) where no name starts: `jmp $`, `$1`
_BARE_DOLLAR = re.compile(r"(?<![\w.$@])\$(?![A-Za-z_.$@])")
_PREFIXES = {"lock", "rep", "repe", "repz", "repne", "repnz", "notrack", "bnd", "data16",
             "data32", "addr16", "addr32", "xacquire", "xrelease"}


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
    labels: dict = dataclasses.field(default_factory=dict)   # name -> address, as listed

    @property
    def bits(self) -> int:
        return {"real": 16, "protected": 32, "long": 64}[self.mode]

    def instruction_at(self, addr: int) -> Instruction | None:
        """The instruction starting at ``addr`` (in the payload's own address space)."""
        return self._starts.get(addr)

    def instruction_ending_at(self, addr: int) -> Instruction | None:
        """The instruction whose last byte is just before ``addr`` (after an out or MMIO write)."""
        return self._ends.get(addr)

    def instruction_containing(self, addr: int) -> Instruction | None:
        """The instruction one of whose bytes is at ``addr``."""
        for ins in self.listing:
            if ins.address <= addr < ins.address + ins.size:
                return ins
        return None

    # a stepper and a trace look an address up per step or exit: dicts, made once
    @functools.cached_property
    def _starts(self) -> dict:
        return {ins.address: ins for ins in self.listing}

    @functools.cached_property
    def _ends(self) -> dict:
        return {ins.address + ins.size: ins for ins in self.listing}

    def disassemble(self) -> list:
        return disassemble(self.code, self.origin, self.mode)


# -- reading --

def _quotes(text: str) -> tuple:
    """(``text`` with what is inside quotes blanked out, same length; the index of a `;`
    or `#` (keystone's comment character, as GAS's) outside quotes or None; the quote left
    open at the end or None). In a "string" a backslash escapes the next character, as
    keystone and GAS read it: `"a\\";b"` is one string (cut at its `;`, the rest looped
    keystone until the watchdog). So it does in a 'c' character: `'\\''` is a quote (its
    comment was kept, "Invalid mnemonic")."""
    out, quote, escaped = [], None, False
    for i, ch in enumerate(text):
        if quote:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = None
            if quote:
                ch = "_"
        elif ch in "\"'":
            quote = ch
        elif ch in ";#":
            return "".join(out) + text[i:], i, None
        out.append(ch)
    return "".join(out), None, quote


def _strip_comment(line: str) -> str:
    """Remove a `;` comment outside quotes (keystone reads `;` as a statement separator),
    and a `#` one: keystone skips it, but a line left with one was listed as an instruction
    (the next bytes), and `mov al, 0x1234 # c` escaped the value check."""
    cut = _quotes(line)[1]
    return line if cut is None else line[:cut]


HEADER_KEYS = ("mode", "cpl", "vcpus", "description")


def parse_header(text: str, name: str = "<payload>") -> dict:
    header: dict = {}
    for no, line in enumerate(text.removeprefix("\ufeff").splitlines(), 1):
        m = _HEADER.match(line)
        if m:
            key, value = m.group(1).lower(), m.group(2)
            if key not in HEADER_KEYS:
                raise PayloadError(f"{name}:{no}: unknown header {key!r} (expected one of "
                                   f"{', '.join(HEADER_KEYS)})")
            if key in header:     # which one would win is a guess: refuse both
                raise PayloadError(f"{name}:{no}: header {key!r} given again (first on "
                                   f"line {header[key][1]})")
            if key != "description":      # a description is prose: its ';' is text
                value = _strip_comment(value).strip()
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
        # isdigit() is true for '²' and other Unicode digits int() refuses
        digits = text.lstrip("0")   # int() raises past 4300 digits; KVM allows far fewer
        if not (text.isascii() and text.isdigit()) or not 1 <= len(digits) <= 9:
            raise PayloadError(f"{name}:{line}: vcpus must be a positive integer of at most 9 "
                               f"digits, got {text!r}")
        vcpus = int(digits)
    return mode, cpl, vcpus, header.get("description", ("", 0))[0]


def find_payload(name_or_path: str, search_dir: str | None = None) -> Path:
    """A path as given, or a bare name looked up in guest_payloads/."""
    if not name_or_path.strip():     # Path("") is ".": "is a directory" named no mistake
        raise PayloadError(f"no payload named (got {name_or_path!r}): give a payload name "
                           "(minivmm payloads lists them) or a source file")
    p = Path(name_or_path)
    if p.is_file() or p.is_fifo():      # a pipe too: `minivmm run <(generate)`
        return p
    if p.exists() and not p.is_dir():   # reading /dev/zero would never end
        raise PayloadError(f"{name_or_path}: not a regular file (a device or a socket); "
                           "give a payload source file")
    base = Path(search_dir) if search_dir else payload_dir()
    for cand in (base / name_or_path, base / f"{name_or_path}.asm"):
        if cand.is_file():
            return cand
    for cand in (p, base / f"{name_or_path}.asm"):
        if cand.is_dir():
            raise PayloadError(f"{cand}: is a directory, not a payload file")
    if "\n" in name_or_path:     # source text where a name was expected
        raise PayloadError("payload file not found: the name given has several lines; to run "
                           "source text, pass assemble_source(text) instead")
    raise PayloadError(f"{name_or_path}: payload file not found (looked in . and {base})")


def payload_dir() -> Path:
    env = os.environ.get("MINIVMM_PAYLOADS")
    if env:
        return Path(env)
    return _shipped_payload_dir(Path(__file__).resolve().parent)


def _shipped_payload_dir(package: Path) -> Path:
    """guest_payloads/ beside the package in a source checkout; in an install, where pip put
    the wheel's data files (pyproject.toml): the prefix that holds
    lib/pythonX.Y/site-packages/minivmm, which is not sys.prefix for `pip install --user`,
    `--prefix` or Debian's /usr/local; beside the package for `--target`."""
    site = package.parent
    shipped = Path("share", "minivmm", "guest_payloads")
    cands = [site / "guest_payloads"]                           # a source checkout
    if len(site.parents) >= 3:
        cands.append(site.parents[2] / shipped)                 # PREFIX/lib/pythonX.Y/site-packages
    cands += [site / shipped, Path(sys.prefix) / shipped]       # --target DIR; sys.prefix
    for cand in cands:
        if cand.is_dir():
            return cand
    return cands[0]


def load(name_or_path: "str | os.PathLike") -> Payload:
    """The payload file named (a path, or a name in guest_payloads/), assembled."""
    if isinstance(name_or_path, os.PathLike):
        name_or_path = os.fspath(name_or_path)
    if not isinstance(name_or_path, str):
        raise TypeError(f"a payload is a name, a path or a Payload (assemble_source), not "
                        f"{type(name_or_path).__name__}")
    path = find_payload(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PayloadError(f"{path}: cannot read: {e}") from None
    return assemble_source(text, str(path))


# -- assembling --

_cache: dict = {}


def assemble_source(text: str, name: str = "<payload>") -> Payload:
    """Assemble a payload's source text; raise PayloadError with file:line on any problem."""
    text = text.removeprefix("\ufeff")        # a UTF-8 byte order mark, from some editors
    header = parse_header(text, name)
    mode, cpl, vcpus, description = _header_values(header, name)
    origin = 0 if mode == "real" else L.CODE
    key = hashlib.sha256(f"{mode}\0{text}".encode()).hexdigest()
    if key not in _cache:
        lines = [(no, _strip_comment(line).rstrip()) for no, line in
                 enumerate(text.splitlines(), 1)]
        stmts = [(no, s) for no, s in lines if s.strip()]
        _check_syntax(stmts, name, mode)
        _ks_decimal(mode)
        _cache[key] = _assemble_with_watchdog("\n".join(s for _, s in stmts), mode, origin,
                                              stmts, name)
    code, listing, labels = _cache[key]
    return Payload(name=Path(name).stem, path=name, mode=mode, cpl=cpl, vcpus=vcpus,
                   description=description, code=code, load_address=L.CODE, origin=origin,
                   listing=listing, header={k: v for k, (v, _) in header.items()},
                   labels=dict(labels))


def _mask_quotes(text: str) -> str:
    """``text`` with what is inside quotes blanked out (same length): `'['` is no bracket."""
    if "'" not in text and '"' not in text:
        return text
    masked, cut, _ = _quotes(text)
    # past a `;` (a line not stripped of its comment) the rest is masked on its own
    return masked if cut is None else masked[:cut] + ";" + _mask_quotes(text[cut + 1:])


def _check_syntax(stmts, name, mode: str) -> None:
    """Catch input keystone mis-handles: truncated operands, unbalanced brackets,
    non-ASCII text, out-of-range literals and alignments it cannot or should not pad to,
    directives outside _SUPPORTED_DIRECTIVES, and prefixes alone on a line."""
    env, changes = _constants(stmts)
    defined: dict = {}          # constant name -> line of its first definition
    # the same, over the whole source
    first_def = {key: no for no, key, _ in reversed(_const_defs(stmts))}
    for no, s in stmts:
        odd = next((ch for ch in s if ord(ch) > 127), None)
        if odd:   # keystone's binding takes ASCII only, and dies without a word
            raise PayloadError(f"{name}:{no}: non-ASCII character {odd!r} outside a comment")
        odd = next((ch for ch in s if ord(ch) < 32 and ch != "\t" or ord(ch) == 127), None)
        if odd:   # a NUL ends keystone's line: the error would blame bytes it never saw
            raise PayloadError(f"{name}:{no}: control character {odd!r} in the source "
                               "(is this a text file?)")
        body = _peel_labels(s)[1]   # all of them: `start: .Lloop: nop` is no directive
        if not body:
            continue
        masked = _mask_quotes(body)
        if _quotes(body)[2] == '"':    # keystone looped on it until the watchdog
            raise PayloadError(f"{name}:{no}: unterminated string in {body!r} (a \" inside "
                               "a string is written \\\")")
        for m in _MISREAD_ESCAPE.finditer(body):
            if masked[m.start()] == "'":    # a 'c' character, not text in a "string"
                raise PayloadError(
                    f"{name}:{no}: {m.group(0)} is read by the assembler as "
                    f"{m.group(1)!r} ({ord(m.group(1)):#x}), not as the escape it is in C "
                    "or GAS (only \\n, \\t and \\b are read so): write the number")
        if masked.count("[") != masked.count("]"):
            raise PayloadError(f"{name}:{no}: unbalanced brackets in {body!r}")
        if re.search(r"\w{17}", masked):   # keystone blames a later line for these
            for m in _LITERAL.finditer(masked):
                token = m.group(0)
                huge = _too_long(token)
                value = None if huge else _number(token)
                if huge or value is not None and value > _MASK64:
                    shown = f"{value:#x}" if value is not None else \
                        f"{token[:12]}...({len(token)} characters)"
                    raise PayloadError(f"{name}:{no}: value {shown} does not fit in 64 bits")
        if body[-1] in "+-*,[(":
            raise PayloadError(f"{name}:{no}: incomplete operand in {body!r}")
        if body.startswith("!"):
            raise PayloadError(f"{name}:{no}: unexpected '!' (header lines start with ';!')")
        # keystone drops such a line without a word unless it is the first: the error
        # then names a later line, or none
        att = next((r for r in re.findall(r"%(\w+)", masked) if _REGISTER.match(r)), None)
        if att:
            raise PayloadError(f"{name}:{no}: '%{att}' is AT&T syntax: payloads are Intel "
                               f"syntax ({att}; immediates without '$')")
        if _BARE_DOLLAR.search(masked):
            raise PayloadError(f"{name}:{no}: a bare '$' is not supported (the assembler "
                               "would drop the line): for the current address use a label "
                               "(`here: jmp here`); an immediate is a plain number")
        word, args = (body.split(None, 1) + [""])[:2]
        word = word.lower()
        if word in (".incbin", ".include"):
            # keystone would read a file of the host's (or skip a missing one silently)
            raise PayloadError(f"{name}:{no}: {word} is not supported: a payload is one "
                               "self-contained source file (use .byte/.ascii for data)")
        if word in _SECTION_DIRECTIVES:
            # keystone prints LLVM's diagnostic on stderr and returns no bytes (or dies)
            # for most of these; the rest it ignores: the code would not be where it says
            raise PayloadError(f"{name}:{no}: {word} is not supported: a payload is one "
                               "flat block of code and data, loaded at 0x10000")
        if word in _WIDE_ALIGN:
            raise PayloadError(f"{name}:{no}: {word} is not supported by the assembler; "
                               "use .balign/.p2align")
        const = _CONST_DEF.match(body)
        glued = re.match(r"\.[\w.$@]*", word)
        if glued and glued.end() < len(word) and not const:
            # `.ascii"ab"`, `.byte(1)`: GAS refuses some, keystone takes them all; the
            # directive was named as the whole word, `.ascii"ab" is not supported`
            word, rest = glued.group(0), body[glued.end():].strip()
            if word in _SUPPORTED_DIRECTIVES:
                raise PayloadError(f"{name}:{no}: {word} needs a space before its operands "
                                   f"(write `{word} {rest}`)")
        if word.startswith(".") and word not in _SUPPORTED_DIRECTIVES and not const:
            hint = _DIRECTIVE_HINTS.get(word, "payload directives: "
                                        + " ".join(_SUPPORTED_DIRECTIVES))
            raise PayloadError(f"{name}:{no}: {word} is not supported; {hint}")
        if word in _CODE_DIRECTIVES and _CODE_DIRECTIVES[word] != mode:
            raise PayloadError(f"{name}:{no}: {word} in a {mode}-mode payload: the "
                               f"header sets the mode (`;! mode: {_CODE_DIRECTIVES[word]}`)")
        if word == ".intel_syntax" and args.strip().lower() not in ("", "noprefix"):
            raise PayloadError(f"{name}:{no}: .intel_syntax {args.strip()} is not supported; "
                               "payloads are Intel syntax without '%' prefixes")
        if all(w.lower() in _PREFIXES for w in body.split()):
            # keystone glues it to the next line's bytes: the listing then blamed a later line
            raise PayloadError(f"{name}:{no}: prefix {body!r} alone on a line: write it "
                               "before its instruction (`rep movsb`, `lock inc dword ptr [rdi]`)")
        if word in (".equ", ".set", ".equiv") and not (const and const.group(3).strip()):
            # keystone defines nothing for `.equ X`, without a word
            raise PayloadError(f"{name}:{no}: expected `{word} NAME, VALUE`, got {body!r}")
        if const:
            key = const.group(1) or const.group(2)
            if word == ".equiv" and key in defined:
                # keystone keeps the first value where GAS refuses: the value check
                # then blamed a later line with "does not fit"
                raise PayloadError(f"{name}:{no}: .equiv {key}: already defined on line "
                                   f"{defined[key]} (.equiv never redefines; use .set)")
            defined.setdefault(key, no)
        _apply_constant(env, changes, no)
        if word in _ALIGN_DIRECTIVES + _SIZE_DIRECTIVES + (".fill",):
            # keystone takes these arguments' values where it meets them: a constant defined
            # further down loops it (`.space 2*P, 0x90`) or sizes nothing, and the listing
            # then blamed a later line ("does not decode as an instruction for 'hlt'")
            late = next((n for n in _NAME.findall(_mask_quotes(args))
                         if n in first_def and n not in defined), None)
            if late:
                raise PayloadError(f"{name}:{no}: {word}: {late} is defined on line "
                                   f"{first_def[late]}, after this line: define it first "
                                   "(the assembler cannot use a later definition here)")
        if word in _ALIGN_DIRECTIVES:   # before keystone pads gigabytes
            _alignment(word, args, env, name, no)
        elif word == ".fill":   # keystone keeps the low bytes of the value, without a word
            parts = _split_operands(args)
            count = _evaluate(parts[0], env, directive=True) if parts else None
            size = _evaluate(parts[1], env, directive=True) if len(parts) > 1 else None
            _known(word, args, parts, env, name, no)
            # a huge count takes keystone minutes; a size of 0 fails only when listed alone
            if count is not None and not 0 <= count <= L.CODE_MAX or \
                    size is not None and not 1 <= size <= 8:
                raise PayloadError(f"{name}:{no}: .fill {args.strip()}: expected a count "
                                   f"of 0 to {L.CODE_MAX:#x} and a size of 1 to 8")
            if len(parts) == 3:
                value = _evaluate(parts[2], env, directive=True)
                width = min(size, 4) if size is not None and size > 0 else None
                if width and value is not None and \
                        not -(1 << (8 * width - 1)) <= value < (1 << (8 * width)):
                    raise PayloadError(f"{name}:{no}: .fill value {value:#x} does not fit "
                                       f"in {width} byte(s) (keystone keeps at most 4)")
        elif word in _SIZE_DIRECTIVES:
            # keystone loops on `.zero -1`, takes minutes over a huge size and keeps the
            # low byte of the fill. A size of 0 is GAS's no bytes (`.zero PAD`, PAD 0)
            parts = _split_operands(args)
            size = _evaluate(parts[0], env, directive=True) if parts else None
            _known(word, args, parts, env, name, no)
            if size is not None and not 0 <= size <= L.CODE_MAX:
                raise PayloadError(f"{name}:{no}: {word} {parts[0]}: the size must be 0 "
                                   f"to {L.CODE_MAX:#x} bytes")
            fill = _evaluate(parts[1], env, directive=True) if len(parts) > 1 else None
            if fill is not None and not -0x80 <= fill <= 0xFF:
                raise PayloadError(f"{name}:{no}: {word}: the fill must be a byte value, "
                                   f"got {parts[1]!r}")
        elif word == ".word":   # keystone emits nothing (or hangs) for a too-big .word
            for arg in _split_operands(args):
                value = _evaluate(arg, env, directive=True)
                if value is not None and not -0x8000 <= value <= 0xFFFF:
                    raise PayloadError(f"{name}:{no}: .word value {value:#x} does not fit "
                                       "in 16 bits")


def _known(word: str, args: str, parts: list, env: dict, name, no) -> None:
    """Refuse a size, count or fill whose value is not known here: one naming a label or an
    unknown name (keystone loops on `.space L, 0x90`: the watchdog, no line named; emits
    nothing for `.space 2, L`: the listing then blamed a later line), or a bad literal."""
    for part in parts:
        if _evaluate(part, env, directive=True) is not None:
            continue
        if _NAME.search(_mask_quotes(part)):
            raise PayloadError(f"{name}:{no}: {word} {args.strip()}: {part!r} must be a "
                               "number or a constant of known value (the assembler cannot "
                               "size or fill from labels)")
        if _lexes(part):     # an expression keystone may still read (`8 | 1 / 3`)
            continue
        # `08`, `'ab'`: keystone looped until the watchdog, which named no line
        raise PayloadError(f"{name}:{no}: {word} {args.strip()}: {part!r} is not a value "
                           "the assembler can size or fill from (numbers: 10, 0x10, 10h, "
                           "0b10, 010, 'a'; + - * / % << >> & | ^ ~ and parentheses)")


# a character escaped by a backslash ('\n', '\t', '\'', '\\'): keystone reads it as one
# byte (a `.space 2, '\n'` that assembled before _known refused it)
_ESCAPED_CHAR = re.compile(r"\s*'\\.'(?![\w.$@'])")
# keystone (LLVM's lexer) knows only \n, \t and \b in a 'c' character: the other escapes
# of C and GAS are the character itself ('\0' is 0x30, '\r' is 0x72), without a word
_MISREAD_ESCAPE = re.compile(r"'\\([0-9afrvex])'")


def _lexes(text: str) -> bool:
    """Whether ``text`` is made of literals keystone reads, names and operators only."""
    pos, text = 0, text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos) or _ESCAPED_CHAR.match(text, pos)
        if not m:
            return False
        pos = m.end()
    return True


def _alignment(word: str, args: str, consts: dict, name, no) -> tuple:
    """(alignment, max bytes to skip or None, fill byte or None) of an align directive;
    PayloadError if bad."""
    parts = [a.strip() for a in args.split(",")]
    if not parts[0]:
        raise PayloadError(f"{name}:{no}: {word} needs an alignment")
    value = _evaluate(parts[0], consts, directive=True)
    if value is None:
        raise PayloadError(f"{name}:{no}: {word}: the alignment must be a number, "
                           f"got {parts[0]!r}")
    if word == ".p2align":
        if not 0 <= value <= ALIGN_MAX.bit_length() - 1:
            raise PayloadError(f"{name}:{no}: .p2align {value} is out of range "
                               f"(0 to {ALIGN_MAX.bit_length() - 1})")
        value = 1 << value
    elif not (0 < value <= ALIGN_MAX and value & (value - 1) == 0):
        raise PayloadError(f"{name}:{no}: {word} {parts[0]}: the alignment must be a power "
                           f"of two from 1 to {ALIGN_MAX}")
    fill = None
    if len(parts) > 1 and parts[1]:
        fill = _evaluate(parts[1], consts, directive=True)
        if fill is None or not -0x80 <= fill <= 0xFF:   # keystone keeps the low byte
            raise PayloadError(f"{name}:{no}: {word}: the fill must be a byte value, "
                               f"got {parts[1]!r}")
        fill &= 0xFF
    max_skip = None
    if len(parts) > 2:
        max_skip = _evaluate(parts[2], consts, directive=True)
        if max_skip is None or len(parts) > 3:
            raise PayloadError(f"{name}:{no}: {word}: bad arguments {args.strip()!r} "
                               "(expected alignment[, fill[, max skip]])")
        if max_skip < 1:   # keystone ignores such a limit and pads all the way
            raise PayloadError(f"{name}:{no}: {word}: the max skip must be at least 1, "
                               f"got {parts[2]!r}")
    return value, max_skip, fill


_KS: dict = {}
# One Ks per mode, shared by every thread: keystone is not thread-safe (its asm() runs
# without the GIL), and two threads assembling at once corrupted its heap (a segfault
# with 8 threads, each assembling its own payload). Held for each asm() in this process,
# and across the assembler's fork, so that the child's copy is not one caught mid-asm
_KS_LOCK = threading.RLock()
# Every fork, the program's own too (multiprocessing), waits for keystone to be idle: one
# made while another thread held the lock left the child, which has no such thread,
# waiting for it for ever at its first payload
os.register_at_fork(before=_KS_LOCK.acquire, after_in_parent=_KS_LOCK.release,
                    after_in_child=_KS_LOCK.release)
# Keystones found reading decimals as hex, kept alive for the same reason as _KS's
_KS_REJECTED: list = []
_RADIX_PROBE = {"real": ("mov ax, 10", b"\xb8\x0a\x00"),
                "protected": ("mov eax, 10", b"\xb8\x0a\x00\x00\x00"),
                "long": ("mov eax, 10", b"\xb8\x0a\x00\x00\x00")}


def _ks(mode: str):
    # One per mode, kept: a Ks freed mid-command runs its __del__, and Python discards a
    # Ctrl-C that lands there (the command then ran on as if never interrupted)
    ks = _KS.get(mode)
    if ks is None:
        ks_mode = {"real": keystone.KS_MODE_16, "protected": keystone.KS_MODE_32,
                   "long": keystone.KS_MODE_64}[mode]
        ks = _KS[mode] = keystone.Ks(keystone.KS_ARCH_X86, ks_mode)
    return ks


def _ks_decimal(mode: str):
    """_ks(mode), made anew while it reads `10` as 0x10. keystone 0.9.2 lexes with the
    radix in its MCAsmInfo, which ks_option() sets to 16 (a sym_resolver does that) and
    which is otherwise left as the allocation found it (keystone issues #481, #538; PR
    #608): seen here once in a few test runs, every later payload then assembled wrong
    (`add rdi, 4096` as 0x4096). Checked before each new payload is assembled: the
    assembler's child inherits this one."""
    with _KS_LOCK:
        return _ks_decimal_locked(mode)


def _ks_decimal_locked(mode: str):
    text, want = _RADIX_PROBE[mode]
    for _ in range(8):
        ks = _ks(mode)
        enc, _ = ks.asm(text)
        if bytes(enc or b"") == want:
            return ks
        _KS_REJECTED.append(_KS.pop(mode))
    raise PayloadError(f"the assembler (keystone) reads decimal numbers as hex in this "
                       f"process ({text!r} gives {bytes(enc or b'').hex(' ')}); write "
                       "numbers with 0x, or run again")


def _ks_message(error) -> str:
    """keystone's message without its " (KS_ERR_...)" code."""
    return str(error).split(" (KS_ERR")[0]


def _assemble_child(source: str, mode: str, origin: int, stmts, name) -> tuple:
    """Runs in the child: ('ok', code, listing, labels), ('error', line, message) or
    ('refused', message). The listing is made here too: it asks keystone again, line by
    line, and keystone can loop for ever on a line that the whole source assembled."""
    try:
        enc, _ = _ks(mode).asm(source, origin)
        code = bytes(enc or b"")
    except keystone.KsError as e:
        message = _ks_message(e)
        missing = e.errno == keystone.KS_ERR_ASM_SYMBOL_MISSING
        code = None
    if code is not None:
        try:
            if not code:
                raise PayloadError(f"{name}: the payload has no instructions")
            if len(code) > L.CODE_MAX:
                raise PayloadError(f"{name}: {len(code)} bytes of code, more than the "
                                   f"{L.CODE_MAX} bytes reserved for a payload")
            return ("ok",) + _listing(code, mode, origin, stmts, name)
        except PayloadError as e:
            return ("refused", str(e))
        except Exception:       # a bug of ours: shown as one, not as a crashed assembler
            import traceback
            return ("bug", traceback.format_exc())
    # Find the failing line: assemble growing prefixes with unknown symbols resolved to 0
    # (safe only here, in the short-lived child: a resolver changes keystone's radix).
    ks = _ks(mode)
    asked: list = []
    ks.sym_resolver = lambda symbol, value: asked.append(symbol) or True
    if missing:
        # Over the whole source the resolver is asked only for names nothing defines
        # (a prefix would also ask for labels defined further down); the prefixes
        # would blame the wrong line, or say "Invalid fixup"
        try:
            ks.asm(source, origin)
        except keystone.KsError:
            pass
        # keystone asks in its own order: blame the first line that uses any of them
        found = []
        for symbol in dict.fromkeys(s.decode("ascii", "replace") for s in asked):
            word = re.compile(rf"(?<![\w.$@]){re.escape(symbol)}(?![\w.$@])")
            for no, s in stmts:
                if word.search(_mask_quotes(s)):
                    found.append((no, symbol))
                    break
        if found:
            no, symbol = min(found)
            others = ", ".join(repr(sym) for _, sym in sorted(found)[1:])
            return ("error", no, f"undefined symbol {symbol!r} (no label or constant of "
                                 "that name)" + (f"; also undefined: {others}" if others else ""))
    # A prefix that uses a label defined further down fails as "Invalid fixup" (16-bit
    # and absolute references, even with the resolver): that line is not the culprit.
    # The first prefix failing otherwise is.
    fixup = None
    for i in range(1, len(stmts) + 1):
        try:
            ks.asm("\n".join(s for _, s in stmts[:i]), origin)
        except keystone.KsError as e:
            if e.errno not in (keystone.KS_ERR_ASM_FIXUP_INVALID,
                               keystone.KS_ERR_ASM_SYMBOL_MISSING):
                return ("error", stmts[i - 1][0], _ks_message(e))
            fixup = fixup or (stmts[i - 1][0], _ks_message(e))
    if fixup:
        # only fixups failed: the culprit is the first line whose removal (its labels
        # kept) lets the whole source assemble
        for k, (no, _) in enumerate(stmts):
            kept = " ".join(f"{n}:" for n in _peel_labels(stmts[k][1])[0])
            try:
                ks.asm("\n".join(kept if j == k else s for j, (_, s) in enumerate(stmts)),
                       origin)
            except keystone.KsError:
                continue
            return ("error", no, fixup[1])
        return ("error",) + fixup
    return ("error", stmts[-1][0] if stmts else 0, message)


def _assemble_with_watchdog(source, mode, origin, stmts, name) -> tuple:
    """(code, listing, labels), made in a child process under ASSEMBLE_TIMEOUT_S (and
    LISTING_S_PER_LINE for each statement)."""
    limit = ASSEMBLE_TIMEOUT_S + LISTING_S_PER_LINE * len(stmts)
    rfd, wfd = os.pipe()
    try:
        with _KS_LOCK:
            pid = _sys.fork_child()
    except OSError as e:    # EAGAIN: RLIMIT_NPROC; ENOMEM
        os.close(rfd)
        os.close(wfd)
        raise OSError(e.errno, f"{name}: cannot fork the assembler's process: {e.strerror} "
                      "(too many processes for RLIMIT_NPROC, ulimit -u, or no memory)"
                      ) from None
    if pid == 0:  # child
        try:
            os.close(rfd)
            data = pickle.dumps(_assemble_child(source, mode, origin, stmts, name))
            with os.fdopen(wfd, "wb") as f:
                f.write(data)
        finally:
            os._exit(0)
    os.close(wfd)
    chunks = []
    finished = False
    try:
        while True:
            ready, _, _ = select.select([rfd], [], [], limit)
            if not ready:
                raise PayloadError(f"{name}: the assembler did not finish within "
                                   f"{limit:.0f} s (keystone loops on some "
                                   "malformed lines; check the syntax)")
            chunk = os.read(rfd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
        finished = True
    finally:
        os.close(rfd)
        # a timeout or a Ctrl-C leaves the child running (it ignores SIGINT): kill it
        _sys.reap(pid, kill=not finished)
    if not chunks:
        raise PayloadError(f"{name}: the assembler crashed")
    result = pickle.loads(b"".join(chunks))
    if result[0] == "error":
        raise PayloadError(f"{name}:{result[1]}: {result[2]}")
    if result[0] == "refused":
        raise PayloadError(result[1])
    if result[0] == "bug":
        raise RuntimeError(f"listing {name} failed in the assembler's process:\n{result[1]}")
    return result[1:]


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


def instructions_ending(code: bytes, end: int, mode: str) -> list:
    """Every instruction that decodes from some byte of ``code`` to exactly its last byte,
    shortest first; ``end`` is the address just past ``code``."""
    md, found = _cs(mode), []
    for start in range(len(code) - 1, -1, -1):
        for i in md.disasm(code[start:], end - (len(code) - start), 1):
            if i.size == len(code) - start:
                found.append(Instruction(i.address, i.size, bytes(i.bytes), i.mnemonic,
                                         i.op_str))
    return found


# -- values: what the source says vs what keystone encoded --

def _number(token: str) -> int | None:
    """A literal as keystone reads it, or None."""
    m = re.fullmatch(_NUMBER, token.strip(), re.IGNORECASE)
    if not m:
        return None
    t = m.group(0)
    if t.startswith("'"):
        return ord(t[1])
    t = t.lower()
    if _too_long(t):
        return None
    if t.endswith("h"):
        return int(t[:-1], 16)
    if t.startswith(("0x", "0b")):
        return int(t, 0)
    return int(t, 8) if t.startswith("0") else int(t)


def _too_long(token: str) -> bool:
    """More than 64 digits, in any base: too wide for any operand, and not converted (int()
    of thousands of decimal digits is slow, quadratic, and refused past 4300)."""
    return len(re.sub(r"^(0x|0b)?0*|h$", "", token.lower())) > 64


def _div(a: int, b: int) -> int | None:
    """keystone's `/`: signed, truncating toward zero (-7 / 2 is -3)."""
    if b == 0:
        return None
    q = abs(a) // abs(b)
    return -q if (a < 0) != (b < 0) else q


def _shr64(a: int, b: int) -> int:
    return (a & _MASK64) >> b


def _evaluate(text: str, consts: dict, registers_zero: bool = False,
              directive: bool = False) -> int | None:
    """The value of a constant expression, or None if it is not one we can be sure of.

    With ``registers_zero`` registers count as 0: what is left of an address is its
    displacement. Bitwise and shift operators rank differently in keystone's Intel
    and GAS parsers, so mixed kinds are handed to keystone itself. In a ``directive``
    (.equ, .set, .align...) keystone shifts right unsigned on 64 bits: -1 >> 60 is 0xf.
    """
    tokens, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            return None
        tokens.append((m.lastgroup, m.group(m.lastgroup)))
        pos = m.end()
    tokens.append(("end", ""))
    i = 0

    def primary():
        nonlocal i
        kind, tok = tokens[i]
        if kind == "end":        # `.set X, 1 +`: nothing left (and nothing to read past)
            return None
        i += 1
        if tok in ("-", "+", "~"):
            v = primary()
            return None if v is None else {"-": -v, "+": v, "~": ~v}[tok]
        if kind == "num":
            return _number(tok)
        if kind == "name":
            if _REGISTER.match(tok):
                return 0 if registers_zero else None
            return consts.get(tok)
        if tok == "(":
            v = level()
            if tokens[i][1] != ")":
                return None
            i += 1
            return v
        return None

    def level():
        nonlocal i
        values, ops = [primary()], []
        while tokens[i][0] == "op" and tokens[i][1] not in "()~":
            ops.append(tokens[i][1])
            i += 1
            values.append(primary())
        if None in values:
            return None
        if set(ops) <= {"+", "-", "*", "/"}:
            terms, signs = [values[0]], [1]
            for op, v in zip(ops, values[1:]):
                if op == "*":
                    terms[-1] *= v
                elif op == "/":
                    terms[-1] = _div(terms[-1], v)
                    if terms[-1] is None:
                        return None
                else:
                    terms.append(v)
                    signs.append(1 if op == "+" else -1)
            return sum(s * t for s, t in zip(signs, terms))
        fn = {"<<": operator.lshift, ">>": operator.rshift, "&": operator.and_,
              "|": operator.or_, "^": operator.xor}.get(ops[0]) if len(set(ops)) == 1 else None
        if ops[0] in ("<<", ">>") and not all(0 <= w < 64 for w in values[1:]):
            fn = None                    # keystone shifts by the count modulo 64
        elif directive and fn is operator.rshift:
            fn = _shr64
        if fn is None:
            # mixed kinds rank differently in keystone's two parsers: ask the parser
            return _keystone_value(tuple(values), tuple(ops), directive)
        v = values[0]
        for w in values[1:]:
            v = fn(v, w)
        return v

    value = level()
    return value if tokens[i][0] == "end" else None


@functools.lru_cache(maxsize=256)
def _keystone_value(values: tuple, ops: tuple, directive: bool) -> int | None:
    """``v0 op v1 op v2...`` as keystone computes it, on 64 bits: in a directive (``.quad``,
    the parser of .set and .align) or in an instruction (``movabs``, the Intel parser).

    Not with / or %: this runs in minivmm's own process, and keystone's signed 64-bit
    division traps (SIGFPE) on x / 0 and INT64_MIN / -1, which would kill it."""
    if "/" in ops or "%" in ops:
        return None
    expr = " ".join([f"{values[0] & _MASK64:#x}"]
                    + [f"{op} {v & _MASK64:#x}" for op, v in zip(ops, values[1:])])
    try:
        with _KS_LOCK:
            enc, _ = _ks("long").asm(f".quad {expr}" if directive else f"movabs rax, {expr}")
    except keystone.KsError:
        return None
    enc = bytes(enc or b"")
    raw = enc if directive else enc[2:] if enc[:2] == b"\x48\xb8" else b""
    if len(raw) != 8:
        return None
    return int.from_bytes(raw, "little", signed=True)


def _split_operands(text: str) -> list:
    """Operands split at commas outside brackets, parentheses and quotes."""
    parts, depth, start = [], 0, 0
    for k, ch in enumerate(_mask_quotes(text)):     # same length: positions carry over
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:k])
            start = k + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _operand_text(body: str) -> str:
    """What follows the mnemonic, its prefixes (lock, rep...) skipped."""
    words = body.split(None, 1)
    while len(words) == 2 and words[0].lower() in _PREFIXES:
        words = words[1].split(None, 1)
    return words[1] if len(words) == 2 else ""


def _source_values(body: str, consts: dict) -> tuple:
    """([immediate value or None...], [displacement or None...]) written in ``body``."""
    imms, disps = [], []
    for op in _split_operands(_operand_text(body)):
        masked = _mask_quotes(op)          # `'['` is a number, not an address
        seg = _SEG_ABS.match(masked)
        if "[" in masked:
            start, end = masked.index("["), masked.rindex("]")
            inner, after = op[start + 1:end], op[end + 1:]
            inner = re.sub(r"^\s*[c-gs]s\s*:", "", inner, flags=re.IGNORECASE)
            disps.append(None if after.strip() else _evaluate(inner, consts, True))
        elif seg:                           # `gs:0x100`, an address like `gs:[0x100]`
            disps.append(_evaluate(op[seg.start(1):], consts))
        elif ":" in op or any(_REGISTER.match(w) for w in re.findall(r"[\w.$@]+", op)):
            continue                        # a register (or a far pointer): no value
        else:
            imms.append(_evaluate(op, consts))
    return imms, disps


def _check_values(decoded, body: str, consts: dict, name, no) -> None:
    """Refuse a number keystone truncated: `mov al, 0x1234` assembles as `mov al, 0x34`.

    A value fits if it is within the operand's width, signed or unsigned, and equal
    to what was encoded modulo that width (`mov al, -1` is 0xff, `add rsp, -8` is a
    sign-extended imm8). Labels are not checked: their values are not known here.
    """
    imms, disps = _source_values(body, consts)
    ops = decoded.operands
    got_imms = [o for o in ops if o.type == cs_x86.X86_OP_IMM]
    got_mems = [o for o in ops if o.type == cs_x86.X86_OP_MEM]
    checks = []
    if len(imms) == len(got_imms):
        # capstone gives ret's imm16 and enter's imm16, imm8 the stack's width
        widths = {"enter": [16, 8]}.get(decoded.mnemonic,
                                         [16] if decoded.mnemonic.startswith("ret") else None)
        for k, (want, o) in enumerate(zip(imms, got_imms)):
            bits = widths[k] if widths else o.size * 8
            checks.append((want, o.imm, bits, False))
    if len(disps) == len(got_mems):
        for want, o in zip(disps, got_mems):
            if o.mem.base == cs_x86.X86_REG_RIP and "rip" not in body.lower():
                # keystone makes some [abs] RIP-relative, not always to the right address
                got = decoded.address + decoded.size + o.mem.disp
                if want is not None and (want - got) & _MASK64:
                    raise PayloadError(f"{name}:{no}: address {want:#x} was assembled as "
                                       f"RIP-relative {got & _MASK64:#x}")
                continue
            checks.append((want, o.mem.disp, decoded.addr_size * 8, True))
    for want, got, bits, signed in checks:
        if want is None or bits <= 0:
            continue
        mask = (1 << bits) - 1
        if not -(1 << (bits - 1)) <= want <= mask or (want - got) & mask:
            shown = got & mask
            if signed and shown >> (bits - 1):
                shown -= 1 << bits
            raise PayloadError(f"{name}:{no}: value {want:#x} does not fit in the operand "
                               f"(assembled as {shown:#x})")


def _const_defs(stmts) -> list:
    """(line, name, value text) of each .equ/.set/.equiv/`=` line, in source order."""
    return [(no, m.group(1) or m.group(2), m.group(3))
            for no, m in ((no, _CONST_DEF.match(_peel_labels(s)[1])) for no, s in stmts) if m]


def _constants(stmts) -> tuple:
    """Constants from .equ/.set/`=` lines: (values at the start, {line: (name, value)}).

    A name defined once has its value everywhere. A name redefined (`.set`) takes each
    new value from its line on; before its first definition keystone uses the last.
    A value that is not known is None.
    """
    defs = _const_defs(stmts)
    seen: dict = {}
    for _, key, _ in defs:
        seen[key] = seen.get(key, 0) + 1
    current: dict = {}
    changes: dict = {}
    for no, key, text in defs:
        value = _evaluate(text, current, directive=True)
        if value is None:
            current.pop(key, None)
        else:
            current[key] = value
        if seen[key] > 1:
            changes[no] = (key, value)
    # `.set Q, P + 1` above `.equ P, 4`: keystone gives Q its value at the end (5), as GAS
    # does; it was unknown here, and `.space Q` "cannot size it from labels"
    late = [(key, text) for _, key, text in defs if seen[key] == 1 and key not in current]
    while late:
        once = {k: v for k, v in current.items() if seen[k] == 1}
        known = [(k, _evaluate(t, once, directive=True)) for k, t in late]
        current.update((k, v) for k, v in known if v is not None)
        if len(late) == len(late := [(k, t) for k, t in late if k not in current]):
            break
    return current, changes


def _apply_constant(env: dict, changes: dict, no: int) -> None:
    """Update ``env`` for a (re)definition on line ``no``, if there is one."""
    if no in changes:
        key, value = changes[no]
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value


def _peel_labels(s: str) -> tuple:
    """(the labels a line starts with, the rest of it)."""
    names, body = [], s.strip()
    while m := _LABEL.match(body):     # `.Lname:` is a label too
        names.append(m.group(1))
        body = body[m.end():].strip()
    return names, body


def _sized(word: str, args: str, consts: dict):
    """The bytes of a .space/.skip/.zero/.fill whose size names a constant, from its value:
    keystone, asked about it alone, loops for ever on `.space P, 0x90` (P unknown there),
    in this process, with no watchdog. None for other lines (keystone sizes them), -1 for
    a size that names a label (keystone's own bytes for it were wrong: none at all)."""
    if word not in _SIZE_DIRECTIVES + (".fill",) or \
            not re.search(r"[A-Za-z_.$@]", re.sub(r"\b(0x[0-9a-f]+|[0-9][0-9a-f]*h)\b", "",
                                                 _mask_quotes(args), flags=re.I)):
        return None
    parts = _split_operands(args)
    n = _evaluate(parts[0], consts, directive=True) if parts else None
    if word == ".fill":
        size = _evaluate(parts[1], consts, directive=True) if len(parts) > 1 else 1
        n = None if n is None or size is None else n * size
    return -1 if n is None else n


def _directive_size(ks, body: str, address: int) -> int:
    # keystone refuses `.space 0` and `.skip 0` as a source's last statement: a nop after
    # them (one byte in every mode), taken off again
    nop = "\nnop" if body.split(None, 1)[0].lower() in _SIZE_DIRECTIVES else ""
    try:
        enc, _ = ks.asm(body + nop, address)
    except keystone.KsError:
        word, _, args = body.partition(" ")
        if '"' in args:
            raise
        enc, _ = ks.asm(f"{word} " + re.sub(r"[A-Za-z_.$@][\w.$@]*", "0", args) + nop,
                        address)
    return len(enc or b"") - (1 if nop else 0)


def _listing(code: bytes, mode: str, origin: int, stmts, name) -> tuple:
    """(code, listing, labels): tie each source instruction line to exactly one decoded
    instruction.

    Data directives are sized by assembling them alone; everything must add up
    to the assembled length, or the assembler's output is not what the source says.
    Alignment padding is rewritten where keystone's is not what the source says.
    """
    # No sym_resolver here: setting one makes keystone 0.9.2 read later decimal
    # immediates as hex (`mov al, 10` -> 0x10), process-wide. Symbols in a data
    # directive are replaced by 0 instead; only the size matters here.
    ks = _ks(mode)
    md = _cs(mode)
    md.detail = True                # operand values, for _check_values
    consts, changes = _constants(stmts)
    code = bytearray(code)
    listing = []
    labels: dict = {}
    branches = []
    offset = 0
    for no, s in stmts:
        _apply_constant(consts, changes, no)
        names, body = _peel_labels(s)
        labels.update((n, origin + offset) for n in names)
        if not body or _CONST_DEF.match(body):
            continue
        word, args = (body.split(None, 1) + [""])[:2]
        word = word.lower()
        if word.startswith("."):
            if word in _ALIGN_DIRECTIVES:
                align, max_skip, fill = _alignment(word, args, consts, name, no)
                pad = (-(origin + offset)) % align
                pad = 0 if max_skip is not None and pad > max_skip else pad
                if fill is not None or mode == "real":
                    # keystone pads with its multi-byte NOPs (0f 1f ...) for a fill of
                    # 0x90 or none, in every mode: not the bytes asked for, and in 16-bit
                    # code they decode as `nop word ptr [bx + si]`, `add byte ptr
                    # [bx + si], al`, a write to guest memory. The fill asked, or (real
                    # mode) one-byte nops
                    code[offset:offset + pad] = bytes([0x90 if fill is None else fill]) * pad
                offset += pad
            elif word in _DATA_DIRECTIVES:
                size = _sized(word, args, consts)
                if size == -1:
                    raise PayloadError(f"{name}:{no}: {word} {args.strip()}: the size must "
                                       "be a number or a constant (the assembler cannot "
                                       "size it from labels)")
                try:
                    offset += size if size is not None else \
                        _directive_size(ks, body, origin + offset)
                except keystone.KsError as e:   # a case _check_syntax does not know
                    raise PayloadError(f"{name}:{no}: {word}: "
                                       f"{_ks_message(e)}") from None
            continue
        decoded = next(md.disasm(bytes(code[offset:offset + 16]), origin + offset, 1), None)
        after = next(md.disasm(bytes(code[offset + 1:offset + 17]), origin + offset + 1, 1),
                     None) \
            if decoded is not None and decoded.mnemonic == "wait" else None
        if after is not None and after.mnemonic == "fn" + word[1:]:
            # `fstsw ax`, `finit`...: keystone emits `wait` and then `fnstsw ax`, two
            # instructions the CPU runs (and a step stops at) one by one: both listed
            listing.append(Instruction(decoded.address, decoded.size, bytes(decoded.bytes),
                                       decoded.mnemonic, decoded.op_str, no, body))
            offset += decoded.size
            decoded = after
        if decoded is None:
            raise PayloadError(f"{name}:{no}: assembler output does not decode as an "
                               f"instruction for {body!r}")
        _check_values(decoded, body, consts, name, no)
        if decoded.group(capstone.CS_GRP_BRANCH_RELATIVE):
            branches.append((no, body, decoded))
        listing.append(Instruction(decoded.address, decoded.size, bytes(decoded.bytes),
                                   decoded.mnemonic, decoded.op_str, no, body))
        offset += decoded.size
    if offset != len(code):
        raise PayloadError(f"{name}: assembler output ({len(code)} bytes) does not match the "
                           f"source ({offset} bytes accounted for)")
    _check_branches(branches, labels, _ADDR_MASK[mode], name)
    return bytes(code), listing, labels


def _check_branches(branches, labels: dict, mask: int, name) -> None:
    """Refuse a branch to a label keystone could not reach: `loop far_label` (rel8 only)
    assembles silently with a wrong target."""
    for no, body, decoded in branches:
        target = _operand_text(body)
        imms = [o for o in decoded.operands if o.type == cs_x86.X86_OP_IMM]
        if len(imms) != 1 or not re.search(r"[A-Za-z_.$@]", target):
            continue     # not a branch to a label (numbers are checked with the values)
        want = _evaluate(target, labels)
        if want is None or not (want - imms[0].imm) & mask:
            continue
        if decoded.mnemonic in _REL8_ONLY:
            raise PayloadError(f"{name}:{no}: target out of range for {decoded.mnemonic} "
                               "(rel8: -128..127 bytes)")
        raise PayloadError(f"{name}:{no}: {decoded.mnemonic} target {want:#x} was assembled "
                           f"as {imms[0].imm & mask:#x}")


def list_payloads(directory: str | None = None) -> list:
    """(name, mode, cpl, description) for every payload in the directory."""
    base = Path(directory) if directory else payload_dir()
    rows = []
    try:
        if not base.is_dir():
            raise PayloadError(f"{base}: " + ("not a directory" if base.exists()
                                              else "no such directory"))
        paths = sorted(base.glob("*.asm"))
        os.scandir(base).close()      # glob() says nothing of a directory it cannot read
    except OSError as e:              # a parent without search permission, ...
        raise PayloadError(f"{base}: cannot list: {e.strerror or e}") from None
    for path in paths:
        if path.exists() and not path.is_file() and not path.is_dir():
            # a FIFO or a device: opening it to list it could block forever
            rows.append((path.stem, "?", "?", None, "(unreadable: not a regular file)"))
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            rows.append((path.stem, "?", "?", None, "(unreadable: not UTF-8 text)"))
            continue
        except OSError as e:   # a directory named x.asm, no permission...
            rows.append((path.stem, "?", "?", None, f"(unreadable: {e.strerror or e})"))
            continue
        try:
            mode, cpl, vcpus, desc = _header_values(parse_header(text, str(path)), str(path))
        except PayloadError as e:
            mode, cpl, vcpus, desc = "?", "?", None, f"(bad header: {e})"
        rows.append((path.stem, mode, cpl, vcpus, desc))
    return rows
