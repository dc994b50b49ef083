/*
 * keel/common.h: version, export macro, error codes and time.
 *
 * Every call that can fail returns an int: 0 or a count on success, a
 * negative errno value on failure. Nothing reports through errno, and a call
 * that returns an error never runs the callbacks it was given.
 */
#ifndef KEEL_COMMON_H
#define KEEL_COMMON_H

#include <errno.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define KEEL_VERSION_MAJOR 0
#define KEEL_VERSION_MINOR 1
#define KEEL_VERSION_PATCH 0
#define KEEL_VERSION_HEX \
	((KEEL_VERSION_MAJOR << 16) | (KEEL_VERSION_MINOR << 8) | KEEL_VERSION_PATCH)

#if defined(KEEL_BUILDING) && (defined(__GNUC__) || defined(__clang__))
#define KEEL_API __attribute__((visibility("default")))
#else
#define KEEL_API
#endif

/**
 * typedef keel_time_t - a point in time or a duration, in nanoseconds.
 *
 * Points in time are on CLOCK_MONOTONIC. Blocking calls take an absolute
 * deadline: KEEL_FOREVER waits without limit; 0 or any time already past
 * does not block.
 */
typedef int64_t keel_time_t;

#define KEEL_FOREVER ((keel_time_t)INT64_MAX)
#define KEEL_NSEC(n) ((keel_time_t)(n))
#define KEEL_USEC(n) ((keel_time_t)(n) * 1000)
#define KEEL_MS(n) ((keel_time_t)(n) * 1000000)
#define KEEL_SEC(n) ((keel_time_t)(n) * 1000000000)

/**
 * keel_now() - the current time on CLOCK_MONOTONIC.
 *
 * Context: any thread; never blocks.
 * Return: nanoseconds since an arbitrary fixed point.
 */
KEEL_API keel_time_t keel_now(void);

/**
 * keel_after() - the deadline that lies @d nanoseconds from now.
 * @d: a duration; negative values give a deadline already past.
 *
 * Saturates at KEEL_FOREVER instead of overflowing, so
 * keel_after(KEEL_FOREVER) is KEEL_FOREVER.
 *
 * Context: any thread; never blocks.
 * Return: keel_now() + @d, saturated.
 */
KEEL_API keel_time_t keel_after(keel_time_t d);

/**
 * keel_strerror() - the name and meaning of an error code.
 * @err: a negative errno value returned by keel (a positive value is
 *       accepted too; so is any int, INT_MIN included).
 *
 * Names every errno value, keel's own codes in keel's terms.
 *
 * Context: any thread; never blocks; async-signal-safe.
 * Return: a static string such as "ESHUTDOWN: mailbox closed"; "unknown
 * error" for a value that is no errno value; never NULL.
 */
KEEL_API const char *keel_strerror(int err);

#ifdef __cplusplus
}
#endif

#endif /* KEEL_COMMON_H */
