// SPDX-License-Identifier: GPL-2.0
/* A harmless test module: proves that modules built against the image's
 * Debian headers load in the guest, and reports offsetof(task_struct, comm)
 * (and friends) from the kernel's own headers, for profile tests. */
#include <linux/module.h>
#include <linux/sched.h>
#include <linux/stddef.h>

static int __init sv_hello_init(void)
{
	pr_info("sv_hello: task_struct.comm=%zu task_struct.pid=%zu task_struct.tasks=%zu sizeof=%zu\n",
		offsetof(struct task_struct, comm), offsetof(struct task_struct, pid),
		offsetof(struct task_struct, tasks), sizeof(struct task_struct));
	return 0;
}

static void __exit sv_hello_exit(void)
{
	pr_info("sv_hello: unloaded\n");
}

module_init(sv_hello_init);
module_exit(sv_hello_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("shadowvol test module");
