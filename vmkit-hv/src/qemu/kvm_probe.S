/* vmkit's KVM probe: a 64 KiB flat BIOS image for `qemu-system-x86_64 -bios`.
 *
 * From the reset vector it does what a Linux kernel does on its way up: real mode ->
 * protected mode -> long mode with 4-level paging, then CPUID, lock cmpxchg16b, SSE2,
 * writes across 16 MiB of RAM and a 2^24-round ALU loop, and reports through
 * isa-debug-exit at port 0xf4: QEMU exits with (0x2a << 1) | 1 = 85 when every check
 * passes, with 43 when one computes a wrong result. A triple fault (no IDT is set up)
 * ends QEMU with status 0 under -no-reboot.
 *
 * The bytes are embedded in probe.rs; rebuild them with
 *   as --64 kvm_probe.S -o p.o && ld -Ttext=0xf0000 -e 0xf0000 --oformat binary -o p.bin p.o
 * (the image is mapped at 0xf0000 and at 0xffff0000; the CPU starts at 0xffff_fff0).
 */
	.set BASE, 0xf0000
	.set PML4, 0x1000
	.set PDPT, 0x2000
	.set PD,   0x3000
	.set PORT, 0xf4
	.set OK, 0x2a
	.set BAD, 0x15
	.code16
	.text
start16:
	cli
	cld
	/* Copy the GDT into RAM at 0x600 and load it from there. */
	xor %ax, %ax
	mov %ax, %es
	mov %cs, %ax
	mov %ax, %ds
	mov $(gdt - BASE), %si
	mov $0x600, %di
	mov $(gdt_end - gdt), %cx
	rep movsb
	xor %ax, %ax
	mov %ax, %ds
	movw $(gdt_end - gdt - 1), 0x5f8
	movl $0x600, 0x5fa
	lgdtl 0x5f8
	mov %cr0, %eax
	or $1, %eax
	mov %eax, %cr0
	ljmpl $0x08, $start32

	.code32
start32:
	mov $0x10, %ax
	mov %ax, %ds
	mov %ax, %es
	mov %ax, %ss
	mov $0x9000, %esp
	/* Page tables: identity map the first 64 MiB with 2 MiB pages. */
	xor %eax, %eax
	mov $PML4, %edi
	mov $(3 * 4096 / 4), %ecx
	rep stosl
	movl $(PDPT | 3), PML4
	movl $(PD | 3), PDPT
	mov $PD, %edi
	mov $0x83, %eax
	mov $32, %ecx
1:	mov %eax, (%edi)
	add $0x200000, %eax
	add $8, %edi
	loop 1b
	mov $PML4, %eax
	mov %eax, %cr3
	mov %cr4, %eax
	or $((1 << 5) | (1 << 9)), %eax   /* PAE, OSFXSR */
	mov %eax, %cr4
	mov $0xc0000080, %ecx             /* EFER.LME */
	rdmsr
	or $(1 << 8), %eax
	wrmsr
	mov %cr0, %eax
	or $(1 << 31), %eax
	mov %eax, %cr0
	ljmp $0x18, $start64

	.code64
start64:
	mov $0x10, %ax
	mov %ax, %ds
	mov %ax, %ss
	mov $0x9000, %rsp
	/* lock cmpxchg16b, which a 64-bit kernel uses early, when CPUID offers it. */
	mov $1, %eax
	cpuid
	bt $13, %ecx
	jnc 2f
	movq $0, 0x8000
	movq $0, 0x8008
	xor %eax, %eax
	xor %edx, %edx
	mov $0x1111, %ebx
	mov $0x2222, %ecx
	lock cmpxchg16b 0x8000
	jne bad
	cmpq $0x1111, 0x8000
	jne bad
2:	/* SSE2 */
	mov $0x5a5a, %eax
	movq %rax, %xmm0
	paddq %xmm0, %xmm0
	movq %xmm0, %rax
	cmp $0xb4b4, %rax
	jne bad
	/* Touch 16 MiB from 32 MiB on, one qword per 4 KiB page, 4 rounds. */
	mov $4, %r8
3:	mov $0x2000000, %rdi
	mov $4096, %rcx
4:	add %rcx, (%rdi)
	add $4096, %rdi
	loop 4b
	dec %r8
	jnz 3b
	/* An ALU loop of 2^24 rounds: milliseconds under KVM, seconds when emulated. */
	mov $(1 << 24), %rcx
	xor %rax, %rax
5:	add %rcx, %rax
	rol $3, %rax
	loop 5b
	mov $OK, %al
	out %al, $PORT
	jmp 6f
bad:
	mov $BAD, %al
	out %al, $PORT
6:	hlt
	jmp 6b

	.p2align 3
gdt:
	.quad 0
	.quad 0x00cf9a000000ffff  /* 0x08: 32-bit code */
	.quad 0x00cf92000000ffff  /* 0x10: data */
	.quad 0x00af9a000000ffff  /* 0x18: 64-bit code */
gdt_end:

	.org 0xfff0
reset:
	.code16
	jmp start16
	.org 0x10000
