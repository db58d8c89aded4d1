;! mode: long
;! cpl: 0
;! description: loads an empty IDT at CPL0 and executes ud2: a triple fault (KVM_EXIT_SHUTDOWN)
    lidt [rip + empty_idt]
    ud2
empty_idt:
    .word 0
    .quad 0
