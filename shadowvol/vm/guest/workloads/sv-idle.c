/* A long-lived idle process. Its comm is the name it was executed by, so
 * symlinks to it (sv-worker, sv-cache, ...) give recognisable processes. */
#include <unistd.h>

int main(void)
{
	for (;;)
		pause();
	return 0;
}
