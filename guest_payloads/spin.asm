;! mode: long
;! description: loops forever; only the timeout stops it
    mov al, 0x2e              ; '.'
    out 0xe9, al
spin:
    pause
    jmp spin
