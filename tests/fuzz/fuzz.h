/*
 * fuzz.h: the shared driver of keel's randomised, model-checked testers.
 *
 * Each harness (fuzz_mailbox.c, fuzz_scope.c, fuzz_lock.c, fuzz_once.c)
 * turns a string of bytes into a schedule of keel operations on several
 * threads, runs it, and checks every outcome against a small model of the
 * contract written at the top of the harness. The bytes come from one of
 * two places, and the harness cannot tell which:
 *
 *   libFuzzer   built with -fsanitize=fuzzer (CMake: KEEL_BUILD_FUZZ), the
 *               harness's FUZZ_HARNESS() becomes LLVMFuzzerTestOneInput;
 *   a seed      the standalone binary (built with the normal tests) makes
 *               inputs from --seed, one per iteration, for --iters inputs
 *               or --time seconds, and replays files given as arguments.
 *
 * A broken invariant is a finding: FZ_CHECK() prints which check fired (a
 * distinct name such as "lock.missed-report"), the harness's recent
 * operations, the live keel tree, then aborts, so libFuzzer saves the
 * input and a standalone run saves it too (fuzz-<name>-seed<S>-input<I>.bin,
 * in $FUZZ_ARTIFACTS or the current directory) and prints how to replay
 * it. FUZZ_IGNORE=check1,check2 makes the named checks report once and go
 * on, so one known break does not hide the others while fuzzing, and
 * FUZZ_NO=family1,family2 switches operation families off (each harness
 * names its families at the top).
 *
 * A hang is a finding too: fz_watch_arm() starts a deadline that a
 * watchdog thread (one per process, made on first use) enforces by
 * aborting with the same diagnostics. Work in a fork()ed child runs under
 * fz_fork(), which gives the child an alarm of its own and has the parent
 * kill it and report if it is still there after its time.
 */
#ifndef KEEL_FUZZ_H
#define KEEL_FUZZ_H

#include <stddef.h>
#include <stdint.h>

#include "keel.h"

/* ---- The input --------------------------------------------------------- */

struct fz {
	const uint8_t *p;
	size_t n, i;
};

/* A byte of the input; 0 once it is used up. */
static inline unsigned fz_byte(struct fz *f)
{
	return f->i < f->n ? f->p[f->i++] : 0;
}

/* A choice among n (1..256) options. */
static inline unsigned fz_pick(struct fz *f, unsigned n)
{
	return n <= 1 ? 0 : fz_byte(f) % n;
}

/* Whether any input is left. */
static inline int fz_more(const struct fz *f)
{
	return f->i < f->n;
}

/* ---- Checks and diagnostics -------------------------------------------- */

/* Record one line of what the harness did, for the diagnostics of a
 * finding (the last 64 are kept); printed as it happens with --verbose. */
void fz_note(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* A finding: print it with the recent notes and keel's tree, then abort;
 * returns only if `check` is listed in FUZZ_IGNORE. */
void fz_fail(const char *check, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

#define FZ_CHECK(cond, check, ...)                                         \
	do {                                                               \
		if (!(cond))                                               \
			fz_fail((check), __VA_ARGS__);                     \
	} while (0)

/* A harness bug or a setup failure (not a finding about keel): abort. */
#define FZ_ASSERT(cond)                                                    \
	do {                                                               \
		if (!(cond))                                               \
			fz_fail("harness", "%s:%d: %s", __FILE__, __LINE__, \
				#cond);                                    \
	} while (0)

/* Whether an operation family is switched off with FUZZ_NO=name1,name2
 * (to look for one break while another is known), or because the
 * platform lacks what it needs (fork on Emscripten). */
int fz_off(const char *family);

/* Whether the standalone run was asked for --verbose. */
extern int fz_verbose;

/* ---- Watchdog ---------------------------------------------------------- */

/* Abort with a finding ("watchdog.hang") unless fz_watch_disarm() comes
 * within `seconds`; `what` names the stage. Arming again moves the
 * deadline. */
void fz_watch_arm(int seconds, const char *what);
void fz_watch_disarm(void);

/* Run child(arg) in a fork()ed child that must _exit(0) within `seconds`
 * (an alarm in the child turns a hang into exit status 86, which names
 * the stage the child was in, set with fz_child_stage()). Returns the
 * child's exit status, or -1 if it died of a signal (both are reported
 * by the caller); a child still there at the parent's deadline is killed
 * and reported as "fork.child-hang". */
int fz_fork(void (*child)(void *), void *arg, int seconds);
void fz_child_stage(const char *stage);

/* ---- Sanitizers ------------------------------------------------------------
 * FZ_SANITIZED: built with ASan or TSan. Their runtimes of GCC 12 and LLVM
 * 14 take no lock of their own allocator around fork(), so the child of a
 * process whose other threads allocate can hang in the sanitizer's malloc
 * or free (seen: a new thread's start in ASan's allocator); LLVM 18 added
 * the fork handlers. Fork children of sanitized builds therefore skip what
 * allocates (spawning tasks); the unsanitized builds run them whole. */
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define FZ_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define FZ_SANITIZED 1
#endif
#endif
#ifndef FZ_SANITIZED
#define FZ_SANITIZED 0
#endif

/* ---- One-time and per-input set-up ------------------------------------- */

/* Sizes of the standalone run's inputs. */
#define FZ_INPUT_MIN 8
#define FZ_INPUT_MAX 384

int fz_main(int argc, char **argv, const char *name,
	    int (*one)(const uint8_t *data, size_t size));
void fz_init(const char *name);

#ifdef KEEL_FUZZ_LIBFUZZER
#define FUZZ_HARNESS(name, fn)                                             \
	int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);      \
	int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)       \
	{                                                                  \
		fz_init(#name);                                            \
		return (fn)(data, size);                                   \
	}
#else
#define FUZZ_HARNESS(name, fn)                                             \
	int main(int argc, char **argv)                                    \
	{                                                                  \
		return fz_main(argc, argv, #name, (fn));                   \
	}
#endif

#endif /* KEEL_FUZZ_H */
