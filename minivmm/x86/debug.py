"""What raised a debug exception (#DB, vector 1): the guest's DR6 and DR7 read as the CPU
defines them, so that a fault and a trap name the right instruction.

Intel SDM vol. 3, 18.2 "Debug Registers" and 18.3.1 "Debug Exception (#DB)":

- DR6, the status (18.2.3): B0-B3 (bits 0-3) the condition of breakpoint DR0-DR3 was met,
  BD (13) a MOV to or from a debug register while DR7.GD was set, BS (14) a single-step
  (RFLAGS.TF), BT (15) a task switch into a TSS whose T flag is set. B0-B3 may be set for a
  breakpoint DR7 does not enable, so only enabled ones count. No bit is set by INT1 (the
  one-byte ``icebp``, 0xF1).
- DR7, the control (18.2.4): L/G bits 2n and 2n+1 enable breakpoint n; its R/W field (bits
  16 + 4n) says what it watches: 00 an instruction fetch, 01 data writes, 10 I/O, 11 data
  reads and writes; its LEN field (bits 18 + 4n) the size 1, 2, 8 or 4 bytes.
- Fault or trap (18.3.1, table 18-2): an instruction breakpoint and general detect (BD)
  are faults, the pushed RIP is the instruction itself, which has not run; single-step,
  data and I/O breakpoints and task switch are traps, the pushed RIP is past the
  instruction that raised them. INT1 is trap-like (pushed RIP past it).

DR6 is sticky: the CPU sets its status bits and never clears them (18.2.3), so a handler
clears them before it resumes (DR6_INIT), or the next #DB seems to have the old causes too.
The values come from KVM_GET_DEBUGREGS (api.rst 4.33; ``struct kvm_debugregs`` in
arch/x86/include/uapi/asm/kvm.h).
"""
from __future__ import annotations

import dataclasses

DR6_BD, DR6_BS, DR6_BT = 1 << 13, 1 << 14, 1 << 15
DR6_INIT = 0xFFFF0FF0      # no cause: reserved bits set, RTM (bit 16) active low
ICEBP = 0xF1
_RW_NAMES = {0: "execute", 1: "write", 2: "io", 3: "read-write"}
_LEN_BYTES = {0: 1, 1: 2, 2: 8, 3: 4}
KINDS = ("single-step", "code-breakpoint", "data-breakpoint", "io-breakpoint",
         "general-detect", "task-switch", "icebp", "int-1", "unknown")


@dataclasses.dataclass
class DebugCause:
    """One #DB's cause. ``fault``: the pushed RIP is the instruction that raised it (not
    run); else a trap, past the instruction that ran (for icebp the caller checks where
    RIP really is: ``icebp_at``)."""
    kind: str
    fault: bool
    dr6: int | None = None
    dr7: int | None = None
    breakpoints: list = dataclasses.field(default_factory=list)   # dicts, one per DRn hit
    icebp_at: int | None = None      # the icebp's address, as RIP's (real mode: an IP)
    note: str = ""

    @property
    def is_step(self) -> bool:
        """A single-step trap: DR6 says BS, or DR6 could not be read (every #DB was taken
        for a step before DR6 was read). A readable DR6 without BS is no step."""
        return self.kind == "single-step" or self.kind == "unknown" and self.dr6 is None

    def to_dict(self) -> dict:
        out = {"kind": self.kind, "fault": self.fault, "dr6": self.dr6, "dr7": self.dr7,
               "breakpoints": self.breakpoints}
        if self.icebp_at is not None:
            out["icebp_at"] = self.icebp_at
        if self.note:
            out["note"] = self.note
        return out


def describe(info: dict) -> str:
    """One line from a DebugCause's to_dict(): the kind, which breakpoints, fault or trap,
    any host quirk, DR6."""
    hits = ", ".join(f"DR{b['dr']} ({b['type']} {b['address']:#x})" for b in info["breakpoints"])
    text = info["kind"] + (f" {hits}" if hits else "")
    if info["kind"] == "icebp":
        text += " (INT1), trap-like"
    elif info["kind"] == "int-1":
        text += " (a software interrupt through the #DB gate: no debug condition)"
    elif info["kind"] != "unknown":
        text += (", a fault (the instruction at RIP has not run)" if info["fault"]
                 else ", a trap (the instruction before RIP ran)")
    if info.get("note"):
        text += f", {info['note']}"
    if info["dr6"] is not None:
        text += f", DR6 {info['dr6']:#x}"
    return text


def breakpoint_hits(dr6: int, dr7: int, db) -> list:
    """The breakpoints DR6 reports that DR7 enables, as dicts (dr, address, type, len)."""
    hits = []
    for n in range(4):
        if dr6 >> n & 1 and dr7 >> (2 * n) & 3:
            rw, size = dr7 >> (16 + 4 * n) & 3, dr7 >> (18 + 4 * n) & 3
            hits.append({"dr": n, "address": int(db[n]), "type": _RW_NAMES[rw],
                         "len": 1 if rw == 0 else _LEN_BYTES[size]})
    return hits


def classify(dr6: int, dr7: int, db) -> DebugCause:
    """The cause of a #DB from DR6, DR7 and DR0-DR3 as the guest had them when it was
    raised. Several causes can be reported at once; a trap of the instruction that ran
    (single-step, data or I/O breakpoint) is what the pushed RIP follows, so it wins over
    an instruction breakpoint at the next one (SDM vol. 3, 6.9, table 6-2: traps on the
    previous instruction come before faults from fetching the next)."""
    hits = breakpoint_hits(dr6, dr7, db)
    types = {h["type"] for h in hits}
    cause = DebugCause("unknown", False, dr6, dr7, hits)
    if dr6 & DR6_BD:
        cause.kind, cause.fault = "general-detect", True
    elif types & {"write", "read-write"}:
        cause.kind = "data-breakpoint"
    elif "io" in types:
        cause.kind = "io-breakpoint"
    elif dr6 & DR6_BS:
        cause.kind = "single-step"
    elif dr6 & DR6_BT:
        cause.kind = "task-switch"
    elif "execute" in types:
        cause.kind, cause.fault = "code-breakpoint", True
    else:
        cause.kind = "icebp"        # the one #DB that sets no DR6 bit; the caller checks
    return cause


def unknown(note: str) -> DebugCause:
    """A #DB whose cause cannot be read (no DR6): named as a trap, as minivmm did before."""
    return DebugCause("unknown", False, note=f"{note}: named as a trap")
