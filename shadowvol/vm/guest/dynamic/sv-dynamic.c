/* A long-lived idle process linked against shared libraries (libm, libc and
 * the dynamic loader), so the guest has link maps for linux.library_list and
 * file-backed library mappings for linux.elfs and linux.proc.Maps. */
#include <math.h>
#include <stdio.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	volatile double x = argc;

	if (argc > 1)
		printf("%f\n", sqrt(x) + cbrt(x));  /* a libm call: the library stays needed */
	for (;;)
		pause();
	return 0;
}
