// The public header compiles as C++ and its declarations link from C++.
#include <keel.h>

int main()
{
	keel_task_t self = keel_self();
	return self == KEEL_TASK_NONE ? 1 : 0;
}
