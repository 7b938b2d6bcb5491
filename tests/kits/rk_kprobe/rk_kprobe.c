// SPDX-License-Identifier: GPL-2.0
/* Test rootkit: a kprobe-based syscall hook. A kprobe on __x64_sys_getppid
 * (placed on its ftrace site) whose pre-handler, for marked processes,
 * points regs->ip at this module's replacement and returns 1, so the probed
 * function never runs. rmmod unregisters the probe. */
#include <linux/kprobes.h>
#include <linux/module.h>

#include "rk_marker.h"

static int rk_pre(struct kprobe *p, struct pt_regs *regs)
{
	if (!rk_marked())
		return 0;
	instruction_pointer_set(regs, (unsigned long)rk_getppid);
	return 1;
}

static struct kprobe rk_kp = {
	.symbol_name = "__x64_sys_getppid",
	.pre_handler = rk_pre,
};

static int __init rk_kprobe_init(void)
{
	int err = register_kprobe(&rk_kp);

	if (err)
		return err;
	pr_info("rk_kprobe: kprobe at %px\n", rk_kp.addr);
	return 0;
}

static void __exit rk_kprobe_exit(void)
{
	unregister_kprobe(&rk_kp);
}

module_init(rk_kprobe_init);
module_exit(rk_kprobe_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("shadowvol test rootkit: kprobe hook of getppid");
