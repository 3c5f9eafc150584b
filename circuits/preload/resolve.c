/*
 * resolve.c - getaddrinfo without AI_ADDRCONFIG for programs on circuits.
 *
 * AI_ADDRCONFIG (which getaddrinfo also implies when hints is NULL) makes
 * glibc look a family up only if the kernel shows an address of it other
 * than loopback.  A guest's addresses are its circuits', which the operator
 * knows and its kernel never shows: in a namespaced guest (loopback only)
 * every such lookup would fail at once without asking DNS, for both
 * families.  So for a program on circuits the flag is dropped; the lookups
 * themselves are glibc's, untouched (and reach the guest's DNS relay,
 * circuits/dnsrelay.py).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netdb.h>
#include <stddef.h>

#include "preload.h"

typedef int (*getaddrinfo_fn)(const char *, const char *, const struct addrinfo *,
                              struct addrinfo **);

CP_EXPORT int getaddrinfo(const char *node, const char *service, const struct addrinfo *hints,
                          struct addrinfo **res)
{
    static getaddrinfo_fn next;
    getaddrinfo_fn fn = __atomic_load_n(&next, __ATOMIC_ACQUIRE);
    if (!fn) { /* racing threads find the same function: storing it twice is harmless */
        fn = (getaddrinfo_fn)dlsym(RTLD_NEXT, "getaddrinfo");
        __atomic_store_n(&next, fn, __ATOMIC_RELEASE);
    }
    cp_init();
    if (!cp_active())
        return fn(node, service, hints, res);
    /* NULL hints mean AF_UNSPEC, any type, and AI_V4MAPPED | AI_ADDRCONFIG */
    struct addrinfo h = hints ? *hints : (struct addrinfo){.ai_flags = AI_V4MAPPED | AI_ADDRCONFIG};
    h.ai_flags &= ~AI_ADDRCONFIG;
    return fn(node, service, &h, res);
}
