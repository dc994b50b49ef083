/* Misuse: the guarded counter is written without its lock, a function
 * that requires the lock is called without it, and data guarded by an
 * rwlock is written under its read lock. clang -Wthread-safety must
 * reject this through keel's annotations. */
#include <keel.h>

static keel_mutex_t lock = KEEL_MUTEX_INIT(3, "counter");
static long counter KEEL_GUARDED_BY(lock);

static void add_locked(long n) KEEL_REQUIRES(lock)
{
	counter += n;
}

void bump_unlocked(void);
void bump_unlocked(void)
{
	counter++;
	add_locked(1);
}

static keel_rwlock_t rw = KEEL_RWLOCK_INIT(4, "table");
static long table KEEL_GUARDED_BY(rw);

void write_under_read(void);
void write_under_read(void)
{
	keel_rwlock_rdlock(&rw);
	table = 1;
	keel_rwlock_unlock(&rw);
}
