;! mode: real
;! description: benchmark: ECX round trips through the sync port (out 0xf0) in real mode
again:
    out 0xf0, al
    dec ecx
    jnz again
    xor ax, ax
    out 0xf4, al
