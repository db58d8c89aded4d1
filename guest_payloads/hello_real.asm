;! mode: real
;! description: prints a greeting from 16-bit real mode, then halts
; Real mode: CS = DS = ES = 0x1000 (base 0x10000, where the payload is loaded),
; IP = 0, so addresses in this file are offsets from 0x10000. SS:SP is this
; vCPU's own stack; DI = vCPU index.
    mov si, msg
next:
    mov al, byte ptr [si]
    test al, al
    jz done
    out 0xe9, al
    inc si
    jmp next
done:
    hlt
msg:
    .asciz "Hello from real mode\n"
