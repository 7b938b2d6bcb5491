// SPDX-License-Identifier: GPL-2.0
/* Test kit: tamper with the shadowvol guest stub, so the host's integrity
 * check (shadowvol trace-check) must notice. Never load it outside a test VM.
 *
 *   mode=probe   register a foreign sys_enter probe that runs before the stub's
 *   mode=unhook  unregister the stub's sys_enter probe (events silently stop)
 *   mode=code    write int3 (0xcc) at addr=A, which must be in the stub's code,
 *                with CR0.WP cleared (a classic inline hook)
 *
 * The stub's code is recognised with sprint_symbol() ("... [shadow_stub]"):
 * 6.1 exports neither find_module nor __module_address.
 */
#include <linux/module.h>
#include <linux/tracepoint.h>
#include <linux/string.h>
#include <linux/irqflags.h>
#include <linux/preempt.h>
#include <linux/kallsyms.h>

static char *mode = "probe";
module_param(mode, charp, 0444);
static unsigned long addr;
module_param(addr, ulong, 0444);

static struct tracepoint *tp_sys_enter;
static int registered;

static void find_tp(struct tracepoint *tp, void *priv)
{
	if (!strcmp(tp->name, "sys_enter"))
		tp_sys_enter = tp;
}

static void rk_probe(void *data, struct pt_regs *regs, long id)
{
	/* A rootkit would filter or forge here; doing nothing is enough. */
}

static bool in_stub(void *p)
{
	char buf[KSYM_SYMBOL_LEN];

	sprint_symbol(buf, (unsigned long)p);
	return strstr(buf, "[shadow_stub]") != NULL;
}

static int __init rk_init(void)
{
	for_each_kernel_tracepoint(find_tp, NULL);
	if (!tp_sys_enter)
		return -ENOENT;

	if (!strcmp(mode, "probe")) {
		int ret = tracepoint_probe_register_prio(tp_sys_enter, rk_probe, NULL, 1000);

		if (ret)
			return ret;
		registered = 1;
		pr_info("rk_stubtamper: foreign sys_enter probe %px registered first\n", rk_probe);
	} else if (!strcmp(mode, "unhook")) {
		struct tracepoint_func *f;
		void *fn = NULL, *data = NULL;

		rcu_read_lock_sched();
		f = rcu_dereference_sched(tp_sys_enter->funcs);
		for (; f && f->func; f++)
			if (in_stub(f->func)) {
				fn = f->func;
				data = f->data;
				break;
			}
		rcu_read_unlock_sched();
		if (!fn)
			return -ENOENT;
		tracepoint_probe_unregister(tp_sys_enter, fn, data);
		pr_info("rk_stubtamper: stub probe %px unregistered\n", fn);
	} else if (!strcmp(mode, "code")) {
		unsigned char *p = (unsigned char *)addr;
		unsigned long cr0, flags;

		if (!in_stub(p))
			return -EINVAL;
		local_irq_save(flags);
		preempt_disable();
		asm volatile("mov %%cr0, %0" : "=r"(cr0));
		asm volatile("mov %0, %%cr0" : : "r"(cr0 & ~X86_CR0_WP) : "memory");
		*p = 0xcc;
		asm volatile("mov %0, %%cr0" : : "r"(cr0) : "memory");
		preempt_enable();
		local_irq_restore(flags);
		pr_info("rk_stubtamper: int3 written at %px (%pS)\n", p, p);
	} else {
		return -EINVAL;
	}
	return 0;
}

static void __exit rk_exit(void)
{
	if (registered) {
		tracepoint_probe_unregister(tp_sys_enter, rk_probe, NULL);
		tracepoint_synchronize_unregister();
	}
}

module_init(rk_init);
module_exit(rk_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("shadowvol test kit: tamper with the guest stub");
