;! mode: long
;! description: writes to 0xd0000000, an identity-mapped address with no memory slot (MMIO)
    mov rdi, 0xd0000000
    mov dword ptr [rdi], 0x11223344
    xor eax, eax
    out 0xf4, al
