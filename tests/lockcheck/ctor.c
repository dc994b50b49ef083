/* Locks before main: ctor_lib's constructor learned A -> B; main takes
 * B -> A: reported, the order learned before main kept. */
#include "pairs.h"

extern pthread_mutex_t ctor_lock_a, ctor_lock_b;

int main(void)
{
	NEST(&ctor_lock_b, &ctor_lock_a);
	return 0;
}
