;! mode: long
;! cpl: 0
;! description: sets a DR7 instruction breakpoint on its own code; the #DB is a fault at it
; Writing DR0-DR7 needs CPL0 (emulated on kvm_pvm, where only emulated code sees a
; guest's own breakpoints). An instruction breakpoint is a fault: the #DB is raised
; before `target` runs, so the report names `target` itself, not the `nop` before it.
    lea rax, [rip + target]
    mov dr0, rax              ; breakpoint 0 at target
    mov eax, 1                ; DR7: L0 = 1, R/W0 = 00 (execute), LEN0 = 00
    mov dr7, rax
    mov al, 'b'
    out 0xe9, al
    nop
target:
    inc ecx                   ; never runs: the #DB comes first
    xor eax, eax
    out 0xf4, al
