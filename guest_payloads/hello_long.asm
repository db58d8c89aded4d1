;! mode: long
;! description: prints a greeting from 64-bit long mode (CPL3 by default) and exits 0
; Entry: RDI = vCPU index, RSP = this vCPU's stack (README, "Guest conventions").
    lea rsi, [rip + msg]
next:
    mov al, byte ptr [rsi]
    test al, al
    jz done
    out 0xe9, al            ; console: one byte per out
    inc rsi
    jmp next
done:
    xor eax, eax
    out 0xf4, al            ; exit code 0
msg:
    .asciz "Hello from long mode\n"
