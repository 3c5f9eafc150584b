/*
 * spin.c - a bounded spin before poll, select and epoll sleep.
 *
 * A poller that sleeps in the kernel must be rung awake: the peer pays a
 * system call for the ring, and waking a halted vCPU costs tens of
 * microseconds.  A program that keeps a circuit busy (iperf3 selects before
 * every read and write) finds it not ready for a few microseconds at a time,
 * far less than a sleep and a wake-up cost.  So before arming and sleeping,
 * look again for a short while, as the ring core's blocking calls do.
 * Bounded (the design's rule: two spinners that never stop starve each
 * other on a small machine), yielding the core past a few microseconds,
 * and never on a single CPU, where the spinner would only delay its peer.
 */
#define _GNU_SOURCE
#include <sched.h>

#include "preload.h"

#define YIELD_AFTER_NS 5000

#if defined(__x86_64__) || defined(__i386__)
#define relax() __builtin_ia32_pause()
#else
#define relax() __asm__ __volatile__("" ::: "memory")
#endif

bool cp_spin(bool (*ready)(void *), void *arg, int64_t deadline)
{
    int64_t budget = circuit_default_spin(); /* the ring core's: 0 on one CPU */
    if (!budget)
        return false;
    int64_t start = cp_now_ns(), stop = start + budget;
    if (deadline >= 0 && deadline < stop)
        stop = deadline;
    for (;;) {
        if (ready(arg))
            return true;
        for (int i = 0; i < 16; i++)
            relax();
        int64_t now = cp_now_ns();
        if (now >= stop)
            return false;
        if (now - start > YIELD_AFTER_NS)
            sched_yield(); /* the peer may be waiting for our core */
    }
}
