/* Misuse: the guarded counter is written without its lock, and a
 * function that requires the lock is called without it. clang
 * -Wthread-safety must reject this through keel's annotations. */
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
