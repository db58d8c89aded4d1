;! mode: long
;! description: benchmark: RCX round trips through the sync port (out 0xf0), then exit 0
    mov rcx, rcx              ; RCX = iterations, set by the host
again:
    out 0xf0, al
    dec rcx
    jnz again
    xor eax, eax
    out 0xf4, al
