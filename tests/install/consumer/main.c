/* A program built outside keel's tree against an installed keel. */
#include <keel.h>
#include <stdio.h>

static void set(void *arg)
{
	*(int *)arg = 1;
}

int main(void)
{
	int done = 0;

	if (keel_post(keel_self(), set, NULL, &done) != 0 ||
	    keel_serve(0) != 1 || !done) {
		fprintf(stderr, "consumer: keel did not run the message\n");
		return 1;
	}
	printf("consumer ok: keel %d.%d.%d\n", KEEL_VERSION_MAJOR,
	       KEEL_VERSION_MINOR, KEEL_VERSION_PATCH);
	return 0;
}
