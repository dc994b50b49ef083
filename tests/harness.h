/*
 * harness.h: the test harness.
 *
 * A test program holds many cases, each written as TEST(name) { ... }.
 * CMake reads the TEST(...) lines and registers every case as its own CTest
 * entry, run in its own process with a timeout, so a deadlock fails one
 * case instead of hanging the suite. Run a case by hand with
 *     ./test_mailbox <name>        or list them with  ./test_mailbox --list
 *
 * CHECK* macros print the expression, what was expected and what was seen,
 * then abort. Error codes print with their names.
 *
 * Stress cases read their size from the environment and print the seed:
 *   KEEL_STRESS=long   the long run (CI under sanitizers uses the default)
 *   KEEL_THREADS, KEEL_ITERS, KEEL_SEED   override one value
 */
#ifndef KEEL_TEST_HARNESS_H
#define KEEL_TEST_HARNESS_H

#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "keel.h"

typedef void (*harness_fn)(void);
void harness_register(const char *name, harness_fn fn);

#define TEST(name)                                                         \
	static void test_##name(void);                                     \
	__attribute__((constructor)) static void register_##name(void)     \
	{                                                                  \
		harness_register(#name, test_##name);                      \
	}                                                                  \
	static void test_##name(void)

__attribute__((noreturn, format(printf, 3, 4))) void
harness_fail(const char *file, int line, const char *fmt, ...);

/* The case cannot run here (a missing platform feature): exit 77, which
 * CTest reports as skipped, never as passed. */
__attribute__((noreturn)) void harness_skip(const char *why);

/*
 * What the platform offers the tests. A case that needs something the
 * platform lacks says so with HARNESS_NEED(WHAT) before it starts, and is
 * skipped there (exit 77): cases are skipped by what they need, never by
 * name, and code that would not compile without it sits under
 * #if HARNESS_HAVE_WHAT. Linux has all of these. Emscripten (WebAssembly
 * threads, docs/webassembly.md) has none of them: one process (no fork()),
 * no epoll, no raw syscall() (SYS_exit, SYS_gettid), no prctl(), no
 * sockets of the system's (its own are WebSockets), no poll() that waits
 * for a pipe (FD_WAIT: so keel_read() and the like cannot wait), no
 * /proc, no dlopen() of keel's library. (Where /proc is missing, the
 * cases that read it skip themselves when they find it so.) Emscripten
 * alone has JS_LOOP: threads that return to a JavaScript event loop.
 * HOST_FILES: a file the program writes is one the commands that system()
 * runs can read (under Node, Emscripten's files are in the program's
 * memory).
 */
#if defined(__EMSCRIPTEN__)
#define HARNESS_HAVE_FORK 0
#define HARNESS_HAVE_SOCKETS 0
#define HARNESS_HAVE_FD_WAIT 0
#define HARNESS_HAVE_JS_LOOP 1
#define HARNESS_HAVE_HOST_FILES 0
#else
#define HARNESS_HAVE_FORK 1
#define HARNESS_HAVE_SOCKETS 1
#define HARNESS_HAVE_FD_WAIT 1
#define HARNESS_HAVE_JS_LOOP 0
#define HARNESS_HAVE_HOST_FILES 1
#endif
#if defined(__linux__)
#define HARNESS_HAVE_EPOLL 1
#define HARNESS_HAVE_SYSCALL 1
#define HARNESS_HAVE_PRCTL 1
#else
#define HARNESS_HAVE_EPOLL 0
#define HARNESS_HAVE_SYSCALL 0
#define HARNESS_HAVE_PRCTL 0
#endif
#define HARNESS_NEED(what)                                                 \
	do {                                                               \
		if (!HARNESS_HAVE_##what)                                  \
			harness_skip("the platform lacks " #what);         \
	} while (0)

#define CHECK(c)                                                           \
	do {                                                               \
		if (!(c))                                                  \
			harness_fail(__FILE__, __LINE__, "CHECK(%s)", #c); \
	} while (0)

#define CHECK_INT(a, op, b)                                                \
	do {                                                               \
		long long a_ = (long long)(a), b_ = (long long)(b);        \
		if (!(a_ op b_))                                           \
			harness_fail(__FILE__, __LINE__,                   \
				     "expected %s %s %s: saw %lld vs %lld", \
				     #a, #op, #b, a_, b_);                 \
	} while (0)

#define CHECK_EQ(a, b) CHECK_INT(a, ==, b)

/* An error code: prints both sides by name. */
#define CHECK_RC(expr, want)                                               \
	do {                                                               \
		int got_ = (int)(expr), want_ = (int)(want);               \
		if (got_ != want_)                                         \
			harness_fail(__FILE__, __LINE__,                   \
				     "%s: expected %d (%s), saw %d (%s)",  \
				     #expr, want_, keel_strerror(want_),   \
				     got_, keel_strerror(got_));           \
	} while (0)

#define CHECK_OK(expr) CHECK_RC(expr, 0)

/* Stress parameters: default, or the long-run value, or the environment. */
long harness_param(const char *env, long dflt, long long_run);
/* The seed for this run, printed once. */
uint64_t harness_seed(void);

/* A string literal passed as a message's arg. */
#define TOKEN(s) ((void *)(uintptr_t)(s))

/* A small deterministic generator. */
static inline uint64_t rng_next(uint64_t *s)
{
	uint64_t x = *s += 0x9E3779B97F4A7C15ull;

	x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
	x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
	return x ^ (x >> 31);
}

/* A reusable barrier (pthread_barrier_t with a test-friendly wrapper). */
#include <pthread.h>
typedef pthread_barrier_t harness_barrier;
#define barrier_init(b, n) CHECK_EQ(pthread_barrier_init((b), NULL, (n)), 0)
#define barrier_wait(b) pthread_barrier_wait(b)

/* Start a plain pthread (an adopted task once it calls keel). */
pthread_t harness_thread(void *(*fn)(void *), void *arg);
void harness_join(pthread_t th);

/* A one-shot event: set once, waited on by anyone. */
typedef struct {
	pthread_mutex_t mu;
	pthread_cond_t cv;
	int set;
} harness_event;
void event_init(harness_event *e);
void event_set(harness_event *e);
void event_wait(harness_event *e);
int event_is_set(harness_event *e);

/* Capture what is written to stderr (keel's reports) between begin and
 * end; the text is also passed on to the real stderr at the end. */
typedef struct {
	int saved, fds[2];
	char path[32];
	char text[16384];
} harness_capture;
void capture_begin(harness_capture *c);
void capture_end(harness_capture *c);
/* While capturing: has `text` been written so far? */
int capture_contains(harness_capture *c, const char *text);

/* An order-of-events log: append tokens, compare with an expected string. */
typedef struct {
	pthread_mutex_t mu;
	char buf[4096];
	size_t len;
} harness_log;
void log_init(harness_log *l);
void log_add(harness_log *l, const char *token);
#define CHECK_LOG(l, want)                                                 \
	do {                                                               \
		pthread_mutex_lock(&(l)->mu);                              \
		if (strcmp((l)->buf, (want)) != 0)                         \
			harness_fail(__FILE__, __LINE__,                   \
				     "event log: expected \"%s\", saw \"%s\"", \
				     (want), (l)->buf);                    \
		pthread_mutex_unlock(&(l)->mu);                            \
	} while (0)

#endif /* KEEL_TEST_HARNESS_H */
