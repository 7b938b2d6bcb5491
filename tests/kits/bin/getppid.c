/* Print getppid() (the raw syscall). Copied into a guest as /tmp/rkmark to be a
 * process the syscall-hooking kits mark (its comm starts with "rkmark").
 * With "-u": pass the address of a zeroed int as the (ignored) first argument
 * and print that int after the call instead (the eBPF kit writes there). */
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	volatile int value = 0;
	long ppid = syscall(SYS_getppid, &value);

	if (argc > 1 && !strcmp(argv[1], "-u"))
		printf("%d\n", value);
	else
		printf("%ld\n", ppid);
	return 0;
}
