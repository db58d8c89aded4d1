;! mode: long
;! vcpus: 4
;! description: every vCPU prints its own index (RDI) and exits 0
    mov rbx, rdi              ; keep the index
    lea rsi, [rip + msg]
    call puts
    mov rax, rbx
    call putdec
    mov al, 10
    out 0xe9, al
    xor eax, eax
    out 0xf4, al

puts:                         ; print the NUL-terminated string at RSI
    mov al, byte ptr [rsi]
    test al, al
    jz puts_done
    out 0xe9, al
    inc rsi
    jmp puts
puts_done:
    ret

putdec:                       ; print RAX in decimal
    mov rcx, 10
    xor r8, r8                ; digit count
divide:
    xor edx, edx
    div rcx
    push rdx
    inc r8
    test rax, rax
    jnz divide
emit:
    pop rax
    add al, 0x30
    out 0xe9, al
    dec r8
    jnz emit
    ret

msg:
    .asciz "hello from vCPU "
