/* Copy SRC to DST with read/write in 4 KiB blocks, R rounds; print elapsed seconds.
 * With no SRC, a file of MB megabytes (default 16) is made in /tmp first. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static int copy(const char *src, const char *dst)
{
	char buf[4096];
	ssize_t n;
	int in = open(src, O_RDONLY), out = open(dst, O_WRONLY | O_CREAT | O_TRUNC, 0644);

	if (in < 0 || out < 0)
		return -1;
	while ((n = read(in, buf, sizeof(buf))) > 0)
		if (write(out, buf, n) != n)
			return -1;
	close(in);
	close(out);
	return 0;
}

int main(int argc, char **argv)
{
	long mb = argc > 1 ? atol(argv[1]) : 16, rounds = argc > 2 ? atol(argv[2]) : 1;
	const char *src = "/tmp/sv-copy-src", *dst = "/tmp/sv-copy-dst";
	char block[65536];
	struct timespec a, b;
	int fd = open(src, O_WRONLY | O_CREAT | O_TRUNC, 0644);

	memset(block, 0x5a, sizeof(block));
	for (long i = 0; i < mb * 16; i++)
		if (write(fd, block, sizeof(block)) != sizeof(block))
			return 1;
	close(fd);
	clock_gettime(CLOCK_MONOTONIC, &a);
	for (long r = 0; r < rounds; r++)
		if (copy(src, dst)) {
			perror("copy");
			return 1;
		}
	clock_gettime(CLOCK_MONOTONIC, &b);
	unlink(dst);
	unlink(src);
	printf("%.6f\n", (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9);
	return 0;
}
