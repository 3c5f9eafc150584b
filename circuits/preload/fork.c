/*
 * fork.c - fork, exec and exit: which processes hold a circuit.
 *
 * After fork, parent and child hold the same circuit endpoint (the same
 * memory, the same doorbell file), as they would share a kernel socket.  A
 * process that closes its copy must not end the circuit while another still
 * holds it, and the last one to let go must end it (the peer then reads end
 * of data, not a reset).  So each circuit socket carries a count of the
 * processes that hold it, in a page of shared anonymous memory that fork
 * hands down:
 *
 *   fork      (the wrapper) counts the child in for every circuit, before
 *             the child exists; an inherited listener needs nothing: its one
 *             outstanding ACCEPT is answered to whichever process reads the
 *             reply, which then sends the next
 *   exec      circuits whose descriptor is close-on-exec leave with the old
 *             program image: counted out before execve, back in if it fails
 *   exit      the library's destructor counts the process out of every
 *             circuit it still holds, and ends those it held last, as the
 *             kernel closes sockets at exit
 *   close     the last descriptor in the last process ends the circuit;
 *             otherwise this process only detaches (circuit_detach)
 *
 * Not covered: processes that die by _exit or a signal while holding a
 * circuit another process shares (the survivor's last close only detaches:
 * its peer sees a vanished side, ECONNRESET); circuit descriptors kept open
 * across exec (the new image does not know them); the execl* family.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdarg.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "preload.h"

static uint32_t fork_gen = 1; /* bumped in each child: entries shared by dups count once */

int *cp_procs_new(void)
{
    int *p = mmap(NULL, sizeof(int), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return NULL; /* then the first close ends the circuit, as before any fork */
    *p = 1;
    return p;
}

bool cp_procs_leave(struct cp_sock *s)
{
    int *p = __atomic_exchange_n(&s->procs, NULL, __ATOMIC_ACQ_REL);
    if (!p)
        return true;
    bool last = __atomic_sub_fetch(p, 1, __ATOMIC_ACQ_REL) <= 0;
    munmap(p, sizeof(int));
    return last;
}

static void count(struct cp_sock *s, int delta)
{
    if (s->procs)
        __atomic_add_fetch(s->procs, delta, __ATOMIC_ACQ_REL);
}

/* ---- fork ------------------------------------------------------------- */

static pid_t owner; /* this image's pid: a vfork or posix_spawn child has another */

static void count_in(int fd, struct cp_sock *s, void *arg)
{
    (void)fd;
    if (s->fork_seen == fork_gen)
        return;
    s->fork_seen = fork_gen;
    count(s, *(int *)arg);
}

/* Count every circuit this process holds in (+1) or out (-1), once per socket. */
static void count_all(int delta)
{
    fork_gen++;
    cp_fd_each(count_in, &delta);
}

static __thread bool forking;  /* inside our fork wrapper: before_fork counts */
static __thread bool counted;  /* and it did */

/*
 * The child is counted in before it exists: counting in the child, after
 * fork, would race with a parent that closes its copy at once (a server
 * handing each connection to a child) and end the circuit under the child.
 * before_fork counts, once the connects in flight have settled: a socket
 * another thread connected while we waited is the child's too.
 */
CP_EXPORT pid_t fork(void)
{
    static pid_t (*next)(void);
    cp_init();
    if (!next)
        next = (__typeof__(next))dlsym(RTLD_NEXT, "fork");
    forking = true, counted = false;
    pid_t pid = next();
    int err = errno;
    forking = false;
    if (pid < 0 && counted)
        count_all(-1);
    else if (pid == 0)
        owner = getpid();
    errno = err;
    return pid;
}

/*
 * pthread_atfork, so that fork()s inside libc are covered too.  Before: the
 * connects in flight settle first (settling moves epoll registrations, under
 * epoll's locks), then the child is counted in (our wrapper's forks), then
 * epoll's locks are taken.  After: given back; the child's table locks are new.
 */
static void before_fork(void)
{
    cp_connect_settle_all();
    if (forking) {
        count_all(+1);
        counted = true;
    }
    cp_epoll_before_fork();
}

static void after_fork_child(void)
{
    cp_fd_after_fork();
    cp_epoll_after_fork();
}

__attribute__((constructor)) static void fork_init(void)
{
    owner = getpid();
    pthread_atfork(before_fork, cp_epoll_after_fork, after_fork_child);
}

/* ---- exec ------------------------------------------------------------- */

struct exec_walk {
    uint32_t gen;
    int delta;
};

static void leave_on_exec(int fd, struct cp_sock *s, void *arg)
{
    struct exec_walk *w = arg;
    if (s->fork_seen == w->gen || !(real.fcntl(fd, F_GETFD) & FD_CLOEXEC))
        return;
    s->fork_seen = w->gen;
    count(s, w->delta);
}

/* Count this image out of (delta -1), or back into (+1), its close-on-exec
 * circuits.  Not in a vfork or posix_spawn child: it was never counted in. */
static void exec_count(int delta)
{
    if (getpid() != owner)
        return;
    struct exec_walk w = {.gen = ++fork_gen, .delta = delta};
    cp_fd_each(leave_on_exec, &w);
}

#define AROUND_EXEC(call)        \
    do {                         \
        cp_init();               \
        exec_count(-1);          \
        int rc_ = (call);        \
        int err_ = errno;        \
        exec_count(+1);          \
        errno = err_;            \
        return rc_;              \
    } while (0)

CP_EXPORT int execve(const char *path, char *const argv[], char *const envp[])
{
    static int (*next)(const char *, char *const[], char *const[]);
    if (!next)
        next = (__typeof__(next))dlsym(RTLD_NEXT, "execve");
    AROUND_EXEC(next(path, argv, envp));
}

CP_EXPORT int execv(const char *path, char *const argv[])
{
    static int (*next)(const char *, char *const[]);
    if (!next)
        next = (__typeof__(next))dlsym(RTLD_NEXT, "execv");
    AROUND_EXEC(next(path, argv));
}

CP_EXPORT int execvp(const char *file, char *const argv[])
{
    static int (*next)(const char *, char *const[]);
    if (!next)
        next = (__typeof__(next))dlsym(RTLD_NEXT, "execvp");
    AROUND_EXEC(next(file, argv));
}

CP_EXPORT int execvpe(const char *file, char *const argv[], char *const envp[])
{
    static int (*next)(const char *, char *const[], char *const[]);
    if (!next)
        next = (__typeof__(next))dlsym(RTLD_NEXT, "execvpe");
    AROUND_EXEC(next(file, argv, envp));
}

/*
 * The execl family: glibc's own execl, execlp and execle call execve inside
 * libc, past our wrappers, so they are ours too: gather the arguments into
 * an argv (on the stack, as glibc does) and go through the v forms above.
 */
#define EXECL_MAX_ARGS 4096

/* Count the arguments after arg0, up to the NULL; -1 if there are too many. */
static int count_args(va_list ap)
{
    int n = 1;
    while (va_arg(ap, char *))
        if (++n >= EXECL_MAX_ARGS)
            return -1;
    return n;
}

/* argv[0..n-1] from arg0 and ap, then NULL; with envp, execle's, which follows the NULL. */
static char *const *fill_args(char **argv, int n, const char *arg0, va_list ap, bool envp)
{
    argv[0] = (char *)arg0;
    for (int i = 1; i <= n; i++)
        argv[i] = va_arg(ap, char *); /* argv[n] is the NULL itself */
    return envp ? va_arg(ap, char *const *) : NULL;
}

#define EXECL_BODY(call, with_envp)                   \
    va_list ap;                                       \
    va_start(ap, arg0);                               \
    int n = count_args(ap);                           \
    va_end(ap);                                       \
    if (n < 0) {                                      \
        errno = E2BIG;                                \
        return -1;                                    \
    }                                                 \
    char *argv[n + 1];                                \
    va_start(ap, arg0);                               \
    char *const *envp = fill_args(argv, n, arg0, ap, with_envp); \
    va_end(ap);                                       \
    (void)envp;                                       \
    return call

CP_EXPORT int execl(const char *path, const char *arg0, ...)
{
    EXECL_BODY(execv(path, argv), false);
}

CP_EXPORT int execlp(const char *file, const char *arg0, ...)
{
    EXECL_BODY(execvp(file, argv), false);
}

CP_EXPORT int execle(const char *path, const char *arg0, ...)
{
    EXECL_BODY(execve(path, argv, envp), true);
}

/* ---- exit ------------------------------------------------------------- */

static void leave_at_exit(int fd, struct cp_sock *s, void *arg)
{
    (void)fd, (void)arg;
    bool server = __atomic_load_n(&s->state, __ATOMIC_ACQUIRE) == CP_LISTENING && s->dgram;
    if ((!s->c && !server) || s->fork_seen == fork_gen || getpid() != owner)
        return;
    s->fork_seen = fork_gen;
    if (server)
        cp_procs_leave(s); /* a UDP server: the process that stays ends its peers */
    else if (cp_procs_leave(s))
        circuit_close(s->c); /* the last holder: the peer reads end of data */
}

__attribute__((destructor)) static void at_exit(void)
{
    if (!cp_active())
        return;
    fork_gen++;
    cp_fd_each(leave_at_exit, NULL);
}
