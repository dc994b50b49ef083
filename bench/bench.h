/*
 * bench.h: the benchmark harness, as seen by the files that hold
 * benchmarks.
 *
 * A benchmark is one implementation ("impl") of one operation ("bench id"),
 * written as
 *
 *     BENCH(mailbox_1p1c, keel) { ...; return elapsed_ns / ops; }
 *
 * The function runs one repetition and returns the nanoseconds per
 * operation it measured, or BENCH_DNF if the repetition did not finish
 * within bench_rep_limit(). The harness (main.c) calls it once untimed to
 * warm up and then KEEL_BENCH_REPS times, and reports the median, minimum
 * and maximum. Every impl of one bench id is measured in the same run,
 * repetitions interleaved, and compared with the impl named "keel".
 *
 * An impl whose peer library was not found at build time registers with
 * BENCH_SKIP instead, so that the run says what it left out. A bench id may
 * carry targets (BENCH_TARGET): ratios keel should reach against a peer,
 * printed after the table and never enforced.
 *
 * The rest of this header is shared machinery for benchmarks that run
 * threads: the clock, a spin hint, futex calls, a start gate, and the
 * watchdog that lets a repetition that hangs or livelocks be abandoned.
 */
#ifndef KEEL_BENCH_H
#define KEEL_BENCH_H

#include <linux/futex.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* What a benchmark returns for a repetition that did not finish. */
#define BENCH_DNF (-1.0)

typedef double (*bench_fn)(void);

void bench_register(const char *id, const char *impl, bench_fn fn);
void bench_register_skip(const char *id, const char *impl, const char *why);
/* @impl is the keel variant the target is for ("keel" for keel itself);
 * @peer NULL names the fastest peer measured for @id in the same run, and
 * BENCH_FASTEST_PREALLOC the fastest of the peers' "_prealloc" variants
 * (the queue alone, see bench_mailbox.c). Neither ever picks a reference
 * row (an impl named <peer>_line, main.c). */
#define BENCH_FASTEST_PREALLOC "_prealloc"
void bench_register_target(const char *id, const char *impl, const char *peer,
			   double max_ratio);

#define BENCH_CAT_(a, b) a##b
#define BENCH_CAT(a, b) BENCH_CAT_(a, b)

#define BENCH(id, impl)                                                    \
	static double bench_##id##__##impl(void);                          \
	__attribute__((constructor)) static void                          \
	bench_reg_##id##__##impl(void)                                     \
	{                                                                  \
		bench_register(#id, #impl, bench_##id##__##impl);          \
	}                                                                  \
	static double bench_##id##__##impl(void)

#define BENCH_SKIP(id, impl, why)                                          \
	__attribute__((constructor)) static void                          \
	bench_skip_##id##__##impl(void)                                    \
	{                                                                  \
		bench_register_skip(#id, #impl, (why));                    \
	}

/* Target: keel's median <= max_ratio * peer's median, in the same run. */
#define BENCH_TARGET(id, peer, max_ratio)                                  \
	BENCH_TARGET_FOR(id, keel, peer, max_ratio)

/* The same for another of keel's impls of @id (a mode of keel's). */
#define BENCH_TARGET_FOR(id, impl, peer, max_ratio)                        \
	__attribute__((constructor)) static void                          \
	BENCH_CAT(bench_target_##id##_, __LINE__)(void)                    \
	{                                                                  \
		bench_register_target(#id, #impl, (peer), (max_ratio));    \
	}

/* The reason given by a BENCH_SKIP for a peer library that is absent. */
#define BENCH_PEER_MISSING(lib) lib " not installed (make bench-deps)"

/* ---- Run parameters ---------------------------------------------------- */

/* KEEL_BENCH_SCALE, a multiplier of operation counts (default 1). */
double bench_scale(void);
/* @base operations scaled by bench_scale(), at least @min. */
long bench_count(long base, long min);
/* The wall-clock limit of one repetition, ns (KEEL_BENCH_TIMEOUT s, 10). */
int64_t bench_rep_limit(void);

/* Record a line printed after the tables: for what a benchmark measures
 * beside its time (memory per task, say). A later note with the same key
 * (the text before the first ':') replaces an earlier one. */
__attribute__((format(printf, 1, 2))) void bench_note(const char *fmt, ...);

/* Record a figure a repetition measured beside its time (consumer sleeps
 * per message, say), under a short name. The harness keeps one sample per
 * timed repetition and prints each name's median, minimum and maximum under
 * the group's table (and in the JSON file). At most BENCH_MAX_EXTRAS names
 * per impl; the warm-up's figures are dropped. */
#define BENCH_MAX_EXTRAS 6
void bench_extra(const char *name, double value);

/* Print a message and abort: a benchmark that computed a wrong result. */
__attribute__((noreturn, format(printf, 1, 2))) void
bench_fail(const char *fmt, ...);

/* ---- Threads ------------------------------------------------------------- */

/*
 * Set by the watchdog when a repetition runs past its limit, cleared by
 * the harness before each repetition. Every loop in a benchmark that waits
 * for another thread checks it, so that the repetition can be abandoned
 * and its threads joined.
 */
extern atomic_int bench_abort;

static inline int bench_aborted(void)
{
	return atomic_load_explicit(&bench_abort, memory_order_relaxed);
}

static inline int64_t bench_now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static inline void bench_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
	__builtin_ia32_pause();
#elif defined(__aarch64__)
	__asm__ __volatile__("yield" ::: "memory");
#else
	atomic_signal_fence(memory_order_seq_cst);
#endif
}

/* Sleep while *w == val (or until woken, or spuriously). */
static inline void bench_futex_wait(_Atomic uint32_t *w, uint32_t val)
{
	syscall(SYS_futex, (void *)(uintptr_t)w, FUTEX_WAIT_PRIVATE, val,
		NULL, NULL, 0);
}

static inline void bench_futex_wake(_Atomic uint32_t *w, int n)
{
	syscall(SYS_futex, (void *)(uintptr_t)w, FUTEX_WAKE_PRIVATE, n,
		NULL, NULL, 0);
}

/* Start a thread, or fail the run. */
pthread_t bench_thread(void *(*fn)(void *), void *arg);
void bench_join(pthread_t th);

/*
 * The watchdog: the measured threads set the event when the repetition's
 * work is done; the main thread waits for it with bench_event_wait(), which
 * sets bench_abort and returns -1 if bench_rep_limit() passes first. The
 * caller then wakes whoever may be asleep and joins its threads.
 */
struct bench_event {
	pthread_mutex_t mu;
	pthread_cond_t cv;
	int set;
};

void bench_event_init(struct bench_event *e);
void bench_event_destroy(struct bench_event *e);
void bench_event_set(struct bench_event *e);
int bench_event_wait(struct bench_event *e);

#endif /* KEEL_BENCH_H */
