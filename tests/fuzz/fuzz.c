/*
 * fuzz.c: the shared driver of the fuzz harnesses; see fuzz.h.
 *
 * Findings print, in this order: which check fired and why, the last
 * notes the harness made (what it was doing, on which thread), and the
 * live tree of keel's scopes and tasks when keel's scope lock can be
 * taken at once (a hang may be inside it). The watchdog is one thread per
 * process, made on first use and kept: it sleeps on a condition variable
 * until the armed deadline, so it costs nothing while inputs finish in
 * time. In a standalone run a SIGABRT handler saves the input being run,
 * so every finding (a failed check, a keel panic, a sanitizer report with
 * abort_on_error) leaves a file that replays it.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <semaphore.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "fuzz.h"
#include "internal.h"

int fz_verbose;
static const char *fz_name = "fuzz";

/* ---- Notes --------------------------------------------------------------- */

#define NOTES 64
#define NOTE_LEN 160

static pthread_mutex_t notes_mu = PTHREAD_MUTEX_INITIALIZER;
static char notes[NOTES][NOTE_LEN];
static unsigned long nnotes;

void fz_note(const char *fmt, ...)
{
	char line[NOTE_LEN];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(line, sizeof line, fmt, ap);
	va_end(ap);
	pthread_mutex_lock(&notes_mu);
	memcpy(notes[nnotes++ % NOTES], line, sizeof line);
	pthread_mutex_unlock(&notes_mu);
	if (fz_verbose)
		fprintf(stderr, "%s: %s\n", fz_name, line);
}

/* Printed while dying: no lock, since the thread that fails may hold it. */
static void print_notes(void)
{
	unsigned long n = nnotes, first = n > NOTES ? n - NOTES : 0;

	fprintf(stderr, "%s: the last %lu operations, oldest first:\n", fz_name,
		n - first);
	for (unsigned long i = first; i < n; i++)
		fprintf(stderr, "  %s\n", notes[i % NOTES]);
}

static sem_t dump_done;

static void *dump_tree(void *arg)
{
	(void)arg;
	keel_dump(stderr);
	sem_post(&dump_done);
	return NULL;
}

static void print_tree(void)
{
	struct timespec until;
	pthread_t th;

	/* keel_dump() takes keel's scope locks, and a hang may be a thread
	 * stuck holding one: dump from another thread, and give up on it
	 * after a while. */
	fprintf(stderr, "%s: keel's tree of scopes and tasks:\n", fz_name);
	sem_init(&dump_done, 0, 0);
	if (pthread_create(&th, NULL, dump_tree, NULL) != 0)
		return;
	pthread_detach(th);
	clock_gettime(CLOCK_REALTIME, &until);
	until.tv_sec += 2;
	while (sem_timedwait(&dump_done, &until) != 0) {
		if (errno != EINTR) {
			fprintf(stderr, "%s: (no tree: keel_dump() waited 2 s "
				"for a lock a stuck thread holds)\n",
				fz_name);
			return;
		}
	}
}

/* ---- Findings ------------------------------------------------------------ */

/* Whether `word` is an item of the comma-separated list. */
static int listed(const char *list, const char *word)
{
	size_t len = strlen(word);

	for (const char *p = list; p && (p = strstr(p, word)) != NULL; p += len)
		if ((p == list || p[-1] == ',') && (p[len] == ',' || !p[len]))
			return 1;
	return 0;
}

int fz_off(const char *family)
{
#if defined(__EMSCRIPTEN__)
	/* The platform has no fork() (one process): that family is off. */
	if (strcmp(family, "fork") == 0)
		return 1;
#endif
	return listed(getenv("FUZZ_NO"), family);
}

static int ignored(const char *check)
{
	static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
	static char said[32][48];
	static int nsaid;
	int first = 1;

	if (strcmp(check, "harness") == 0 ||
	    !listed(getenv("FUZZ_IGNORE"), check))
		return 0;
	pthread_mutex_lock(&mu);
	for (int i = 0; i < nsaid; i++)
		if (strcmp(said[i], check) == 0)
			first = 0;
	if (first && nsaid < 32)
		snprintf(said[nsaid++], sizeof said[0], "%s", check);
	pthread_mutex_unlock(&mu);
	return first ? 1 : 2;
}

void fz_fail(const char *check, const char *fmt, ...)
{
	char msg[1024];
	va_list ap;
	int ig = ignored(check);

	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	if (ig) {
		if (ig == 1)
			fprintf(stderr,
				"%s: finding %s ignored (FUZZ_IGNORE): %s\n",
				fz_name, check, msg);
		return;
	}
	fprintf(stderr, "\n%s: FINDING %s: %s\n", fz_name, check, msg);
	print_notes();
	print_tree();
	fflush(stderr);
	abort();
}

/* ---- Watchdog ------------------------------------------------------------ */

static pthread_mutex_t wd_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wd_cv;
static pthread_once_t wd_once = PTHREAD_ONCE_INIT;
static struct timespec wd_deadline; /* tv_sec 0: disarmed */
static const char *wd_what;
static struct timespec child_deadline;
static pid_t child_pid;

static int ts_before(struct timespec a, struct timespec b)
{
	return a.tv_sec < b.tv_sec || (a.tv_sec == b.tv_sec && a.tv_nsec < b.tv_nsec);
}

static struct timespec ts_after(int seconds)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	t.tv_sec += seconds;
	return t;
}

static void *watchdog(void *p)
{
	(void)p;
	pthread_mutex_lock(&wd_mu);
	for (;;) {
		struct timespec now, next = {0, 0};

		clock_gettime(CLOCK_MONOTONIC, &now);
		if (child_pid && ts_before(child_deadline, now)) {
			fprintf(stderr, "%s: fork child %d still there after its "
				"time: killed\n", fz_name, (int)child_pid);
			kill(child_pid, SIGKILL);
			child_pid = 0;
		}
		if (wd_deadline.tv_sec && ts_before(wd_deadline, now)) {
			fprintf(stderr, "\n%s: FINDING watchdog.hang: %s did not "
				"finish in time\n", fz_name, wd_what);
			print_notes();
			print_tree();
			fflush(stderr);
			abort();
		}
		if (wd_deadline.tv_sec)
			next = wd_deadline;
		if (child_pid && (!next.tv_sec || ts_before(child_deadline, next)))
			next = child_deadline;
		if (next.tv_sec)
			pthread_cond_timedwait(&wd_cv, &wd_mu, &next);
		else
			pthread_cond_wait(&wd_cv, &wd_mu);
	}
	return NULL;
}

static void watchdog_start(void)
{
	pthread_condattr_t a;
	pthread_attr_t ta;
	pthread_t th;
	sigset_t all, old;

	pthread_condattr_init(&a);
	pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
	pthread_cond_init(&wd_cv, &a);
	pthread_condattr_destroy(&a);
	pthread_attr_init(&ta);
	pthread_attr_setdetachstate(&ta, PTHREAD_CREATE_DETACHED);
	/* Signals go to the harness's threads, not to the watchdog. */
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	if (pthread_create(&th, &ta, watchdog, NULL) != 0) {
		fprintf(stderr, "%s: cannot start the watchdog\n", fz_name);
		abort();
	}
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	pthread_attr_destroy(&ta);
}

void fz_watch_arm(int seconds, const char *what)
{
	pthread_once(&wd_once, watchdog_start);
	pthread_mutex_lock(&wd_mu);
	wd_deadline = ts_after(seconds);
	wd_what = what;
	pthread_cond_signal(&wd_cv);
	pthread_mutex_unlock(&wd_mu);
}

void fz_watch_disarm(void)
{
	pthread_mutex_lock(&wd_mu);
	wd_deadline.tv_sec = 0;
	pthread_mutex_unlock(&wd_mu);
}

/* ---- fork ---------------------------------------------------------------- */

#define CHILD_HUNG 86

static const char *volatile child_stage = "start";

void fz_child_stage(const char *stage)
{
	child_stage = stage;
}

static void child_alarm(int sig)
{
	const char *s = child_stage;
	char buf[256];
	int n;

	(void)sig;
	n = snprintf(buf, sizeof buf, "%s: fork child hung in stage '%s'\n",
		     fz_name, s);
	if (n > 0 && write(STDERR_FILENO, buf, (size_t)n) < 0) {
		/* Dying anyway. */
	}
	_exit(CHILD_HUNG);
}

int fz_fork(void (*child)(void *), void *arg, int seconds)
{
	int status = 0;
	pid_t pid, w;

	pthread_once(&wd_once, watchdog_start);
	fflush(NULL);
	pid = fork();
	FZ_ASSERT(pid >= 0);
	if (pid == 0) {
		struct sigaction sa;
		sigset_t s;

		memset(&sa, 0, sizeof sa);
		sa.sa_handler = child_alarm;
		sigaction(SIGALRM, &sa, NULL);
		/* Tasks keel starts run with signals blocked; the alarm must
		 * reach this thread whatever it is. */
		sigemptyset(&s);
		sigaddset(&s, SIGALRM);
		pthread_sigmask(SIG_UNBLOCK, &s, NULL);
		child_stage = "start";
		alarm((unsigned)seconds);
		child(arg);
		_exit(0);
	}
	pthread_mutex_lock(&wd_mu);
	child_pid = pid;
	child_deadline = ts_after(seconds + 5);
	pthread_cond_signal(&wd_cv);
	pthread_mutex_unlock(&wd_mu);
	while ((w = waitpid(pid, &status, 0)) < 0 && errno == EINTR)
		;
	pthread_mutex_lock(&wd_mu);
	child_pid = 0;
	pthread_mutex_unlock(&wd_mu);
	FZ_ASSERT(w == pid);
	if (WIFEXITED(status)) {
		FZ_CHECK(WEXITSTATUS(status) != CHILD_HUNG, "fork.child-hang",
			 "the fork child did not finish in %d s (its stage is "
			 "printed above)", seconds);
		return WEXITSTATUS(status);
	}
	return -1;
}

/* ---- Set-up ---------------------------------------------------------------- */

void fz_init(const char *name)
{
	static int done;

	if (done)
		return;
	done = 1;
	fz_name = name;
	/* Reports are what the lock harness checks; elsewhere a report about
	 * misuse a harness commits on purpose must not end the run. */
	keel_lockcheck_set(KEEL_LOCKCHECK_REPORT);
}

/* ---- The standalone runner --------------------------------------------------- */

static const uint8_t *cur_data;
static size_t cur_size;
static unsigned long long cur_seed;
static unsigned long cur_input;
static int cur_from_file;

static void save_input(int sig)
{
	const char *dir = getenv("FUZZ_ARTIFACTS");
	char path[512], msg[800];
	int fd, n;

	if (cur_data && !cur_from_file) {
		snprintf(path, sizeof path, "%s/fuzz-%s-seed%llu-input%lu.bin",
			 dir && *dir ? dir : ".", fz_name, cur_seed, cur_input);
		fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
		if (fd >= 0) {
			if (write(fd, cur_data, cur_size) < 0) {
				/* Dying anyway. */
			}
			close(fd);
		}
		/* Not async-signal-safe, but the process is dying and the
		 * operations are what a reader needs. */
		print_notes();
		n = snprintf(msg, sizeof msg,
			     "%s: died in input %lu of seed %llu (signal %d); "
			     "saved as %s; replay: %s %s\n",
			     fz_name, cur_input, cur_seed, sig, path, fz_name,
			     path);
		if (n > 0 && write(STDERR_FILENO, msg, (size_t)n) < 0) {
			/* Dying anyway. */
		}
	}
	signal(sig, SIG_DFL);
	raise(sig);
}

static double seconds_since(const struct timespec *t0)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)(t.tv_sec - t0->tv_sec) +
	       (double)(t.tv_nsec - t0->tv_nsec) / 1e9;
}

static uint64_t splitmix(uint64_t *s)
{
	uint64_t x = *s += 0x9E3779B97F4A7C15ull;

	x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
	x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
	return x ^ (x >> 31);
}

static int replay(const char *path, int (*one)(const uint8_t *, size_t),
		  unsigned long times)
{
	static uint8_t buf[1 << 16];
	size_t n;
	FILE *f = fopen(path, "rb");

	if (!f) {
		fprintf(stderr, "%s: cannot open %s\n", fz_name, path);
		return 1;
	}
	n = fread(buf, 1, sizeof buf, f);
	fclose(f);
	cur_from_file = 1;
	for (unsigned long i = 0; i < times; i++)
		one(buf, n);
	printf("%s: %s: %lu run%s, no finding\n", fz_name, path, times,
	       times == 1 ? "" : "s");
	return 0;
}

int fz_main(int argc, char **argv, const char *name,
	    int (*one)(const uint8_t *data, size_t size))
{
	unsigned long long seed = 0;
	unsigned long iters = 0, done = 0;
	double limit = 0;
	int have_seed = 0, nfiles = 0, rc = 0;
	struct timespec t0;
	uint8_t buf[FZ_INPUT_MAX];

	fz_init(name);
	for (int i = 1; i < argc; i++) {
		if (strcmp(argv[i], "--seed") == 0 && i + 1 < argc) {
			seed = strtoull(argv[++i], NULL, 0);
			have_seed = 1;
		} else if (strcmp(argv[i], "--iters") == 0 && i + 1 < argc) {
			iters = strtoul(argv[++i], NULL, 0);
		} else if (strcmp(argv[i], "--time") == 0 && i + 1 < argc) {
			limit = strtod(argv[++i], NULL);
		} else if (strcmp(argv[i], "--verbose") == 0) {
			fz_verbose = 1;
		} else if (argv[i][0] == '-') {
			fprintf(stderr,
				"usage: %s [--seed N] [--iters M] [--time S] "
				"[--verbose] [FILE...]\n",
				name);
			return 2;
		} else {
			nfiles++;
		}
	}
	signal(SIGABRT, save_input);
	signal(SIGSEGV, save_input);
	signal(SIGBUS, save_input);
	if (nfiles) {
		for (int i = 1; i < argc; i++) {
			if (strcmp(argv[i], "--seed") == 0 ||
			    strcmp(argv[i], "--iters") == 0 ||
			    strcmp(argv[i], "--time") == 0)
				i++;
			else if (argv[i][0] != '-')
				rc |= replay(argv[i], one, iters ? iters : 1);
		}
		return rc;
	}
	if (!have_seed) {
		struct timespec now;

		clock_gettime(CLOCK_REALTIME, &now);
		seed = (unsigned long long)now.tv_sec * 1000003ull ^
		       (unsigned long long)now.tv_nsec ^ (unsigned long long)getpid();
		seed %= 1000000007ull;
	}
	if (!iters && !limit)
		limit = 5;
	printf("%s: seed %llu (replay with --seed %llu)\n", name, seed, seed);
	fflush(stdout);
	cur_seed = seed;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (;;) {
		uint64_t s = seed * 0x100000001b3ull ^ done;
		size_t n;

		if (iters && done >= iters)
			break;
		if (limit && seconds_since(&t0) >= limit)
			break;
		n = FZ_INPUT_MIN + splitmix(&s) % (FZ_INPUT_MAX - FZ_INPUT_MIN);
		for (size_t i = 0; i < n; i += 8) {
			uint64_t r = splitmix(&s);

			memcpy(buf + i, &r, n - i < 8 ? n - i : 8);
		}
		cur_data = buf;
		cur_size = n;
		cur_input = done;
		if (fz_verbose)
			fprintf(stderr, "%s: input %lu (%zu bytes)\n", name, done, n);
		one(buf, n);
		done++;
	}
	cur_data = NULL;
	printf("%s: seed %llu: %lu inputs in %.1f s, no finding\n", name, seed,
	       done, seconds_since(&t0));
	return 0;
}
