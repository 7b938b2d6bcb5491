// SPDX-License-Identifier: GPL-2.0
/* Test rootkit: patches the entry of __x64_sys_getppid with a 5-byte
 * "jmp rel32" to this module. The hook implements getppid() itself, so the
 * guest keeps working. Only the ftrace site (nop5) at the entry is replaced;
 * the module refuses to load if that site is not a nop5 (ftrace in use).
 * rmmod restores the original bytes.
 *
 * The handler is found with kallsyms_lookup_name() (via a kprobe) and patched
 * through a temporary writable vmap() alias of its page. */
#include <linux/kprobes.h>
#include <linux/module.h>
#include <linux/mm.h>
#include <linux/rcupdate.h>
#include <linux/sched.h>
#include <linux/vmalloc.h>

#include "rk_common.h"

#define RK_TARGET "__x64_sys_getppid"

static const unsigned char rk_nop5[5] = { 0x0f, 0x1f, 0x44, 0x00, 0x00 };
static unsigned char rk_saved[5];
static unsigned char *rk_entry;

/* getppid(2), as kernel/sys.c implements it. */
static long rk_getppid(const struct pt_regs *regs)
{
	long pid;

	rcu_read_lock();
	pid = task_tgid_vnr(rcu_dereference(current->real_parent));
	rcu_read_unlock();
	return pid;
}

static int __init rk_inline_init(void)
{
	unsigned char jmp[5] = { 0xe9 };
	long rel;
	int err;

	rk_entry = (unsigned char *)rk_lookup_name(RK_TARGET);
	if (!rk_entry)
		return -ENOENT;
	memcpy(rk_saved, rk_entry, sizeof(rk_saved));
	if (memcmp(rk_saved, rk_nop5, sizeof(rk_nop5)))
		return -EBUSY;
	rel = (long)rk_getppid - ((long)rk_entry + 5);
	if (rel != (s32)rel)
		return -ERANGE;
	*(s32 *)&jmp[1] = (s32)rel;
	err = rk_poke(rk_entry, jmp, sizeof(jmp));
	if (err)
		return err;
	pr_info("rk_inline: %s at %px -> jmp %px\n", RK_TARGET, rk_entry, rk_getppid);
	return 0;
}

static void __exit rk_inline_exit(void)
{
	rk_poke(rk_entry, rk_saved, sizeof(rk_saved));
	synchronize_rcu();
	pr_info("rk_inline: %s restored\n", RK_TARGET);
}

module_init(rk_inline_init);
module_exit(rk_inline_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("shadowvol test rootkit: inline hook of a syscall handler");
