// SPDX-License-Identifier: GPL-2.0
/*
 * shadowvol guest stub: intercepts events inside the guest (tracepoints and
 * kprobes, no VM exits) and records them in the "shadow compartment", a
 * physically contiguous region the host reads straight from guest RAM.
 *
 * The host never writes guest memory, so every ring is an overwrite ring:
 * the writer never waits for a reader; the reader keeps its own position and
 * detects loss from sequence numbers. See README.md for the layout.
 */
#include <linux/crc32.h>
#include <linux/gfp.h>
#include <linux/io.h>
#include <linux/kprobes.h>
#include <linux/binfmts.h>
#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/mm.h>
#include <linux/percpu.h>
#include <linux/random.h>
#include <linux/sched.h>
#include <linux/slab.h>
#include <linux/string.h>
#include <linux/timekeeping.h>
#include <linux/tracepoint.h>
#include <asm/local64.h>
#include <asm/page.h>

#define SV_VERSION		1
#define SV_STATIC_SIZE		1280	/* checksummed, constant after load */
#define SV_CRC_OFF		252
#define SV_RINGCTL_OFF		2048	/* per-CPU ring control, one cache line each */
#define SV_RINGCTL_SIZE		64
#define SV_MAX_POINTS		16
#define SV_POINT_SPEC		40
#define SV_RECORD_SIZE		128
#define SV_MAX_NEST		4

enum sv_type {
	SV_EV_SYSCALL = 1,
	SV_EV_SWITCH = 2,
	SV_EV_FORK = 3,
	SV_EV_EXEC = 4,
	SV_EV_EXIT = 5,
	SV_EV_PROBE = 6,
};

#define SV_FLAG_TRUNC	1	/* exec filename truncated */
#define SV_FLAG_NESTED	2	/* written while another record on this CPU was in flight */

/* Bits of the "events" parameter and of hdr->hooks_active. */
#define SV_MASK_SYSCALL	(1u << 0)
#define SV_MASK_SWITCH	(1u << 1)
#define SV_MASK_FORK	(1u << 2)
#define SV_MASK_EXEC	(1u << 3)
#define SV_MASK_EXIT	(1u << 4)
#define SV_MASK_PROBE	(1u << 5)
#define SV_MASK_ALL	0x3f

struct sv_point {
	u64 addr;		/* probed address (kprobe.addr after registration) */
	u64 kprobe;		/* kernel virtual address of the struct kprobe */
	s32 status;		/* 0 = armed, else -errno from register_kprobe */
	u32 reserved;
	char spec[SV_POINT_SPEC];	/* as requested: symbol[+off] or 0xaddr */
} __packed;

struct sv_header {
	char magic[16];			/* 0   "SHADOWVOL-COMPT\0" */
	u32 version;			/* 16 */
	u32 header_size;		/* 20  offset of the first ring */
	u64 total_size;			/* 24 */
	u64 phys_base;			/* 32  physical address of this header */
	u64 virt_base;			/* 40  its kernel virtual address */
	u64 nonce;			/* 48  random per load */
	u64 load_time_ns;		/* 56  ktime_get_real_ns() at load */
	u32 nr_rings;			/* 64  one per possible CPU */
	u32 record_size;		/* 68 */
	u64 ring_base;			/* 72 */
	u64 ring_bytes;			/* 80  stride between rings */
	u32 ring_records;		/* 88  slot of seq s: s % ring_records */
	u32 event_mask;			/* 92  requested events (SV_MASK_*) */
	u64 module_core;		/* 96  THIS_MODULE core_layout.base */
	u32 module_core_size;		/* 104 */
	u32 module_text_size;		/* 108 */
	u64 ref_schedule;		/* 112 runtime &schedule (KASLR cross-check) */
	u64 page_offset_base;		/* 120 */
	u64 hook_fn[6];			/* 128 probe functions: sys_enter, switch, fork, exec, exit, kprobe */
	u64 tracepoint[5];		/* 176 struct tracepoint *: sys_enter, switch, fork, exec, exit */
	u32 nr_points;			/* 216 */
	u32 hooks_active;		/* 220 SV_MASK_* actually registered */
	u32 ringctl_off;		/* 224 */
	u32 ringctl_size;		/* 228 */
	u8 reserved[20];		/* 232 */
	u32 crc;			/* 252 crc32 of [0, 1280) with this field as 0 */
	struct sv_point points[SV_MAX_POINTS];	/* 256 .. 1280 */
} __packed;

struct sv_ringctl {
	local64_t head;		/* last reserved sequence number (first is 1) */
	u64 drops;		/* records the stub could not write */
	u64 nest;		/* writers in flight on this CPU (internal) */
	u64 reserved[5];
};

struct sv_record {
	u64 seq;		/* 0 while being written */
	u64 ts_ns;		/* ktime_get_mono_fast_ns() */
	u16 type;
	u16 cpu;
	u32 flags;
	s32 pid;
	s32 tgid;
	char comm[16];
	u64 a[10];
};

static_assert(sizeof(struct sv_header) == SV_STATIC_SIZE);
static_assert(sizeof(struct sv_record) == SV_RECORD_SIZE);
static_assert(sizeof(struct sv_ringctl) == SV_RINGCTL_SIZE);

static unsigned int size_kb = 4096;
module_param(size_kb, uint, 0444);
MODULE_PARM_DESC(size_kb, "compartment size in KiB (rounded up to a power-of-two page count, max 4096)");
static unsigned int ring_records;
module_param(ring_records, uint, 0444);
MODULE_PARM_DESC(ring_records, "records per CPU ring (0 = fill the compartment)");
static unsigned int events = SV_MASK_ALL;
module_param(events, uint, 0444);
MODULE_PARM_DESC(events, "event mask: 1 syscall, 2 switch, 4 fork, 8 exec, 16 exit, 32 probe");
static char *points;
module_param(points, charp, 0444);
MODULE_PARM_DESC(points, "monitor points: comma-separated symbol[+off] or 0xaddr (kprobes)");

struct sv_state {
	struct page *pages;
	unsigned int order;
	struct sv_header *hdr;
	u32 nrec;
	struct tracepoint *tp[5];
	bool tp_on[5];
	struct kprobe kp[SV_MAX_POINTS];
	unsigned int nkp;
};

static struct sv_state *sv;

static const char *const sv_tp_names[5] = {
	"sys_enter", "sched_switch", "sched_process_fork", "sched_process_exec", "sched_process_exit",
};

static inline struct sv_ringctl *sv_ctl(unsigned int cpu)
{
	return (struct sv_ringctl *)((char *)sv->hdr + SV_RINGCTL_OFF + cpu * SV_RINGCTL_SIZE);
}

/* Reserve a slot on this CPU's ring; NULL (and a counted drop) if impossible. */
static __always_inline struct sv_record *sv_begin(u16 type, u64 *seqp, struct task_struct *t)
{
	struct sv_header *h = sv->hdr;
	unsigned int cpu = raw_smp_processor_id();
	struct sv_ringctl *ctl;
	struct sv_record *r;
	u64 seq;

	if (unlikely(cpu >= h->nr_rings))
		return NULL;
	ctl = sv_ctl(cpu);
	if (unlikely(ctl->nest >= SV_MAX_NEST)) {
		ctl->drops++;
		return NULL;
	}
	ctl->nest++;
	seq = local64_inc_return(&ctl->head);
	r = (struct sv_record *)((char *)h + h->ring_base + (u64)cpu * h->ring_bytes +
				 (u64)(u32)(seq % sv->nrec) * SV_RECORD_SIZE);
	WRITE_ONCE(r->seq, 0);
	smp_wmb();
	r->ts_ns = ktime_get_mono_fast_ns();
	r->type = type;
	r->cpu = cpu;
	r->flags = ctl->nest > 1 ? SV_FLAG_NESTED : 0;
	r->pid = t->pid;
	r->tgid = t->tgid;
	memcpy(r->comm, t->comm, sizeof(r->comm));
	*seqp = seq;
	return r;
}

static __always_inline void sv_commit(struct sv_record *r, u64 seq)
{
	smp_wmb();
	WRITE_ONCE(r->seq, seq);
	sv_ctl(r->cpu)->nest--;
}

/* Hooks. The record's pid/tgid/comm are those of the task the event is about. */

static void notrace sv_sys_enter(void *data, struct pt_regs *regs, long id)
{
	struct sv_record *r;
	unsigned long flags;
	u64 seq;

	local_irq_save(flags);
	r = sv_begin(SV_EV_SYSCALL, &seq, current);
	if (r) {
		r->a[0] = id;
		r->a[1] = regs->di;
		r->a[2] = regs->si;
		r->a[3] = regs->dx;
		r->a[4] = regs->r10;
		r->a[5] = regs->r8;
		r->a[6] = regs->r9;
		r->a[7] = 0;
		r->a[8] = 0;
		r->a[9] = 0;
		sv_commit(r, seq);
	}
	local_irq_restore(flags);
}

static void notrace sv_sched_switch(void *data, bool preempt, struct task_struct *prev,
				    struct task_struct *next, unsigned int prev_state)
{
	struct sv_record *r;
	unsigned long flags;
	u64 seq;

	local_irq_save(flags);
	r = sv_begin(SV_EV_SWITCH, &seq, prev);
	if (r) {
		r->a[0] = prev->pid;
		r->a[1] = next->pid;
		r->a[2] = next->tgid;
		r->a[3] = prev_state;
		r->a[4] = preempt;
		memcpy(&r->a[5], next->comm, 16);
		r->a[7] = 0;
		r->a[8] = 0;
		r->a[9] = 0;
		sv_commit(r, seq);
	}
	local_irq_restore(flags);
}

static void notrace sv_fork(void *data, struct task_struct *parent, struct task_struct *child)
{
	struct sv_record *r;
	unsigned long flags;
	u64 seq;

	local_irq_save(flags);
	r = sv_begin(SV_EV_FORK, &seq, parent);
	if (r) {
		r->a[0] = parent->pid;
		r->a[1] = child->pid;
		r->a[2] = child->tgid;
		memset(&r->a[3], 0, 7 * sizeof(u64));
		sv_commit(r, seq);
	}
	local_irq_restore(flags);
}

static void notrace sv_exec(void *data, struct task_struct *p, pid_t old_pid,
			    struct linux_binprm *bprm)
{
	struct sv_record *r;
	unsigned long flags;
	u64 seq;
	ssize_t n;

	local_irq_save(flags);
	r = sv_begin(SV_EV_EXEC, &seq, p);
	if (r) {
		r->a[0] = old_pid;
		n = strscpy((char *)&r->a[1], bprm->filename, 9 * sizeof(u64));
		if (n < 0)
			r->flags |= SV_FLAG_TRUNC;
		else
			memset((char *)&r->a[1] + n, 0, 9 * sizeof(u64) - n);
		sv_commit(r, seq);
	}
	local_irq_restore(flags);
}

static void notrace sv_exit(void *data, struct task_struct *p)
{
	struct sv_record *r;
	unsigned long flags;
	u64 seq;

	local_irq_save(flags);
	r = sv_begin(SV_EV_EXIT, &seq, p);
	if (r) {
		r->a[0] = (u32)p->exit_code;
		r->a[1] = thread_group_leader(p);
		memset(&r->a[2], 0, 8 * sizeof(u64));
		sv_commit(r, seq);
	}
	local_irq_restore(flags);
}

static int notrace sv_kprobe_pre(struct kprobe *kp, struct pt_regs *regs)
{
	struct sv_record *r;
	unsigned long flags;
	u64 seq;

	local_irq_save(flags);
	r = sv_begin(SV_EV_PROBE, &seq, current);
	if (r) {
		r->a[0] = (unsigned long)kp->addr;
		r->a[1] = regs->ip;
		r->a[2] = regs->di;
		r->a[3] = regs->si;
		r->a[4] = regs->dx;
		r->a[5] = regs->cx;
		r->a[6] = regs->r8;
		r->a[7] = regs->r9;
		r->a[8] = regs->sp;
		r->a[9] = regs->ax;
		sv_commit(r, seq);
	}
	local_irq_restore(flags);
	return 0;
}

static void *const sv_tp_fn[5] = { sv_sys_enter, sv_sched_switch, sv_fork, sv_exec, sv_exit };

static void sv_find_tp(struct tracepoint *tp, void *priv)
{
	struct sv_state *s = priv;
	int i;

	for (i = 0; i < 5; i++)
		if (!s->tp[i] && !strcmp(tp->name, sv_tp_names[i]))
			s->tp[i] = tp;
}

static void sv_parse_points(struct sv_header *h)
{
	char *buf, *cur, *tok;
	unsigned int n = 0;

	if (!points || !*points)
		return;
	buf = kstrdup(points, GFP_KERNEL);
	if (!buf)
		return;
	cur = buf;
	while ((tok = strsep(&cur, ",")) && n < SV_MAX_POINTS) {
		struct kprobe *kp = &sv->kp[n];
		struct sv_point *pt = &h->points[n];
		char *plus;
		unsigned long v;

		tok = strim(tok);
		if (!*tok)
			continue;
		strscpy(pt->spec, tok, sizeof(pt->spec));
		memset(kp, 0, sizeof(*kp));
		if (!strncmp(tok, "0x", 2)) {
			pt->status = kstrtoul(tok, 16, &v);
			kp->addr = (kprobe_opcode_t *)v;
		} else {
			plus = strchr(tok, '+');
			if (plus) {
				*plus = 0;
				pt->status = kstrtoul(plus + 1, 0, &v);
				kp->offset = v;
			}
			kp->symbol_name = kstrdup(tok, GFP_KERNEL);
			if (!kp->symbol_name)
				pt->status = -ENOMEM;
		}
		kp->pre_handler = sv_kprobe_pre;
		if (!pt->status && (events & SV_MASK_PROBE))
			pt->status = register_kprobe(kp);
		else if (!pt->status)
			pt->status = -EPERM;
		if (!pt->status) {
			pt->addr = (unsigned long)kp->addr;
			pt->kprobe = (unsigned long)kp;
			h->hooks_active |= SV_MASK_PROBE;
		} else {
			pr_warn("shadow_stub: monitor point %s: error %d\n", pt->spec, pt->status);
			kfree(kp->symbol_name);
			kp->symbol_name = NULL;
			kp->addr = NULL;
		}
		n++;
	}
	h->nr_points = n;
	sv->nkp = n;
	kfree(buf);
}

static void sv_unregister_all(void)
{
	unsigned int i;

	for (i = 0; i < 5; i++) {
		if (sv->tp_on[i])
			tracepoint_probe_unregister(sv->tp[i], sv_tp_fn[i], NULL);
		sv->tp_on[i] = false;
	}
	for (i = 0; i < sv->nkp; i++) {
		if (sv->hdr->points[i].status == 0)
			unregister_kprobe(&sv->kp[i]);
		kfree(sv->kp[i].symbol_name);
	}
	sv->nkp = 0;
	tracepoint_synchronize_unregister();
}

/*
 * Largest buddy allocation, in bytes. MAX_ORDER_NR_PAGES means the same on
 * every kernel, across MAX_ORDER turning inclusive (v6.4, commit 23baf831a32c
 * "mm, treewide: redefine MAX_ORDER sanely") and its rename to MAX_PAGE_ORDER
 * (v6.8, commit 5e0a760b4441): detected by the preprocessor, never by version.
 */
#if defined(MAX_ORDER_NR_PAGES)
#define SV_MAX_ALLOC (PAGE_SIZE * MAX_ORDER_NR_PAGES)
#elif defined(MAX_PAGE_ORDER)
#define SV_MAX_ALLOC (PAGE_SIZE << MAX_PAGE_ORDER)
#else
#define SV_MAX_ALLOC (PAGE_SIZE << (MAX_ORDER - 1))
#endif

/*
 * The module's own text. module_layout gave way to module_memory in v6.4
 * (commit ac3b43283923 "module: replace module_layout with module_memory"),
 * which also added for_each_mod_mem_type(): the preprocessor tells them apart.
 * There, text is mem[MOD_TEXT] alone (as shadowvol/integrity.py reads it).
 */
#ifdef for_each_mod_mem_type
#define SV_MODULE_TEXT_BASE ((unsigned long)THIS_MODULE->mem[MOD_TEXT].base)
#define SV_MODULE_CORE_SIZE (THIS_MODULE->mem[MOD_TEXT].size)
#define SV_MODULE_TEXT_SIZE (THIS_MODULE->mem[MOD_TEXT].size)
#else
#define SV_MODULE_TEXT_BASE ((unsigned long)THIS_MODULE->core_layout.base)
#define SV_MODULE_CORE_SIZE (THIS_MODULE->core_layout.size)
#define SV_MODULE_TEXT_SIZE (THIS_MODULE->core_layout.text_size)
#endif

/*
 * The compartment's geometry: 2^order pages in all, a header of hsize bytes
 * (static part and the per-CPU ring controls), then nr rings of recs records.
 */
struct sv_geometry {
	int order;
	u64 total, hsize, recs;
};

static int __init sv_plan(unsigned int nr, struct sv_geometry *g)
{
	u64 per_ring;

	if (size_kb == 0 || size_kb > SV_MAX_ALLOC / 1024) {
		pr_err("shadow_stub: size_kb must be 1..%lu\n", (unsigned long)(SV_MAX_ALLOC / 1024));
		return -EINVAL;
	}
	if (SV_RINGCTL_OFF + nr * SV_RINGCTL_SIZE > 64 * 1024) {
		pr_err("shadow_stub: too many CPUs (%u)\n", nr);
		return -EINVAL;
	}
	g->order = get_order((u64)size_kb * 1024);
	g->total = PAGE_SIZE << g->order;
	g->hsize = PAGE_ALIGN(SV_RINGCTL_OFF + nr * SV_RINGCTL_SIZE);
	per_ring = (g->total - g->hsize) / nr;
	g->recs = per_ring / SV_RECORD_SIZE;
	if (g->recs < 16) {
		pr_err("shadow_stub: compartment too small for %u CPUs\n", nr);
		return -EINVAL;
	}
	if (g->recs > U32_MAX)
		g->recs = U32_MAX;
	if (ring_records) {
		if (ring_records < 16 || ring_records > g->recs) {
			pr_err("shadow_stub: ring_records must be in 16..%llu\n", g->recs);
			return -EINVAL;
		}
		g->recs = ring_records;
	}
	return 0;
}

/* Everything the host reads to find and check the compartment, but the magic and CRC. */
static void __init sv_fill_header(struct sv_header *h, unsigned int nr, const struct sv_geometry *g)
{
	unsigned int i;

	h->version = SV_VERSION;
	h->header_size = g->hsize;
	h->total_size = g->total;
	h->phys_base = page_to_phys(sv->pages);
	h->virt_base = (unsigned long)h;
	h->nonce = get_random_u64();
	h->load_time_ns = ktime_get_real_ns();
	h->nr_rings = nr;
	h->record_size = SV_RECORD_SIZE;
	h->ring_base = g->hsize;
	h->ring_bytes = g->recs * SV_RECORD_SIZE;
	h->ring_records = g->recs;
	h->event_mask = events & SV_MASK_ALL;
	h->module_core = SV_MODULE_TEXT_BASE;
	h->module_core_size = SV_MODULE_CORE_SIZE;
	h->module_text_size = SV_MODULE_TEXT_SIZE;
	h->ref_schedule = (unsigned long)&schedule;
	h->page_offset_base = page_offset_base;
	for (i = 0; i < 5; i++)
		h->hook_fn[i] = (unsigned long)sv_tp_fn[i];
	h->hook_fn[5] = (unsigned long)sv_kprobe_pre;
	h->ringctl_off = SV_RINGCTL_OFF;
	h->ringctl_size = SV_RINGCTL_SIZE;
	for (i = 0; i < nr; i++)
		local64_set(&sv_ctl(i)->head, 0);
}

/* Register on the tracepoints the events= mask asks for; on failure the caller unregisters. */
static int __init sv_register_tracepoints(struct sv_header *h)
{
	unsigned int i;
	int err;

	for_each_kernel_tracepoint(sv_find_tp, sv);
	for (i = 0; i < 5; i++) {
		if (!(events & (1u << i)))
			continue;
		if (!sv->tp[i]) {
			pr_err("shadow_stub: tracepoint %s not found\n", sv_tp_names[i]);
			return -ENOENT;
		}
		h->tracepoint[i] = (unsigned long)sv->tp[i];
		err = tracepoint_probe_register(sv->tp[i], sv_tp_fn[i], NULL);
		if (err) {
			pr_err("shadow_stub: registering on %s: %d\n", sv_tp_names[i], err);
			return err;
		}
		sv->tp_on[i] = true;
		h->hooks_active |= 1u << i;
	}
	return 0;
}

static int __init sv_init(void)
{
	unsigned int nr = nr_cpu_ids;
	struct sv_geometry g;
	struct sv_header *h;
	int err;

	err = sv_plan(nr, &g);
	if (err)
		return err;
	sv = kzalloc(sizeof(*sv), GFP_KERNEL);
	if (!sv)
		return -ENOMEM;
	sv->pages = alloc_pages(GFP_KERNEL | __GFP_ZERO | __GFP_NOWARN, g.order);
	if (!sv->pages) {
		pr_err("shadow_stub: cannot allocate %llu contiguous bytes\n", g.total);
		err = -ENOMEM;
		goto free_state;
	}
	sv->order = g.order;
	sv->hdr = h = page_address(sv->pages);
	sv->nrec = g.recs;
	sv_fill_header(h, nr, &g);
	err = sv_register_tracepoints(h);
	if (err)
		goto unregister;
	sv_parse_points(h);

	/* Publish: magic and checksum last, so the host never sees a half header. */
	smp_wmb();
	memcpy(h->magic, "SHADOWVOL-COMPT", 16);
	h->crc = 0;
	h->crc = crc32_le(~0U, (const u8 *)h, SV_STATIC_SIZE) ^ ~0U;
	pr_info("shadow_stub: compartment at phys %#llx, %llu bytes, %u rings x %llu records, events %#x, %u points\n",
		h->phys_base, g.total, nr, g.recs, h->hooks_active, h->nr_points);
	return 0;

unregister:
	sv_unregister_all();
	__free_pages(sv->pages, sv->order);
free_state:
	kfree(sv);
	sv = NULL;
	return err;
}

static void __exit sv_exit_module(void)
{
	sv_unregister_all();
	/* No hook runs any more: clear the magic so the host sees the stub is gone. */
	memset(sv->hdr->magic, 0, sizeof(sv->hdr->magic));
	sv->hdr->crc = 0;
	__free_pages(sv->pages, sv->order);
	kfree(sv);
	pr_info("shadow_stub: unloaded\n");
}

module_init(sv_init);
module_exit(sv_exit_module);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("shadowvol in-guest stub: event rings in a shadow compartment");
