;! mode: long
;! description: executes HLT at CPL3, which raises #GP, which the host reports
    lea rsi, [rip + msg]
print:
    mov al, byte ptr [rsi]
    test al, al
    jz fault
    out 0xe9, al
    inc rsi
    jmp print
fault:
    hlt                       ; privileged: #GP(0) at CPL3
    xor eax, eax
    out 0xf4, al              ; never reached
msg:
    .asciz "about to execute hlt at CPL3\n"
