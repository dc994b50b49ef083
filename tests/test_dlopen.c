/*
 * test_dlopen.c: the shared library loads with dlopen() and its locks work
 * there.
 *
 * keel's per-thread lock record is initial-exec TLS (so the lock fast path
 * reaches it with one thread-pointer-relative access). A library loaded by
 * dlopen() gets such TLS only from the C library's small reserve, so the
 * record must stay small enough to fit: a language runtime loading an
 * extension module that links keel depends on it. This program does not
 * link keel; it loads it, takes nested locks in two threads, and checks
 * that an out-of-order acquisition is still reported.
 *
 *     test_dlopen path/to/libkeel.so
 */
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

#include <keel.h>

static int (*mutex_init)(keel_mutex_t *, unsigned, const char *, unsigned);
static void (*mutex_lock)(keel_mutex_t *, const char *);
static void (*mutex_unlock)(keel_mutex_t *, const char *);
static int (*lockcheck_set)(int);
static unsigned long (*lockcheck_reports)(void);

static keel_mutex_t outer, inner;

static _Noreturn void fail(const char *what)
{
	fprintf(stderr, "test_dlopen: %s\n", what);
	exit(1);
}

static void *nest(void *arg)
{
	for (int i = 0; i < 1000; i++) {
		mutex_lock(&outer, "test_dlopen.c:outer");
		mutex_lock(&inner, "test_dlopen.c:inner");
		mutex_unlock(&inner, "test_dlopen.c:inner");
		mutex_unlock(&outer, "test_dlopen.c:outer");
	}
	return arg;
}

#define RESOLVE(var, name)                                                 \
	do {                                                               \
		*(void **)&(var) = dlsym(lib, name);                       \
		if (!(var))                                                \
			fail("missing symbol " name);                      \
	} while (0)

int main(int argc, char **argv)
{
	pthread_t a, b;
	void *lib;

	if (argc != 2)
		fail("usage: test_dlopen path/to/libkeel.so");
	lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
	if (!lib) {
		fprintf(stderr, "test_dlopen: dlopen: %s\n", dlerror());
		return 1;
	}
	RESOLVE(mutex_init, "keel_mutex_init");
	RESOLVE(mutex_lock, "keel_mutex_lock_at");
	RESOLVE(mutex_unlock, "keel_mutex_unlock_at");
	RESOLVE(lockcheck_set, "keel_lockcheck_set");
	RESOLVE(lockcheck_reports, "keel_lockcheck_reports");
	lockcheck_set(KEEL_LOCKCHECK_REPORT);
	if (mutex_init(&outer, 5, "outer", 0) || mutex_init(&inner, 3, "inner", 0))
		fail("keel_mutex_init failed");
	if (pthread_create(&a, NULL, nest, NULL) ||
	    pthread_create(&b, NULL, nest, NULL))
		fail("pthread_create failed");
	pthread_join(a, NULL);
	pthread_join(b, NULL);
	if (lockcheck_reports() != 0)
		fail("in-order nesting was reported");
	/* Reversed: reported (to stderr), not hung. */
	mutex_lock(&inner, "test_dlopen.c:reversed-inner");
	mutex_lock(&outer, "test_dlopen.c:reversed-outer");
	mutex_unlock(&outer, "test_dlopen.c:reversed-outer");
	mutex_unlock(&inner, "test_dlopen.c:reversed-inner");
	if (lockcheck_reports() != 1)
		fail("the reversed pair was not reported once");
	printf("test_dlopen: ok\n");
	return 0;
}
