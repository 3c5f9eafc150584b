/*
 * real.c - the libc functions the library wraps, and the environment.
 *
 * Each wrapper passes what is not a circuit socket to the next definition
 * of the same name (dlsym(RTLD_NEXT)): libc, or another preload library
 * loaded after us.  Resolution runs once, at load (a constructor) or at the
 * first wrapped call, whichever comes first: another library's constructor
 * may call socket() before ours has run.
 *
 * Without CIRCUITS_CONTROL the library does nothing at all: socket() never
 * makes a circuit socket, so every other call finds no entry and passes
 * through.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>

#include "preload.h"

struct cp_real real;

static pthread_once_t once = PTHREAD_ONCE_INIT;
static const char *control_path;

#define RESOLVE(name) (real.name = (__typeof__(real.name))dlsym(RTLD_NEXT, #name))

static void resolve_all(void)
{
    RESOLVE(socket), RESOLVE(bind), RESOLVE(listen), RESOLVE(accept), RESOLVE(accept4);
    RESOLVE(connect), RESOLVE(shutdown), RESOLVE(close), RESOLVE(dup), RESOLVE(dup2);
    RESOLVE(dup3), RESOLVE(fcntl), RESOLVE(fcntl64), RESOLVE(ioctl), RESOLVE(getsockname);
    RESOLVE(getpeername), RESOLVE(getsockopt), RESOLVE(setsockopt), RESOLVE(read);
    RESOLVE(write), RESOLVE(readv), RESOLVE(writev), RESOLVE(recv), RESOLVE(recvfrom);
    RESOLVE(recvmsg), RESOLVE(send), RESOLVE(sendto), RESOLVE(sendmsg), RESOLVE(poll);
    RESOLVE(ppoll), RESOLVE(select), RESOLVE(pselect), RESOLVE(epoll_create);
    RESOLVE(epoll_create1), RESOLVE(epoll_ctl), RESOLVE(epoll_wait), RESOLVE(epoll_pwait);
    RESOLVE(syscall), RESOLVE(sendfile), RESOLVE(recvmmsg), RESOLVE(sendmmsg);
    if (!real.fcntl64) /* an older libc: fcntl is the 64-bit one */
        real.fcntl64 = real.fcntl;
}

static void init_once(void)
{
    resolve_all();
    cp_log_init(getenv("CIRCUITS_LOG"));
    const char *path = getenv("CIRCUITS_CONTROL");
    control_path = path && *path ? path : NULL;
    cp_bypass_init(getenv("CIRCUITS_BYPASS"));
}

void cp_init(void) { pthread_once(&once, init_once); }

__attribute__((constructor)) static void on_load(void) { cp_init(); }

bool cp_active(void)
{
    cp_init();
    return control_path != NULL;
}

const char *cp_control_path(void) { return control_path; }
