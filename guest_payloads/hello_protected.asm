;! mode: protected
;! description: prints a greeting from 32-bit flat protected mode, then halts
; Flat segments (base 0, 4 GiB), paging off, CPL0; loaded at 0x10000.
    mov esi, msg
next:
    mov al, byte ptr [esi]
    test al, al
    jz done
    out 0xe9, al
    inc esi
    jmp next
done:
    hlt
msg:
    .asciz "Hello from protected mode\n"
