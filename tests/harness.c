/* harness.c: the test harness's runner and helpers; see harness.h. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <stdarg.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"

#define MAX_TESTS 256

static struct {
	const char *name;
	harness_fn fn;
} tests[MAX_TESTS];
static int ntests;

void harness_register(const char *name, harness_fn fn)
{
	if (ntests == MAX_TESTS) {
		fprintf(stderr, "too many tests\n");
		abort();
	}
	tests[ntests].name = name;
	tests[ntests].fn = fn;
	ntests++;
}

void harness_fail(const char *file, int line, const char *fmt, ...)
{
	va_list ap;

	fprintf(stderr, "FAIL %s:%d: ", file, line);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fprintf(stderr, "\n");
	fflush(stderr);
	abort();
}

void harness_skip(const char *why)
{
	printf("SKIP: %s\n", why);
	fflush(stdout);
	exit(77);
}

long harness_param(const char *env, long dflt, long long_run)
{
	const char *v = getenv(env), *mode = getenv("KEEL_STRESS");

	if (v && *v)
		return strtol(v, NULL, 0);
	if (mode && strcmp(mode, "long") == 0)
		return long_run;
	return dflt;
}

uint64_t harness_seed(void)
{
	static uint64_t seed;
	static int done;
	const char *v;

	if (done)
		return seed;
	v = getenv("KEEL_SEED");
	if (v && *v) {
		seed = strtoull(v, NULL, 0);
	} else {
		struct timespec ts;

		clock_gettime(CLOCK_REALTIME, &ts);
		seed = (uint64_t)ts.tv_nsec ^ ((uint64_t)ts.tv_sec << 20) ^
		       (uint64_t)getpid();
	}
	done = 1;
	printf("seed: KEEL_SEED=%" PRIu64 "\n", seed);
	fflush(stdout);
	return seed;
}

pthread_t harness_thread(void *(*fn)(void *), void *arg)
{
	pthread_t th;

	CHECK_EQ(pthread_create(&th, NULL, fn, arg), 0);
	return th;
}

void harness_join(pthread_t th)
{
	CHECK_EQ(pthread_join(th, NULL), 0);
}

void event_init(harness_event *e)
{
	pthread_mutex_init(&e->mu, NULL);
	pthread_cond_init(&e->cv, NULL);
	e->set = 0;
}

void event_set(harness_event *e)
{
	pthread_mutex_lock(&e->mu);
	e->set = 1;
	pthread_cond_broadcast(&e->cv);
	pthread_mutex_unlock(&e->mu);
}

void event_wait(harness_event *e)
{
	pthread_mutex_lock(&e->mu);
	while (!e->set)
		pthread_cond_wait(&e->cv, &e->mu);
	pthread_mutex_unlock(&e->mu);
}

int event_is_set(harness_event *e)
{
	int s;

	pthread_mutex_lock(&e->mu);
	s = e->set;
	pthread_mutex_unlock(&e->mu);
	return s;
}

/* Into a temporary file, not a pipe: a pipe would block the writers once
 * full, before capture_end() reads it. The file is unlinked only at the
 * end: Emscripten's dup2() reopens a file by its path. */
void capture_begin(harness_capture *c)
{
	strcpy(c->path, "/tmp/keel-capture-XXXXXX");
	c->fds[0] = mkstemp(c->path);
	CHECK(c->fds[0] >= 0);
	c->fds[1] = -1;
	fflush(stderr);
	c->saved = dup(2);
	CHECK_EQ(dup2(c->fds[0], 2), 2);
}

int capture_contains(harness_capture *c, const char *text)
{
	char buf[sizeof c->text];
	ssize_t n = pread(c->fds[0], buf, sizeof buf - 1, 0);

	if (n <= 0)
		return 0;
	buf[n] = '\0';
	return strstr(buf, text) != NULL;
}

void capture_end(harness_capture *c)
{
	size_t n = 0;
	ssize_t r;

	fflush(stderr);
	dup2(c->saved, 2);
	close(c->saved);
	lseek(c->fds[0], 0, SEEK_SET);
	while ((r = read(c->fds[0], c->text + n, sizeof c->text - 1 - n)) > 0)
		n += (size_t)r;
	c->text[n] = '\0';
	close(c->fds[0]);
	unlink(c->path);
	fputs(c->text, stderr);
}

void log_init(harness_log *l)
{
	pthread_mutex_init(&l->mu, NULL);
	l->buf[0] = '\0';
	l->len = 0;
}

void log_add(harness_log *l, const char *token)
{
	size_t n = strlen(token);

	pthread_mutex_lock(&l->mu);
	if (l->len + n + 2 < sizeof l->buf) {
		if (l->len)
			l->buf[l->len++] = ' ';
		memcpy(l->buf + l->len, token, n + 1);
		l->len += n;
	}
	pthread_mutex_unlock(&l->mu);
}

int main(int argc, char **argv)
{
	if (argc == 2 && strcmp(argv[1], "--list") == 0) {
		for (int i = 0; i < ntests; i++)
			printf("%s\n", tests[i].name);
		return 0;
	}
	if (argc != 2) {
		fprintf(stderr, "usage: %s <test> | --list\n", argv[0]);
		return 2;
	}
	for (int i = 0; i < ntests; i++) {
		if (strcmp(tests[i].name, argv[1]) == 0) {
			tests[i].fn();
			printf("ok %s\n", argv[1]);
			return 0;
		}
	}
	fprintf(stderr, "no test named %s\n", argv[1]);
	return 2;
}
