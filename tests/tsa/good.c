/* Correct use of keel's locks: clang -Wthread-safety finds nothing. An
 * rwlock is released with keel_rwlock_unlock() whichever way it was
 * taken. */
#include <keel.h>

static keel_mutex_t lock = KEEL_MUTEX_INIT(3, "counter");
static long counter KEEL_GUARDED_BY(lock);

static void add_locked(long n) KEEL_REQUIRES(lock)
{
	counter += n;
}

long bump(void);
long bump(void)
{
	long v;

	keel_mutex_lock(&lock);
	add_locked(1);
	v = counter;
	keel_mutex_unlock(&lock);
	return v;
}

int try_bump(void);
int try_bump(void)
{
	if (keel_mutex_trylock(&lock) != 0)
		return 0;
	counter++;
	keel_mutex_unlock(&lock);
	return 1;
}

static keel_rwlock_t rw = KEEL_RWLOCK_INIT(4, "table");
static long table KEEL_GUARDED_BY(rw);

long read_table(void);
long read_table(void)
{
	long v;

	keel_rwlock_rdlock(&rw);
	v = table;
	keel_rwlock_unlock(&rw);
	return v;
}

void write_table(long v);
void write_table(long v)
{
	keel_rwlock_wrlock(&rw);
	table = v;
	keel_rwlock_unlock(&rw);
}
