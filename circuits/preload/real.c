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
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

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
    RESOLVE(epoll_pwait2); /* glibc 2.35 and later */
    if (!real.fcntl64) /* an older libc: fcntl is the 64-bit one */
        real.fcntl64 = real.fcntl;
}

/*
 * Where the library's own descriptors go: the upper half of the descriptor
 * limit.  A circuit costs the process three or four descriptors of ours
 * (doorbells, memory) besides the one the program sees; left at the lowest
 * free numbers they would crowd the program's range, and programs that size
 * tables by their own count of connections (wrk: 3 per connection) find
 * numbers beyond their tables and give up.  0: a limit too small to split.
 */
static int hide_base;

static void hide_init(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur >= 512)
        hide_base = (int)((rl.rlim_cur > (1 << 20) ? (1 << 20) : rl.rlim_cur) / 2);
}

int cp_hide_fd(int fd)
{
    if (fd < 0 || !hide_base || fd >= hide_base)
        return fd;
    int hi = real.fcntl(fd, F_DUPFD_CLOEXEC, hide_base);
    if (hi < 0)
        return fd; /* the upper half is full: the low number works as well */
    real.close(fd);
    return hi;
}

static void init_once(void)
{
    resolve_all();
    hide_init();
    cp_log_init(getenv("CIRCUITS_LOG"));
    /* A copy: nginx writes its process title over the environment's strings.
     * Not malloc's: this may run inside an allocator's own start (jemalloc's
     * calls syscall()), which holds its lock.  A path too long for the copy
     * is too long for a Unix socket address anyway (cp_ctl_open refuses it). */
    static char copy[256];
    const char *path = getenv("CIRCUITS_CONTROL");
    if (path && strlen(path) < sizeof(copy))
        path = strcpy(copy, path);
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
