;! mode: long
;! vcpus: 2
;! description: dirties R10 pages of its share per iteration, chosen by a seeded LCG (R9)
; Entry as dirty_seq, plus R9 = seed, R10 = writes per iteration. Like the kernel's
; dirty_log_test, pages are picked at random; the generator is the 64-bit LCG
; x = x * 6364136223846793005 + 1442695040888963407, page = (x >> 33) mod pages,
; seeded with R9 + vCPU index (RDI), so the host can replay the plan exactly.
    mov r12, rsi
    mov r13, rdx
    mov r14, rcx
    mov r15, 1
    mov rbx, r9
    add rbx, rdi                  ; this vCPU's generator state
    mov rsi, 6364136223846793005
iteration:
    mov rcx, r10
    test r13, r13
    jz synced
    test rcx, rcx
    jz synced
write:
    mov rax, rbx
    imul rax, rsi
    mov r8, 1442695040888963407
    add rax, r8
    mov rbx, rax
    shr rax, 33
    xor edx, edx
    div r13                       ; rdx = page within the share
    shl rdx, 12
    mov qword ptr [r12 + rdx], r15
    dec rcx
    jnz write
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
