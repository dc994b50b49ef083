/*
 * keel: multi-threaded C programs that shut down cleanly and never wedge.
 *
 * This is the one header users include. Each part of the library has its
 * own header under keel/; see docs/ for the guarantees each part gives.
 */
#ifndef KEEL_H
#define KEEL_H

#include "keel/common.h"
#include "keel/task.h"
#include "keel/mailbox.h"
#include "keel/scope.h"
#include "keel/lock.h"
#include "keel/once.h"
#include "keel/io.h"

#endif /* KEEL_H */
