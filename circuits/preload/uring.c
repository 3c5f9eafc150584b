/*
 * uring.c - keep preloaded programs off io_uring.
 *
 * libuv 1.45 and later (uvloop, Node.js) batch their epoll_ctl calls
 * through an io_uring (IORING_OP_EPOLL_CTL) and may read and write through
 * one: the kernel then acts on the program's descriptors without passing
 * through any function of ours, watching a circuit's doorbell as if it were
 * the socket.  libuv sets its rings up with syscall(__NR_io_uring_setup, ...)
 * (there is no libc wrapper), and goes back to plain epoll_ctl, read and
 * write when that fails with ENOSYS, as on a kernel without io_uring.
 * liburing users call io_uring_setup(), which we refuse the same way.
 *
 * libuv also closes descriptors with syscall(SYS_close, fd) (a close that
 * cannot be cancelled): routed to our close(), or a circuit closed that way
 * would stay in the table, its circuit never ended and its number, once
 * reused, taken for a circuit socket.
 *
 * Programs that run without CIRCUITS_CONTROL are left alone.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdarg.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "preload.h"

#ifndef __NR_io_uring_setup
#define __NR_io_uring_setup 425 /* the same number on every architecture */
#endif

static long refuse(void)
{
    cp_log("io_uring refused (circuits are out of its reach): the program falls back");
    errno = ENOSYS;
    return -1;
}

/*
 * syscall(2) takes at most six arguments, each passed as a long in a
 * register: forwarding six longs is exact whatever the call's real count.
 */
CP_EXPORT long syscall(long nr, ...)
{
    cp_init();
    if (nr == __NR_io_uring_setup && cp_active())
        return refuse();
    va_list ap;
    va_start(ap, nr);
    long a[6];
    for (int i = 0; i < 6; i++)
        a[i] = va_arg(ap, long);
    va_end(ap);
    if (nr == SYS_close && cp_active())
        return close((int)a[0]);
    return real.syscall(nr, a[0], a[1], a[2], a[3], a[4], a[5]);
}

/* liburing's name for the same call (defined there, not in libc). */
CP_EXPORT int io_uring_setup(unsigned entries, void *params)
{
    cp_init();
    if (cp_active())
        return (int)refuse();
    int (*next)(unsigned, void *) = (int (*)(unsigned, void *))dlsym(RTLD_NEXT, "io_uring_setup");
    if (next)
        return next(entries, params);
    return (int)real.syscall(__NR_io_uring_setup, (long)entries, (long)params, 0L, 0L, 0L, 0L);
}
