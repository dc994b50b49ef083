/*
 * keel/mailbox.h: mailboxes and proxying.
 *
 * Every task has a mailbox: a multi-producer, single-consumer queue of
 * messages {work, cancel, arg}. Sending is lock-free and never blocks.
 * A task may bound its mailbox (keel_mailbox_limit()): a send to a full
 * one is refused with -EAGAIN, or waits for room (keel_post_until()).
 *
 * The guarantee: every message a mailbox accepts gets exactly one outcome.
 * Its work runs on the target, or its cancel handler runs on the target
 * when the target's mailbox closes first. A refused send runs neither. This
 * holds with any number of senders racing the target's close.
 *
 * Messages run only at explicit serve points: keel_serve(), which an event
 * loop calls when keel_mailbox_fd() is readable, and the drain when the
 * mailbox closes. They never run inside another keel call. One sender's
 * messages to one target run in the order they were sent.
 *
 * Event loops: keel/uv.h and keel/glib.h (optional, header-only, not
 * included here) attach a task's mailbox to a libuv or GLib loop and stop
 * the loop when the task is cancelled.
 *
 * See docs/mailbox.md.
 */
#ifndef KEEL_MAILBOX_H
#define KEEL_MAILBOX_H

#include "common.h"
#include "task.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Work, done and cancel callbacks of plain messages. */
typedef void (*keel_work_fn)(void *arg);

/**
 * typedef keel_ctx_t - a unit of proxied work that finishes later.
 *
 * Handed to a keel_ctx_work_fn. The work may return with the ctx still
 * unfinished and complete it later, from any thread, with
 * keel_ctx_finish(). A keel_ctx_t pointer is an opaque handle checked by
 * generation, not an address: keel never dereferences a stale one.
 */
typedef struct keel_ctx keel_ctx_t;

/* Work callback of the _ctx variants. */
typedef void (*keel_ctx_work_fn)(keel_ctx_t *ctx, void *arg);

/**
 * keel_post() - send a fire-and-forget message.
 * @target: the task to run it.
 * @work:   run on @target at one of its serve points; must not be NULL.
 * @cancel: run on @target instead of @work if its mailbox closes with the
 *          message still queued; may be NULL.
 * @arg:    passed to @work or @cancel.
 *
 * If the call returns 0, exactly one of @work or @cancel will run (a NULL
 * @cancel counts as having run). If it returns an error, neither runs.
 *
 * Context: any thread, including threads keel did not start (the caller is
 * not adopted); lock-free, never blocks; not a cancellation point; any
 * locks may be held.
 * Return: 0 if the message was accepted; -EINVAL if @work is NULL; -ESRCH
 * if @target is not a live task (never was, or has ended); -ESHUTDOWN if
 * its mailbox is closed; -EAGAIN if its mailbox is bounded
 * (keel_mailbox_limit()) and full; -ENOMEM if no memory was left for the
 * message.
 */
KEEL_API int keel_post(keel_task_t target, keel_work_fn work,
		       keel_work_fn cancel, void *arg);

/**
 * keel_post_until() - send a message, waiting for room in a bounded mailbox.
 * @target:   the task to run it.
 * @work:     as for keel_post(); must not be NULL.
 * @cancel:   as for keel_post(); may be NULL.
 * @arg:      passed to @work or @cancel.
 * @deadline: absolute time to stop waiting for room; 0 does not wait.
 *
 * keel_post() that, instead of failing with -EAGAIN when @target's mailbox
 * is full, waits until @target's serving makes room. With room at once
 * (and always for an unbounded mailbox) it sends without waiting, even in
 * a cancelled task. Waiting senders are woken one per place freed, in the
 * order they began to wait. If the call returns 0, exactly one of @work or
 * @cancel will run; if it returns an error, neither runs.
 *
 * Context: any thread (a thread keel did not start is adopted if it has to
 * wait); blocks until there is room or @deadline; a cancellation point
 * while it waits. Must not hold a no-block lock.
 * Return: 0 if the message was accepted; -EINVAL if @work is NULL; -ESRCH
 * if @target is not a live task, or ended while the caller waited;
 * -ESHUTDOWN if its mailbox is or became closed; -ETIMEDOUT if @deadline
 * passed with the mailbox still full; -ECANCELED if the caller was
 * cancelled while it waited; -EDEADLK if @target is the calling task, its
 * mailbox is full and @deadline is still ahead (only it could make room);
 * -ENOMEM.
 */
KEEL_API int keel_post_until(keel_task_t target, keel_work_fn work,
			     keel_work_fn cancel, void *arg,
			     keel_time_t deadline);

/**
 * typedef keel_msg_t - a message whose memory the sender owns.
 *
 * keel_post() takes a record from keel's own table for each message. A
 * sender that already has a struct per request can embed a keel_msg_t in
 * it and send that instead, with keel_post_msg(): nothing is allocated
 * per send, and the messages lie where the sender put them (an array of
 * requests is read in order, which is what a deep queue wants).
 *
 * Opaque, 64 bytes, 8-byte alignment (place it on a 64-byte boundary to
 * keep it on one cache line). Register it once with keel_msg_init() and
 * unregister it with keel_msg_fini() before its memory goes: each one
 * registered holds one of about four million places until then.
 */
typedef struct keel_msg {
	uint64_t keel_private_[8];
}
#if defined(__GNUC__) || defined(__clang__)
__attribute__((aligned(8))) /* 32-bit x86 aligns uint64_t to 4 */
#endif
keel_msg_t;

/**
 * keel_msg_init() - register a keel_msg_t for sending.
 * @msg: the message; its contents are overwritten.
 *
 * Calling it again on a registered message that is not queued keeps it
 * as it is. Not for a message in memory that another registered one still
 * occupies (copying a keel_msg_t does not register the copy).
 *
 * Context: any thread; takes a process-wide lock briefly; not a
 * cancellation point.
 * Return: 0; -EINVAL if @msg is NULL; -EBUSY if it is registered and
 * queued; -ENOMEM if about four million messages are registered already
 * or memory ran out.
 */
KEEL_API int keel_msg_init(keel_msg_t *msg);

/**
 * keel_msg_fini() - unregister a keel_msg_t.
 * @msg: a message from keel_msg_init().
 *
 * Afterwards @msg may be freed, or registered again. It may be called
 * from the message's own work or cancel handler, which is where a sender
 * that frees its request there unregisters it.
 *
 * Context: any thread; takes a process-wide lock briefly.
 * Return: 0; -EINVAL if @msg is not registered; -EBUSY if it is queued
 * (accepted by a mailbox and its work or cancel has not started yet).
 */
KEEL_API int keel_msg_fini(keel_msg_t *msg);

/**
 * keel_post_msg() - send a fire-and-forget message in the sender's memory.
 * @target: the task to run it.
 * @msg:    a message from keel_msg_init(), not queued.
 * @work:   as for keel_post(); must not be NULL.
 * @cancel: as for keel_post(); may be NULL.
 * @arg:    passed to @work or @cancel.
 *
 * keel_post() without the allocation, with the same guarantee: if it
 * returns 0, exactly one of @work or @cancel runs; if it returns an error,
 * neither does. From a successful return until @work or @cancel starts,
 * @msg belongs to keel: it must stay in place and must not be sent again
 * (that is refused with -EBUSY), nor finished. Once @work or @cancel has
 * started, @msg is the sender's again: the handler may send it anew, or
 * finish and free it. keel tells a message sent again while queued
 * (-EBUSY), but two threads sending one message at the same moment race
 * on it as on any object of theirs: that is undefined. Ordered with the
 * sender's keel_post()s: one
 * sender's messages to one target run in the order they were sent, of
 * either kind. Bounded mailboxes count it as any message.
 *
 * Context: as keel_post().
 * Return: 0 if the message was accepted; -EINVAL if @work is NULL or @msg
 * is not registered; -EBUSY if @msg is queued; -ESRCH, -ESHUTDOWN, -EAGAIN
 * as keel_post().
 */
KEEL_API int keel_post_msg(keel_task_t target, keel_msg_t *msg,
			   keel_work_fn work, keel_work_fn cancel, void *arg);

/**
 * keel_post_msg_until() - keel_post_msg(), waiting for room.
 * @target:   the task to run it.
 * @msg:      as for keel_post_msg().
 * @work:     as for keel_post(); must not be NULL.
 * @cancel:   as for keel_post(); may be NULL.
 * @arg:      passed to @work or @cancel.
 * @deadline: as for keel_post_until().
 *
 * keel_post_until() for a keel_msg_t.
 *
 * Context: as keel_post_until().
 * Return: as keel_post_until(), and -EINVAL or -EBUSY for @msg as
 * keel_post_msg().
 */
KEEL_API int keel_post_msg_until(keel_task_t target, keel_msg_t *msg,
				 keel_work_fn work, keel_work_fn cancel,
				 void *arg, keel_time_t deadline);

/**
 * keel_mailbox_limit() - bound the calling task's mailbox.
 * @max: the most messages its queue may hold; 0 for no bound (the default).
 *
 * While @max messages are queued (accepted, not yet run), a keel_post() or
 * keel_call_then() to this task is refused with -EAGAIN and runs nothing;
 * keel_post_until(), keel_call() and keel_call_ctx() wait for room within
 * their deadline. Each message this task pops to run (or to cancel, in the
 * drain) gives its place back and wakes one waiting sender. Replies this
 * task is owed (the done or cancel of its own keel_call_then()) take no
 * place and are never refused: their number is bounded by its own calls.
 * Work that has started (a _ctx call in flight) holds no place.
 *
 * A new limit never drops or refuses anything already queued. Setting a
 * limit on an unbounded mailbox counts the messages already queued (a send
 * still under way as the limit is set may escape the count); if they are
 * @max or more, sends are refused until serving brings them below @max.
 * Raising the limit or removing it wakes the waiting senders. The limit
 * lasts until the task ends.
 *
 * Context: the calling task (adopted if needed); never blocks; not a
 * cancellation point; may be called from inside a message.
 * Return: 0; -EINVAL if @max is above UINT32_MAX; -ESHUTDOWN if the
 * mailbox is closed; -ENOMEM if the thread could not be adopted.
 */
KEEL_API int keel_mailbox_limit(size_t max);

/**
 * keel_serve() - run the calling task's pending messages.
 * @deadline: absolute time to give up waiting; 0 drains without blocking.
 *
 * Runs the pending messages in order. If none is pending, spins for a few
 * microseconds and then sleeps until one arrives, the deadline passes, or
 * the task is cancelled; a task asleep here uses no CPU. Returns after a
 * batch once the mailbox is empty, so a message that keeps posting to its
 * own task cannot trap the caller. A cancelled task runs no message here
 * (those queued are cancelled when its mailbox closes), but a batch under
 * way when the cancel comes is finished.
 *
 * With keel_mailbox_fd(): when it returns, the fd is readable exactly
 * while messages are pending (or the task is cancelled, or its mailbox
 * closed): it leaves no stale readiness behind, so a loop that serves
 * only when the fd fires never wakes for nothing and never spins. On
 * -ECANCELED and -ESHUTDOWN the fd stays readable: the loop is to leave.
 *
 * Context: the calling task (adopted if needed); blocks until @deadline;
 * a cancellation point. Must not be called from inside a message.
 * Return: the number of messages run (at least 1); -ETIMEDOUT if the
 * deadline passed before any ran (including @deadline 0 with nothing
 * pending); -ECANCELED if the task is cancelled; -ESHUTDOWN if its mailbox
 * is closed; -EBUSY if called from inside a message being served; -ENOMEM
 * if the thread could not be adopted; -EDEADLK on the main JavaScript
 * thread of a WebAssembly program, which must not wait, with nothing
 * pending and @deadline not past (keel_serve(0) only looks).
 */
KEEL_API int keel_serve(keel_time_t deadline);

/**
 * keel_mailbox_fd() - a file descriptor that is readable while messages
 * are pending for the calling task, or once it is cancelled.
 *
 * For a task with its own event loop (epoll, poll, libuv, GLib): watch the
 * fd for readability and call keel_serve(0) when it fires; leave the loop
 * when that returns -ECANCELED (the task is cancelled) or -ESHUTDOWN (its
 * mailbox is closed). The fd becomes readable when the task is cancelled,
 * whether or not messages arrive, and stays readable (level-triggered)
 * while it is, so the loop cannot miss it; a loop that goes on instead
 * spins. After keel_serve(0) returns, the fd is readable only for messages
 * pending, cancellation or close: no stale readiness. A wake-up can still
 * find nothing to run while a sender is mid-send; keel_serve(0) then
 * returns -ETIMEDOUT, which the loop ignores. keel/uv.h and keel/glib.h
 * do all this for libuv and GLib. The fd belongs to keel: do not read,
 * write or close it. It is closed when the task ends, so take it out of
 * your poll set before then. Repeated calls return the same fd.
 *
 * Context: the calling task (adopted if needed); never blocks.
 * Return: the fd (an eventfd on Linux, the read end of a pipe elsewhere);
 * -ESHUTDOWN if the mailbox is closed; -EBUSY if it is served from the
 * JavaScript event loop (keel_mailbox_serve_from_loop()); -ENOMEM or
 * another negative errno value if the fd could not be created.
 */
KEEL_API int keel_mailbox_fd(void);

/**
 * keel_mailbox_serve_from_loop() - have the calling task's mailbox served
 * from its thread's JavaScript event loop (WebAssembly threads).
 *
 * For a thread that returns to its event loop rather than calling
 * keel_serve() (a Worker after emscripten_exit_with_live_runtime()): from
 * this call on, a send to the task schedules keel_serve(0) on that loop,
 * where it runs once the thread is back there, with at most one serve
 * scheduled at a time and none while the task is serving, as
 * keel_mailbox_fd() notifies a native loop. Messages run only there (or in
 * a keel_serve() the task makes itself). A cancelled task is not served
 * from its loop any more (keel_serve() refuses): end such a task, or any,
 * by closing its mailbox, from a message (which cancels the rest) or from
 * its thread. Calling it again does nothing.
 *
 * Context: the calling task (adopted if needed); never blocks.
 * Return: 0; -ENOTSUP where threads have no JavaScript event loop (every
 * platform but Emscripten); -EBUSY if the task uses keel_mailbox_fd();
 * -ESHUTDOWN if its mailbox is closed; -ENOMEM if the thread could not be
 * adopted.
 */
KEEL_API int keel_mailbox_serve_from_loop(void);

/**
 * keel_mailbox_close() - stop accepting messages and cancel what is queued.
 *
 * After it returns, every send to the calling task is refused with
 * -ESHUTDOWN, and every message it had accepted has had its outcome: the
 * queued ones had their cancel handlers run, in order, on this task before
 * this call returned. Replies this task was still owed by keel_call_then()
 * get their cancel handler too (waiting for work already running on its
 * target to return). Work that has already started on this task is not
 * ended: a message being run goes on, and a _ctx call in flight can still
 * be finished (one still unfinished when the task ends is cancelled). A
 * task's mailbox is closed this way when it ends, before anything else of
 * the task is torn down. The fd of keel_mailbox_fd(), if any, stays open
 * until the task ends.
 *
 * Context: the calling task; may wait for senders that are mid-send and for
 * keel_call_then() work running elsewhere; not a cancellation point. May be
 * called from inside a message: the rest of the queue is cancelled.
 * Return: 0; -ESHUTDOWN if it was already closed; -ENOMEM if the thread
 * could not be adopted.
 */
KEEL_API int keel_mailbox_close(void);

/**
 * keel_call() - run @work on @target and wait for it.
 * @target:   the task to run it.
 * @work:     run on @target at one of its serve points; must not be NULL.
 * @arg:      passed to @work; may point into the caller's stack.
 * @deadline: absolute time after which the caller stops waiting for @work
 *            to start.
 *
 * After keel_call() returns, @work has either finished or will never run,
 * so @arg may live on the caller's stack. Once @work has started, the call
 * waits for it to finish regardless of the deadline or cancellation.
 *
 * If @target's mailbox is bounded and full, the call first waits for
 * room, within the same @deadline, as keel_post_until() does.
 *
 * Context: the calling task (adopted if needed); blocks; a cancellation
 * point (until @work starts). The calling task does not serve its own
 * mailbox while it waits.
 * Return: 0 when @work ran; -EINVAL if @work is NULL; -EDEADLK if @target is
 * the calling task, or on the main JavaScript thread of a WebAssembly
 * program, which must not wait (nothing is sent; use keel_call_then()); -ESRCH if @target is not a live task; -ESHUTDOWN if its
 * mailbox closed before @work ran; -ETIMEDOUT if the deadline passed, or
 * -ECANCELED if the caller was cancelled, before @work started (including
 * while waiting for room in a full mailbox); -ENOMEM.
 */
KEEL_API int keel_call(keel_task_t target, keel_work_fn work, void *arg,
		       keel_time_t deadline);

/**
 * keel_call_then() - run @work on @target, then @done on the calling task.
 * @target: the task to run @work.
 * @work:   run on @target at one of its serve points; must not be NULL.
 * @done:   run on the calling task, through its mailbox, after @work
 *          returned; may be NULL.
 * @cancel: run on the calling task instead of @done if @target ends before
 *          @work ran, or if the calling task ends (closes its mailbox)
 *          before @done was delivered; may be NULL.
 * @arg:    passed to all three.
 *
 * If the call returns 0, exactly one of @done or @cancel runs, on the
 * calling task, never both. @work runs at most once, and never after
 * @cancel has started. The calling task must serve its mailbox to receive
 * @done.
 *
 * Context: the calling task (adopted if needed); never blocks.
 * Return: 0 if accepted; -EINVAL if @work is NULL; -ESRCH if @target is
 * not a live task; -ESHUTDOWN if @target's mailbox or the caller's own
 * mailbox is closed; -EAGAIN if @target's mailbox is bounded and full
 * (the reply, when it comes, is never refused); -ENOMEM.
 */
KEEL_API int keel_call_then(keel_task_t target, keel_work_fn work,
			    keel_work_fn done, keel_work_fn cancel, void *arg);

/**
 * keel_call_ctx() - keel_call() for work that finishes later.
 * @target:   the task to run @work.
 * @work:     run on @target with a ctx; the call completes when
 *            keel_ctx_finish(ctx) is called, from any thread, during or
 *            after @work.
 * @arg:      passed to @work; may point into the caller's stack.
 * @deadline: absolute time after which the caller stops waiting for @work
 *            to start.
 *
 * Once @work has started, the call waits until the ctx is finished, or is
 * cancelled because @target ended, regardless of the deadline.
 *
 * Context: as keel_call().
 * Return: 0 when the ctx was finished; -ESHUTDOWN if @target ended before
 * @work ran or before the ctx was finished; otherwise as keel_call().
 */
KEEL_API int keel_call_ctx(keel_task_t target, keel_ctx_work_fn work,
			   void *arg, keel_time_t deadline);

/**
 * keel_call_then_ctx() - keel_call_then() for work that finishes later.
 * @target: the task to run @work.
 * @work:   run on @target with a ctx; @done is delivered after
 *          keel_ctx_finish(ctx).
 * @done:   as for keel_call_then(); may be NULL.
 * @cancel: as for keel_call_then(), and also run if @target ends with the
 *          ctx unfinished; may be NULL.
 * @arg:    passed to all three.
 *
 * A calling task that ends while the ctx is unfinished waits in its
 * mailbox close until the ctx is finished or @target ends, since @arg must
 * stay valid while work is in flight.
 *
 * Context: as keel_call_then().
 * Return: as keel_call_then().
 */
KEEL_API int keel_call_then_ctx(keel_task_t target, keel_ctx_work_fn work,
				keel_work_fn done, keel_work_fn cancel,
				void *arg);

/**
 * keel_ctx_finish() - complete the work of a _ctx call.
 * @ctx: the ctx handed to the work callback.
 *
 * Context: any thread; never blocks; may be called inside the work
 * callback or after it returned.
 * Return: 0; -EINVAL if @ctx is NULL or was never a ctx; -ESTALE if the
 * ctx's call is already over: it was finished before, or cancelled because
 * its target ended.
 */
KEEL_API int keel_ctx_finish(keel_ctx_t *ctx);

#ifdef __cplusplus
}
#endif

#endif /* KEEL_MAILBOX_H */
