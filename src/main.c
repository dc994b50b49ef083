/*
 * main.c: keel_main(), the program's top: its root scope, graceful
 * SIGINT/SIGTERM, the exit status, and leaving no fd behind.
 *
 * DESIGN
 * The signal handler does only what is async-signal-safe: it counts the
 * signal, ends the process at once on the second one (_exit(128 + sig)),
 * and otherwise records the signal and writes the watcher's notification
 * fd (an eventfd on Linux, a pipe in the portable layer; close-on-exec
 * either way). A watcher thread, with every signal blocked, turns that
 * into a cancellation of the root scope with cause KEEL_CANCEL_SIGNAL.
 *
 * The watcher's states (m.scope and m.signal are seq_cst atomics):
 *   no scope yet: a signal is recorded; main_body publishes the scope and
 *                 then looks at m.signal, so whichever of the two comes
 *                 second cancels it (scope cancellation is idempotent);
 *   scope open:   each wake with m.signal set cancels it;
 *   scope closed: keel_main() clears m.scope before it sets m.stop; a
 *                 stale scope handle is refused by its generation anyway;
 *   stopping:     m.stop set, then a wake; the watcher leaves and is
 *                 joined.
 *
 * When keel_main() returns, nothing of keel's stays open: the watcher's
 * fd is closed, and the calling thread's task (adopted on its first keel
 * call, usually the program's main thread) is ended as a thread exit
 * would end it: its mailbox drained, its mailbox fd (keel_mailbox_fd())
 * and wake fd (keel_fd_wait()) closed. A later keel call on the thread
 * adopts it afresh.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"

static struct {
	_Atomic int signal; /* the first signal, 0 if none */
	_Atomic int seen;   /* signals received */
	_Atomic int stop;   /* the watcher is to leave */
	_Atomic int wfd;    /* -1 once keel_main is done with it */
	keel_scope_t *_Atomic scope;
	int rfd;
} m = {.rfd = -1, .wfd = -1};

static void main_on_signal(int sig)
{
	int saved = errno, fd;

	/* The second signal ends the process at once. */
	if (atomic_fetch_add(&m.seen, 1) > 0)
		_exit(128 + sig);
	atomic_store(&m.signal, sig);
	/* A handler running on another thread as keel_main returns reads
	 * -1 (a harmless EBADF), not a closed fd's number reused. */
	fd = atomic_load(&m.wfd);
	if (fd >= 0)
		keel__notify_signal(fd);
	errno = saved;
}

/* Turns the first signal into a cancellation, outside the handler. */
static void *main_watcher(void *p)
{
	struct pollfd pfd = {.fd = m.rfd, .events = POLLIN};

	(void)p;
	for (;;) {
		if (poll(&pfd, 1, -1) < 0)
			continue; /* EINTR; every signal is blocked anyway */
		keel__notify_drain(m.rfd);
		if (atomic_load(&m.stop))
			return NULL;
		if (atomic_load(&m.signal)) {
			keel_scope_t *s = atomic_load(&m.scope);

			if (s)
				keel__scope_cancel_signal(s);
		}
	}
}

struct main_call {
	keel_body_fn body;
	void *arg;
	int ran;
	int status;
};

static int main_body(keel_scope_t *s, void *p)
{
	struct main_call *mc = p;

	atomic_store(&m.scope, s);
	/* A signal that came before the scope was known. */
	if (atomic_load(&m.signal))
		keel__scope_cancel_signal(s);
	mc->ran = 1;
	mc->status = mc->body(s, mc->arg);
	return mc->status;
}

/* "keel_main: <what>: ECONNREFUSED (connection refused)": one line, one
 * write. keel_strerror() gives "NAME: text". */
static void report_error(const char *what, int err)
{
	const char *e = keel_strerror(err), *colon = strstr(e, ": ");

	if (colon)
		keel__report("keel_main: %s: %.*s (%s)", what, (int)(colon - e),
			     e, colon + 2);
	else
		keel__report("keel_main: %s: %d (%s)", what, err, e);
}

int keel_main_opts(keel_body_fn body, void *arg, const keel_scope_opts *opts)
{
	struct main_call mc = {body, arg, 0, 0};
	struct sigaction sa, old_int, old_term;
	keel_scope_opts o = {0};
	sigset_t all, old_mask;
	pthread_t watcher;
	int rc, sig, wfd;

	if (!body) {
		report_error("no body", -EINVAL);
		return 1;
	}
	if (!keel__thread_may_block()) {
		/* The main JavaScript thread: it would wait for the body's
		 * children and its signal thread. */
		report_error("called on the main JavaScript thread", -EDEADLK);
		return 1;
	}
	if (opts)
		o = *opts;
	if (!o.name)
		o.name = "main";
	atomic_store(&m.signal, 0);
	atomic_store(&m.seen, 0);
	atomic_store(&m.stop, 0);
	if ((rc = keel__notify_open(&m.rfd, &wfd)) < 0) {
		report_error("cannot make its signal fd", rc);
		return 1;
	}
	atomic_store(&m.wfd, wfd);
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old_mask);
	rc = pthread_create(&watcher, NULL, main_watcher, NULL);
	pthread_sigmask(SIG_SETMASK, &old_mask, NULL);
	if (rc != 0) {
		atomic_store(&m.wfd, -1);
		keel__notify_close(m.rfd, wfd);
		m.rfd = -1;
		report_error("cannot start its signal thread", -rc);
		return 1;
	}
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = main_on_signal;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGINT, &sa, &old_int);
	sigaction(SIGTERM, &sa, &old_term);

	rc = keel_scope_run(main_body, &mc, &o);

	sigaction(SIGINT, &old_int, NULL);
	sigaction(SIGTERM, &old_term, NULL);
	atomic_store(&m.scope, NULL);
	atomic_store(&m.stop, 1);
	keel__notify_signal(wfd);
	pthread_join(watcher, NULL);
	atomic_store(&m.wfd, -1);
	keel__notify_close(m.rfd, wfd);
	m.rfd = -1;
	keel__task_retire_self();

	sig = atomic_load(&m.signal);
	if (sig)
		return 128 + sig;
	/* A cancellation of the root scope other than by a signal or a
	 * deadline (the body, or a task, asked the program to stop) is a
	 * clean end, as any exit caused by cancellation. */
	if (rc < 0 && rc != -ECANCELED) {
		char what[96];

		if (!mc.ran)
			snprintf(what, sizeof what, "cannot open its root scope");
		else if (rc == mc.status)
			snprintf(what, sizeof what, "body failed");
		else
			snprintf(what, sizeof what, "scope '%s' failed", o.name);
		report_error(what, rc);
		return mc.status > 0 ? (mc.status > 255 ? 255 : mc.status) : 1;
	}
	if (mc.status > 0)
		return mc.status > 255 ? 255 : mc.status;
	return 0;
}

int keel_main(keel_body_fn body, void *arg)
{
	return keel_main_opts(body, arg, NULL);
}
