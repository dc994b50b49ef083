/*
 * test_lock_nomalloc.c: a lock report still prints when malloc fails.
 *
 * This program replaces malloc and friends with versions that abort while
 * `armed` is set, and otherwise pass through to glibc's own. With them
 * armed, it makes keel report a lock-order violation: the report must come
 * out, which proves the report path allocates nothing.
 */
#include <signal.h>
#include <fcntl.h>
#include <sys/wait.h>
#include <stdatomic.h>
#include <string.h>
#include <unistd.h>

#include "harness.h"

static atomic_int armed;

#if defined(__GLIBC__) && !defined(__SANITIZE_ADDRESS__) &&                \
	!defined(__SANITIZE_THREAD__) && !defined(KEEL_UNDER_SANITIZER)
#define INTERPOSE 1
void *__libc_malloc(size_t);
void *__libc_calloc(size_t, size_t);
void *__libc_realloc(void *, size_t);
void *__libc_memalign(size_t, size_t);

static void refuse(const char *what)
{
	static const char msg[] = "test: malloc called while armed: ";

	if (write(2, msg, sizeof msg - 1) < 0 ||
	    write(2, what, strlen(what)) < 0 || write(2, "\n", 1) < 0)
		_exit(3);
	abort();
}

void *malloc(size_t n)
{
	if (atomic_load(&armed))
		refuse("malloc");
	return __libc_malloc(n);
}

void *calloc(size_t a, size_t b)
{
	if (atomic_load(&armed))
		refuse("calloc");
	return __libc_calloc(a, b);
}

void *realloc(void *p, size_t n)
{
	if (atomic_load(&armed))
		refuse("realloc");
	return __libc_realloc(p, n);
}

void *aligned_alloc(size_t a, size_t n)
{
	if (atomic_load(&armed))
		refuse("aligned_alloc");
	return __libc_memalign(a, n);
}
#endif

static keel_mutex_t low = KEEL_MUTEX_INIT(2, "low");
static keel_mutex_t high = KEEL_MUTEX_INIT(8, "high");

TEST(report_prints_without_malloc)
{
	HARNESS_NEED(FORK);
	harness_capture cap;

#ifndef INTERPOSE
	harness_skip("malloc cannot be interposed here (sanitizer or libc)");
#endif
	keel_lockcheck_set(KEEL_LOCKCHECK_REPORT);
	keel_self(); /* adoption allocates: do it before arming */
	keel_mutex_lock(&low);
	capture_begin(&cap);
	atomic_store(&armed, 1);
	keel_mutex_lock(&high); /* out of order: reported */
	atomic_store(&armed, 0);
	capture_end(&cap);
	CHECK(strstr(cap.text, "taking 'high' (level 8)") != NULL);
	CHECK(strstr(cap.text, "while holding 'low' (level 2)") != NULL);
	keel_mutex_unlock(&high);
	keel_mutex_unlock(&low);

	/* The control: with the trap armed, an allocation does abort. */
	{
		pid_t pid = fork();
		int status;

		CHECK(pid >= 0);
		if (pid == 0) {
			char *volatile p;
			int devnull = open("/dev/null", O_WRONLY);

			dup2(devnull, 2);
			atomic_store(&armed, 1);
			p = strdup("allocates");
			_exit(p ? 0 : 1);
		}
		CHECK_EQ(waitpid(pid, &status, 0), pid);
		CHECK(WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT);
	}
}
