/* Test rootkit (user space): load an eBPF program with raw bpf() syscalls (no
 * libbpf) and attach it to the raw tracepoint sys_enter, i.e. to every
 * system call. For getppid() calls of processes whose comm starts with
 * "rkmark", the program writes RK_MARKER with bpf_probe_write_user() into
 * the user buffer whose address the caller passed in its first argument
 * register (getppid ignores its arguments). The loader prints "attached"
 * and then holds the program (its fds) until it is killed. Static. */
#include <linux/bpf.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define RK_MARKER 31337
#define PT_REGS_DI 112 /* offsetof(struct pt_regs, di) on x86-64 */

#define INSN(c, d, s, o, i) ((struct bpf_insn){ .code = (c), .dst_reg = (d), .src_reg = (s), .off = (o), .imm = (i) })
#define MOV64_REG(d, s) INSN(BPF_ALU64 | BPF_MOV | BPF_X, d, s, 0, 0)
#define MOV64_IMM(d, i) INSN(BPF_ALU64 | BPF_MOV | BPF_K, d, 0, 0, i)
#define ADD64_IMM(d, i) INSN(BPF_ALU64 | BPF_ADD | BPF_K, d, 0, 0, i)
#define LDX(sz, d, s, o) INSN(BPF_LDX | BPF_MEM | (sz), d, s, o, 0)
#define ST_W(d, o, i) INSN(BPF_ST | BPF_MEM | BPF_W, d, 0, o, i)
#define JNE_IMM(d, i, o) INSN(BPF_JMP | BPF_JNE | BPF_K, d, 0, o, i)
#define JEQ_IMM(d, i, o) INSN(BPF_JMP | BPF_JEQ | BPF_K, d, 0, o, i)
#define CALL(f) INSN(BPF_JMP | BPF_CALL, 0, 0, 0, f)
#define EXIT() INSN(BPF_JMP | BPF_EXIT, 0, 0, 0, 0)

static const struct bpf_insn prog[] = {
	MOV64_REG(6, 1),			/* r6 = ctx (u64 args[]: regs, id) */
	LDX(BPF_DW, 7, 6, 8),			/* r7 = id */
	JNE_IMM(7, SYS_getppid, 21),		/* -> out */
	MOV64_REG(1, 10), ADD64_IMM(1, -16), MOV64_IMM(2, 16),
	CALL(BPF_FUNC_get_current_comm),
	LDX(BPF_W, 1, 10, -16),
	JNE_IMM(1, 0x616d6b72, 15),		/* "rkma" */
	LDX(BPF_H, 1, 10, -12),
	JNE_IMM(1, 0x6b72, 13),			/* "rk" */
	LDX(BPF_DW, 3, 6, 0),			/* r3 = regs */
	ADD64_IMM(3, PT_REGS_DI),
	MOV64_REG(1, 10), ADD64_IMM(1, -24), MOV64_IMM(2, 8),
	CALL(BPF_FUNC_probe_read_kernel),	/* *(fp-24) = regs->di */
	LDX(BPF_DW, 1, 10, -24),
	JEQ_IMM(1, 0, 5),			/* -> out */
	ST_W(10, -32, RK_MARKER),
	MOV64_REG(2, 10), ADD64_IMM(2, -32), MOV64_IMM(3, 4),
	CALL(BPF_FUNC_probe_write_user),
	MOV64_IMM(0, 0),			/* out: */
	EXIT(),
};

static long bpf(int cmd, union bpf_attr *attr)
{
	return syscall(SYS_bpf, cmd, attr, sizeof(*attr));
}

int main(void)
{
	static char log[65536];
	union bpf_attr attr;
	int prog_fd, tp_fd;

	memset(&attr, 0, sizeof(attr));
	attr.prog_type = BPF_PROG_TYPE_RAW_TRACEPOINT;
	attr.insns = (unsigned long)prog;
	attr.insn_cnt = sizeof(prog) / sizeof(prog[0]);
	attr.license = (unsigned long)"GPL";
	attr.log_buf = (unsigned long)log;
	attr.log_size = sizeof(log);
	attr.log_level = 1;
	memcpy(attr.prog_name, "rk_ebpf", 8);
	prog_fd = bpf(BPF_PROG_LOAD, &attr);
	if (prog_fd < 0) {
		perror("BPF_PROG_LOAD");
		fputs(log, stderr);
		return 1;
	}
	memset(&attr, 0, sizeof(attr));
	attr.raw_tracepoint.name = (unsigned long)"sys_enter";
	attr.raw_tracepoint.prog_fd = prog_fd;
	tp_fd = bpf(BPF_RAW_TRACEPOINT_OPEN, &attr);
	if (tp_fd < 0) {
		perror("BPF_RAW_TRACEPOINT_OPEN");
		return 1;
	}
	printf("attached\n");
	fflush(stdout);
	for (;;)
		pause();
}
