;! mode: long
;! vcpus: 2
;! description: dirties every k-th page of its share (k in R8), writing the iteration number
; Entry as dirty_seq, plus R8 = stride k. Pages 0, k, 2k, ... of the share. A stride of 0
; (`minivmm run` sets no R8) is taken as 1: it would never leave page 0.
    mov r12, rsi
    mov r13, rdx
    mov r14, rcx
    mov r15, 1
    test r8, r8
    jnz stride_set
    mov r8, 1
stride_set:
    mov rbx, r8
    shl rbx, 12                   ; stride in bytes
iteration:
    xor rcx, rcx                  ; page index within the share
page:
    cmp rcx, r13
    jae synced
    mov rdi, rcx
    shl rdi, 12
    mov qword ptr [r12 + rdi], r15
    add rcx, r8
    jmp page
synced:
    mov eax, r15d
    out 0xf0, eax
    cmp r15, r14
    je finished
    inc r15
    jmp iteration
finished:
    xor eax, eax
    out 0xf4, al
