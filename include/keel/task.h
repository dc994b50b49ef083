/*
 * keel/task.h: tasks and their handles.
 *
 * A task is a logical thread: one OS thread for its whole run. Every task
 * has a mailbox (keel/mailbox.h), a cancellation state, a name and an exit
 * status. A thread that keel did not start (main, another library's thread)
 * becomes a task the first time it calls a keel function that needs one;
 * its thread exit ends that task properly.
 */
#ifndef KEEL_TASK_H
#define KEEL_TASK_H

#include "common.h"

#ifdef __cplusplus
extern "C" {
#endif

/**
 * typedef keel_task_t - a value handle naming one task.
 *
 * A slot index and a generation in 64 bits. Slots are never freed and are
 * reused only with a new generation, so a handle to a task that has ended
 * gives -ESRCH from every call that takes it, and never reaches a later
 * task that happens to reuse the slot. Handles may be copied freely and
 * compared with ==. KEEL_TASK_NONE (0) is never a valid handle.
 */
typedef uint64_t keel_task_t;

#define KEEL_TASK_NONE ((keel_task_t)0)

/* Longest task name kept, not counting the terminating NUL. */
#define KEEL_TASK_NAME_MAX 31

/**
 * keel_self() - the calling task.
 *
 * A thread that keel did not start is adopted on its first call: it gets a
 * slot, a mailbox and the name "main" (the process's first thread) or
 * "thread-N". Its task ends when the thread exits (the mailbox closes and
 * cancels what is still queued, before other thread-exit teardown of keel).
 *
 * Context: any thread; never blocks.
 * Return: the caller's handle, or KEEL_TASK_NONE if a thread could not be
 * adopted because memory or the task table ran out.
 */
KEEL_API keel_task_t keel_self(void);

/**
 * keel_task_name() - copy the name of a task.
 * @t:    any task handle.
 * @buf:  where to write the NUL-terminated name.
 * @size: size of @buf in bytes; the name is truncated to fit.
 *
 * Context: any thread; never blocks.
 * Return: the length of the full name; -ESRCH if @t is not a live task;
 * -EINVAL if @buf is NULL or @size is 0.
 */
KEEL_API int keel_task_name(keel_task_t t, char *buf, size_t size);

/**
 * keel_set_name() - rename the calling task.
 * @name: the new name; longer names are truncated to KEEL_TASK_NAME_MAX
 *        bytes. On Linux the thread's kernel name is set too (15 bytes).
 *
 * Context: the calling task; never blocks.
 * Return: 0; -EINVAL if @name is NULL; -ENOMEM if the thread could not be
 * adopted.
 */
KEEL_API int keel_set_name(const char *name);

/**
 * struct keel_stats - what keel's runtime holds, for a long-running
 * program's monitoring and for tests of its bounds.
 * @tasks_live:  task slots in use: tasks running, or ended and not yet
 *               reaped (joinable children awaiting keel_join(), say).
 * @task_slots:  task slots ever created: the high-water mark of
 *               @tasks_live. Slots are never freed, only reused.
 * @tasks_peak:  the high-water mark of @tasks_live since the process
 *               started or keel_stats_reset_peak() was last called.
 * @scopes_live: scopes open (or closing).
 * @scope_slots: scope slots ever created.
 */
typedef struct keel_stats {
	size_t tasks_live;
	size_t task_slots;
	size_t tasks_peak;
	size_t scopes_live;
	size_t scope_slots;
} keel_stats;

/**
 * keel_stats_get() - read the runtime's counters.
 * @out: where they are written.
 *
 * Each counter is read on its own: they are consistent with each other
 * only in a quiet process.
 *
 * Context: any thread; never blocks (takes keel's table locks briefly).
 * Return: 0; -EINVAL if @out is NULL.
 */
KEEL_API int keel_stats_get(keel_stats *out);

/**
 * keel_stats_reset_peak() - start a new period for keel_stats.tasks_peak.
 *
 * The peak becomes the number of tasks live now: a server can read and
 * reset it each minute to see its busiest moment.
 *
 * Context: any thread; never blocks (takes keel's table lock briefly).
 */
KEEL_API void keel_stats_reset_peak(void);

#ifdef __cplusplus
}
#endif

#endif /* KEEL_TASK_H */
