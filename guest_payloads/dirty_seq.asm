;! mode: long
;! vcpus: 2
;! description: dirties every page of its share each iteration, writing the iteration number
; Entry: RSI = base of this vCPU's share of the data slot, RDX = pages in it,
; RCX = iterations (0 = until stopped). After each iteration: out 0xf0 (sync) with
; EAX = the iteration number, so the host can collect; at the end out 0xf4.
    mov r12, rsi
    mov r13, rdx
    mov r14, rcx
    mov r15, 1                    ; iteration numbers start at 1
iteration:
    mov rdi, r12
    mov rcx, r13
    test rcx, rcx
    jz synced
page:
    mov qword ptr [rdi], r15      ; the content oracle: the page holds its iteration
    add rdi, 4096
    dec rcx
    jnz page
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
