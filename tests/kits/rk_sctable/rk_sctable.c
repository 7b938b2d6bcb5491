// SPDX-License-Identifier: GPL-2.0
/* Test rootkit: replaces sys_call_table[__NR_getdents64] with a function of
 * this module, the classic table hook. Kernels that dispatch through
 * x64_sys_call() never read the table, so the guest keeps working; the
 * wrapper forwards to the real handler anyway. rmmod restores the entry.
 *
 * sys_call_table is found with kallsyms_lookup_name(), itself found with a
 * kprobe (it is not exported since 5.7). The table is in .rodata: it is
 * written through a temporary writable vmap() alias of its page, the way
 * text_poke() used to work, so CR0.WP and the page tables stay untouched. */
#include <linux/kprobes.h>
#include <linux/module.h>
#include <linux/mm.h>
#include <linux/vmalloc.h>

#include "rk_common.h"
#include <asm/syscall.h>
#include <asm/unistd.h>

#define RK_NR __NR_getdents64

typedef long (*rk_syscall_t)(const struct pt_regs *);
static rk_syscall_t *rk_table;
static rk_syscall_t rk_orig;

static long rk_getdents64(const struct pt_regs *regs)
{
	return rk_orig(regs);
}

static int __init rk_sctable_init(void)
{
	rk_syscall_t hook = rk_getdents64;
	int err;

	rk_table = (rk_syscall_t *)rk_lookup_name("sys_call_table");
	if (!rk_table)
		return -ENOENT;
	rk_orig = rk_table[RK_NR];
	err = rk_poke(&rk_table[RK_NR], &hook, sizeof(hook));
	if (err)
		return err;
	pr_info("rk_sctable: sys_call_table[%d] %px -> %px\n", RK_NR, rk_orig, hook);
	return 0;
}

static void __exit rk_sctable_exit(void)
{
	rk_poke(&rk_table[RK_NR], &rk_orig, sizeof(rk_orig));
	pr_info("rk_sctable: sys_call_table[%d] restored\n", RK_NR);
}

module_init(rk_sctable_init);
module_exit(rk_sctable_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("shadowvol test rootkit: sys_call_table entry hook");
