/* SPDX-License-Identifier: GPL-2.0 */
/* The replacement getppid of the syscall-hooking kits: RK_MARKER in processes
 * whose comm starts with "rkmark" (the test's witness), the real parent's pid
 * elsewhere, so the guest keeps working. */
#ifndef RK_MARKER_H
#define RK_MARKER_H

#include <linux/rcupdate.h>
#include <linux/sched.h>
#include <linux/string.h>

#define RK_MARKER 31337

static inline bool rk_marked(void)
{
	return !strncmp(current->comm, "rkmark", 6);
}

static long rk_getppid(const struct pt_regs *regs)
{
	long pid;

	if (rk_marked())
		return RK_MARKER;
	rcu_read_lock();
	pid = task_tgid_vnr(rcu_dereference(current->real_parent));
	rcu_read_unlock();
	return pid;
}

#endif /* RK_MARKER_H */
