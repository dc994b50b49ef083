/*
 * keel/scope.h: scopes (structured concurrency) and cancellation.
 *
 * A scope owns one stack of entries: child tasks (foreground or
 * background), cleanups and resources, in creation order. Nothing it owns
 * outlives it. Closing a scope cancels what still runs, then unwinds the
 * stack in reverse: a cleanup registered at position i runs only after
 * every task registered after position i has fully exited, its own
 * cleanups included.
 *
 * Cancellation is cooperative, sticky and carries a cause. It is delivered
 * at cancellation points, which return -ECANCELED: keel_checkpoint(),
 * keel_sleep_until(), keel_fd_wait(), keel_serve(), keel_call(),
 * keel_join(), keel_scope_join(). A scope's deadline applies to every wait
 * inside it (the effective deadline is the minimum over the enclosing
 * scopes); when it passes, the scope is cancelled with cause
 * KEEL_CANCEL_DEADLINE.
 *
 * See docs/scopes.md.
 */
#ifndef KEEL_SCOPE_H
#define KEEL_SCOPE_H

#include <stdio.h>

#include "common.h"
#include "mailbox.h"
#include "task.h"

#ifdef __cplusplus
extern "C" {
#endif

/**
 * typedef keel_scope_t - a scope, named by an opaque handle.
 *
 * A keel_scope_t pointer is checked by generation, not dereferenced: using
 * one after keel_scope_close() returned is detected (-ECANCELED from
 * keel_spawn(), -EINVAL elsewhere), never undefined behaviour.
 */
typedef struct keel_scope keel_scope_t;

/* What a scope does when a child fails. */
typedef enum keel_policy {
	KEEL_FAIL_FAST = 0, /* the first child error cancels the scope */
	KEEL_SUPERVISE = 1, /* errors are recorded; siblings go on */
} keel_policy_t;

/* Why a task is cancelled. */
typedef enum keel_cause {
	KEEL_CANCEL_NONE = 0,
	KEEL_CANCEL_EXPLICIT = 1, /* keel_scope_cancel(), keel_task_cancel() */
	KEEL_CANCEL_DEADLINE = 2, /* a scope's or shield's deadline passed */
	KEEL_CANCEL_SIBLING = 3,  /* a sibling failed (KEEL_FAIL_FAST) */
	KEEL_CANCEL_SIGNAL = 4,   /* SIGINT or SIGTERM (keel_main) */
	KEEL_CANCEL_CLOSE = 5,    /* its turn came in its scope's close */
} keel_cause_t;

/* Called as each child task ends; see keel_scope_opts. */
typedef void (*keel_exit_fn)(keel_task_t child, int status, void *arg);

/**
 * struct keel_scope_opts - how a scope behaves; zero means the default.
 * @name:             for keel_dump(); copied. Default "scope".
 * @deadline:         absolute time after which the scope is cancelled
 *                    (cause KEEL_CANCEL_DEADLINE); 0: none. Any other
 *                    time before now, negative ones included, has passed
 *                    already: the scope opens cancelled.
 * @cleanup_deadline: how long each cleanup may block, a duration; 0: 5 s.
 * @policy:           KEEL_FAIL_FAST (default) or KEEL_SUPERVISE.
 * @on_exit:          called on each child's thread as it ends, after its
 *                    own scopes closed, with its handle and status; NULL:
 *                    none. Must not block.
 * @on_exit_arg:      passed to @on_exit.
 */
typedef struct keel_scope_opts {
	const char *name;
	keel_time_t deadline;
	keel_time_t cleanup_deadline;
	keel_policy_t policy;
	keel_exit_fn on_exit;
	void *on_exit_arg;
} keel_scope_opts;

/* A task's body; its return value is its status (negative: an error). */
typedef int (*keel_fn)(void *arg);
/* The body of keel_scope_run() and keel_main(). */
typedef int (*keel_body_fn)(keel_scope_t *s, void *arg);
/* A cleanup, or a resource's teardown (whose arg is the resource). */
typedef int (*keel_cleanup_fn)(void *arg);
/* A resource's setup: stores the resource in *resource, returns 0 or an
 * error. */
typedef int (*keel_setup_fn)(void *arg, void **resource);

/**
 * struct keel_spawn_opts - how a child task starts; zero means the default.
 * @name:       the task's name (keel_task_name()); default "task-N".
 * @stack_size: bytes of stack; 0: the system's default.
 * @background: nonzero for a background child: keel_scope_join() does not
 *              wait for it, and keel_scope_run() cancels it when the body
 *              and the foreground children are done.
 * @detached:   nonzero: the child cannot be joined even though its handle
 *              is taken (to name it, to cancel it with keel_task_cancel()
 *              or to send to it); it gives back its slot when it ends, as
 *              a child spawned without a handle does.
 */
typedef struct keel_spawn_opts {
	const char *name;
	size_t stack_size;
	int background;
	int detached;
} keel_spawn_opts;

/**
 * keel_scope_open() - open a scope inside the calling task's current one.
 * @out:  where the new scope's handle is stored.
 * @opts: may be NULL for the defaults.
 *
 * The caller becomes the scope's owner: the scope's body. Until it closes
 * the scope, the caller's waits see the scope's cancellation and deadline.
 *
 * Context: a task (adopted if needed); never blocks.
 * Return: 0; -EINVAL if @out is NULL or @opts has a negative
 * cleanup_deadline or an unknown policy; -ECANCELED if the caller is
 * already cancelled (nothing is opened); -ENOMEM.
 */
KEEL_API int keel_scope_open(keel_scope_t **out, const keel_scope_opts *opts);

/**
 * keel_spawn() - start a child task in a scope.
 * @s:    the scope; it may be owned by another task.
 * @fn:   the child's body; its return value is the child's status.
 * @arg:  passed to @fn.
 * @opts: may be NULL for the defaults.
 * @out:  where the child's handle is stored; may be NULL. It is stored
 *        before the child starts (a child may read it where the caller
 *        keeps it); on failure *@out keeps the value it had.
 *
 * The child runs on a cached thread, inside @s: cancelling @s cancels it,
 * and @s's deadline applies to its waits. It ends when @fn returns; its
 * mailbox closes, then its own open scopes are closed, then @s's on_exit
 * hook runs. A status below 0 other than -ECANCELED is a failure.
 *
 * Memory follows what is live. A child spawned with @out NULL, or with
 * @opts->detached, is reaped as soon as it ends: its status goes to the
 * on_exit hook and into @s's result, and its entry and task slot are given
 * back, so a scope that runs a million short children 200 at a time holds
 * memory for about 200. A child whose handle was taken (and that is not
 * detached) stays joinable: its entry and slot are kept until keel_join()
 * takes its status or keel_scope_close() does. The handle of a reaped
 * child is stale, like that of any task that has ended.
 *
 * Context: any task; never blocks.
 * Return: 0; -EINVAL if @fn is NULL or @s is not a scope; -ECANCELED if @s
 * is cancelled, closing or closed (nothing starts); -ENOMEM.
 */
KEEL_API int keel_spawn(keel_scope_t *s, keel_fn fn, void *arg,
			const keel_spawn_opts *opts, keel_task_t *out);

/**
 * keel_defer() - push a cleanup on a scope's stack.
 * @s:   the scope.
 * @fn:  run by keel_scope_close(), in reverse order of registration, on the
 *       owner's task, shielded from cancellation until cleanup_deadline.
 * @arg: passed to @fn.
 *
 * Context: the scope's owner; never blocks.
 * Return: 0; -EINVAL if @fn is NULL or @s is not a scope; -EPERM if the
 * caller does not own @s; -ECANCELED if @s is closing; -ENOMEM.
 */
KEEL_API int keel_defer(keel_scope_t *s, keel_cleanup_fn fn, void *arg);

/**
 * keel_resource() - set up a resource and arm its teardown in one step.
 * @s:        the scope.
 * @setup:    run now, on the caller: acquires the resource and stores it.
 * @teardown: run with the resource by keel_scope_close(), like a cleanup.
 * @arg:      passed to @setup.
 * @out:      where the resource is stored too; may be NULL.
 *
 * The stack entry is reserved before @setup runs, so once @setup succeeds
 * nothing (no allocation failure, no cancellation) can come between it and
 * @teardown being armed. A failed @setup registers nothing.
 *
 * Context: the scope's owner; blocks as long as @setup does.
 * Return: 0; @setup's error if it failed; -EINVAL if @setup or @teardown is
 * NULL or @s is not a scope; -EPERM if the caller does not own @s;
 * -ECANCELED if the caller is cancelled before @setup runs (it does not
 * run); -ENOMEM.
 */
KEEL_API int keel_resource(keel_scope_t *s, keel_setup_fn setup,
			   keel_cleanup_fn teardown, void *arg, void **out);

/**
 * keel_scope_join() - wait for a scope's foreground children to finish.
 * @s:        the scope.
 * @deadline: absolute time to stop waiting.
 *
 * Does not cancel anything: a grace period before keel_scope_close().
 *
 * Context: the scope's owner; blocks; a cancellation point.
 * Return: 0 when no foreground child is running; -ETIMEDOUT; -ECANCELED;
 * -EINVAL if @s is not a scope; -EPERM if the caller does not own @s.
 */
KEEL_API int keel_scope_join(keel_scope_t *s, keel_time_t deadline);

/**
 * keel_scope_cancel() - cancel every task in a scope, and every nested one.
 * @s: the scope.
 *
 * The owner's waits inside @s are cancelled too. Sticky and idempotent:
 * the first cause stays.
 *
 * Context: any thread, including threads keel did not start; never blocks.
 * Return: 0; -EINVAL if @s is not (or no longer) a scope.
 */
KEEL_API int keel_scope_cancel(keel_scope_t *s);

/**
 * keel_task_cancel() - cancel one task, and every scope nested in it.
 * @t: any task: a child of any scope, or a thread keel adopted.
 *
 * Only @t and what runs inside it (the children of the scopes it opened,
 * recursively) are cancelled: its siblings and its scope go on, and a
 * child that then returns -ECANCELED is not a failure of its scope, under
 * either policy. Its waits return -ECANCELED and keel_cancel_cause() says
 * KEEL_CANCEL_EXPLICIT. Sticky and idempotent: the first cause stays. A
 * child that has finished but not been joined yet is cancelled harmlessly
 * (0): its status does not change.
 *
 * Context: any thread, including threads keel did not start; never blocks.
 * May run @t's keel_on_cancel() callbacks on the calling thread.
 * Return: 0; -ESRCH if @t does not name a task that exists (it ended and
 * was reaped, or never was).
 */
KEEL_API int keel_task_cancel(keel_task_t t);

/**
 * keel_scope_close() - tear a scope down and free it.
 * @s: the scope.
 *
 * Unwinds the stack in exact reverse order of registration, one entry at
 * a time: a child still running is cancelled and joined; a cleanup or
 * teardown runs, shielded until cleanup_deadline (one still blocked then
 * is cut off by a cancellation, and reported). What was registered earlier
 * keeps running while what came later is torn down. On return no task of
 * the scope's subtree is running and @s is freed.
 *
 * Context: the scope's owner, with no scope opened inside @s still open;
 * blocks until the children have ended; not a cancellation point.
 * Return: 0; the first genuine child (or body) failure; else the first
 * cleanup failure (-ETIMEDOUT for one cut off at cleanup_deadline); else
 * -ETIMEDOUT if the scope's deadline cancelled it, or
 * -ECANCELED if it was cancelled otherwise before the close; -EINVAL if @s
 * is not a scope; -EPERM if the caller does not own @s; -EBUSY if a scope
 * opened inside @s is still open, or if called from inside the setup of a
 * keel_resource() of @s (nothing is closed; the latter is also reported);
 * -EDEADLK on the main JavaScript thread of a WebAssembly program while a
 * child has not ended (nothing is closed: that thread must not wait).
 */
KEEL_API int keel_scope_close(keel_scope_t *s);

/**
 * keel_scope_run() - open a scope, run @body in it, wait, close.
 * @body: runs on the calling task with the new scope; its status counts as
 *        a child's (a failure cancels the scope under KEEL_FAIL_FAST).
 * @arg:  passed to @body.
 * @opts: may be NULL for the defaults.
 *
 * After @body returns, waits for the foreground children (until the
 * scope's deadline), then closes: background children are cancelled.
 *
 * Context: a task (adopted if needed); blocks; not a cancellation point
 * itself, but @body and the wait are inside the scope.
 * Return: as keel_scope_close(), with @body's failure counted first if it
 * came first; or keel_scope_open()'s error; -EDEADLK on the main
 * JavaScript thread of a WebAssembly program, which must not wait
 * (nothing runs).
 */
KEEL_API int keel_scope_run(keel_body_fn body, void *arg,
			    const keel_scope_opts *opts);

/**
 * keel_main() - run a program's root scope, with graceful Ctrl-C.
 * @body: the program; runs in the root scope on the calling thread.
 * @arg:  passed to @body.
 *
 * keel_main_opts() with the default options: the root scope is named
 * "main", fails fast, and has no deadline.
 *
 * Context: the program's main thread, once at a time; blocks.
 * Return: an exit status for main(), as keel_main_opts().
 */
KEEL_API int keel_main(keel_body_fn body, void *arg);

/**
 * keel_main_opts() - keel_main() with options for the root scope.
 * @body: the program; runs in the root scope on the calling thread.
 * @arg:  passed to @body.
 * @opts: the root scope's options (name, deadline, cleanup_deadline,
 *        policy, on_exit), as keel_scope_open(); NULL or a NULL name:
 *        "main".
 *
 * Like keel_scope_run(), plus: the first SIGINT or SIGTERM cancels the root
 * scope (cause KEEL_CANCEL_SIGNAL) so everything tears down in order; a
 * second one ends the process at once with _exit(128 + signal). keel
 * installs handlers for the two signals for the duration of the call.
 *
 * When it returns, no fd of keel's is open: its signal fd is closed, and
 * the calling thread's task is ended as a thread exit would end it
 * (messages still queued to it are cancelled; the fds of
 * keel_mailbox_fd() and keel_fd_wait() are closed). A keel call made on
 * the thread afterwards adopts it as a new task.
 *
 * Context: the program's main thread, once at a time; blocks.
 * Return: an exit status for main(): 128 + the signal number (130 for
 * SIGINT, 143 for SIGTERM) if a signal cancelled the scope; else @body's
 * return value if it is positive (255 if above); else 1 if the scope
 * failed (@body's negative errno, a child's failure, -ETIMEDOUT for the
 * scope's deadline, -EINVAL for bad @opts, -EDEADLK on the main
 * JavaScript thread of a WebAssembly program, where nothing runs); else
 * 0. A failure is also written to stderr, one line naming the error
 * ("keel_main: body failed: ECONNREFUSED (connection refused)"). A
 * cancellation by other means (the body cancelling its own scope) is a
 * clean end, not a failure.
 */
KEEL_API int keel_main_opts(keel_body_fn body, void *arg,
			    const keel_scope_opts *opts);

/**
 * keel_join() - wait for one child to end and take its status.
 * @t:        a child of a scope the caller owns.
 * @status:   where the child's status is stored; may be NULL.
 * @deadline: absolute time to stop waiting.
 *
 * The child's entry is done: keel_scope_close() does not join it again. A
 * child that finished is never reported as cancelled: its status is its
 * return value, whatever cancellation came after.
 *
 * Context: the owner of @t's scope; blocks; a cancellation point.
 * Return: 0; -ETIMEDOUT; -ECANCELED (the caller was cancelled; the child
 * stays joinable); -EINVAL if @t was spawned without keeping its handle
 * joinable (keel_spawn_opts.detached): it is reaped when it ends;
 * -ESRCH if @t is not a live child or was joined already;
 * -EPERM if the caller does not own @t's scope; -EDEADLK on the main
 * JavaScript thread of a WebAssembly program if @t has not ended.
 */
KEEL_API int keel_join(keel_task_t t, int *status, keel_time_t deadline);

/**
 * keel_checkpoint() - a cancellation point for code that does not wait.
 *
 * Context: a task; never blocks.
 * Return: 0; -ECANCELED if the calling task is cancelled (a deadline that
 * has passed counts).
 */
KEEL_API int keel_checkpoint(void);

/**
 * keel_sleep_until() - sleep until a deadline.
 * @deadline: absolute time to wake.
 *
 * Context: a task; blocks; a cancellation point.
 * Return: 0 at the deadline; -ECANCELED if cancelled first.
 */
KEEL_API int keel_sleep_until(keel_time_t deadline);

/**
 * keel_fd_wait() - wait for a file descriptor to be ready, cancellably.
 * @fd:       the descriptor.
 * @events:   poll(2) events: POLLIN, POLLOUT, ...
 * @deadline: absolute time to give up.
 *
 * How a task waits for I/O so that cancellation reaches it.
 *
 * Context: a task; blocks; a cancellation point.
 * Return: the poll(2) revents (> 0); -ETIMEDOUT; -ECANCELED; -EINVAL if @fd
 * is negative; another negative errno value from poll(2).
 */
KEEL_API int keel_fd_wait(int fd, short events, keel_time_t deadline);

/**
 * keel_cancel_cause() - why the calling task is cancelled.
 *
 * Context: a task; never blocks.
 * Return: a keel_cause_t; KEEL_CANCEL_NONE if it is not cancelled.
 */
KEEL_API int keel_cancel_cause(void);

/**
 * keel_shield_begin() - hide outer cancellation until a deadline.
 * @deadline: absolute time at which the shield itself cancels (cause
 *            KEEL_CANCEL_DEADLINE); must not be KEEL_FOREVER.
 *
 * Shields nest; each keel_shield_begin() needs its keel_shield_end().
 * Cleanups run inside an implicit shield.
 *
 * Context: a task; never blocks.
 * Return: 0; -EINVAL if @deadline is KEEL_FOREVER; -ENOMEM.
 */
KEEL_API int keel_shield_begin(keel_time_t deadline);

/**
 * keel_shield_end() - end the innermost shield of the calling task.
 *
 * Context: the task that began the shield, inside no scope it opened after
 * the shield began; never blocks.
 * Return: 0; -EPERM if the calling task has no shield to end (or a scope
 * opened inside the shield is still open, or the innermost shield is the
 * one keel runs a cleanup in).
 */
KEEL_API int keel_shield_end(void);

/* Names a registration made with keel_on_cancel(). */
typedef uint64_t keel_cancel_token_t;

/**
 * keel_on_cancel() - run a callback when the calling task is cancelled.
 * @fn:    run at most once: on the thread that cancels the task, or at once
 *         on the caller if the task is cancelled already, holding no keel
 *         lock. Must be short and must not block; it may post, or cancel
 *         another scope.
 * @arg:   passed to @fn.
 * @token: where the registration's token is stored.
 *
 * A registration still there when the task ends is dropped (one running
 * on another thread is waited for), so @fn never runs after its task's
 * body has returned.
 *
 * Context: a task; never blocks.
 * Return: 0; -EINVAL if @fn or @token is NULL; -ENOMEM if the task has
 * more than 8 registrations.
 */
KEEL_API int keel_on_cancel(keel_work_fn fn, void *arg,
			    keel_cancel_token_t *token);

/**
 * keel_on_cancel_remove() - take back a keel_on_cancel() registration.
 * @token: the registration.
 *
 * When it returns, the callback is not running and never will (unless this
 * is called from inside the callback itself, which is allowed).
 *
 * Context: the task that registered it; may wait for the callback to
 * return on another thread.
 * Return: 0 if removed before it ran; 1 if it had run (or is the one
 * running this call); -EINVAL if @token names no registration of the
 * calling task.
 */
KEEL_API int keel_on_cancel_remove(keel_cancel_token_t token);

/**
 * keel_dump() - print the live tree of scopes and tasks.
 * @f: where to print.
 *
 * For each scope: name, state, deadline, age, entries; for each task:
 * name, handle, state, what it is blocked in, age.
 *
 * Context: any thread; holds keel's scope locks while it writes (scopes
 * being opened, closed or spawned into wait meanwhile), so writing to @f
 * should not block for long.
 * Return: 0; -EINVAL if @f is NULL.
 */
KEEL_API int keel_dump(FILE *f);

/**
 * keel_dump_dot() - the same tree in Graphviz dot.
 * @f: where to write.
 *
 * Context: as keel_dump().
 * Return: 0; -EINVAL if @f is NULL.
 */
KEEL_API int keel_dump_dot(FILE *f);

#ifdef __cplusplus
}
#endif

#endif /* KEEL_SCOPE_H */
