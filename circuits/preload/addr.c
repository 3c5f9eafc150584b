/*
 * addr.c - socket addresses and protocol endpoints, and CIRCUITS_BYPASS.
 *
 * The control protocol names every address in IPv6 form, an IPv4 address
 * IPv4-mapped (::ffff:a.b.c.d; docs/protocol.md, section 3).  A socket of
 * family AF_INET speaks sockaddr_in, one of AF_INET6 sockaddr_in6 (with
 * IPv4-mapped addresses for IPv4 peers, as a dual-stack kernel socket does).
 *
 * CIRCUITS_BYPASS lists destinations (CIDRs, comma separated) that stay on
 * the kernel's network: a socket connecting or binding there is handed back
 * to the kernel untouched.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "preload.h"

#define MAX_BYPASS 32

static const uint8_t v4_mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};

struct cidr {
    uint8_t addr[16]; /* IPv6 form */
    int bits;         /* prefix length in the IPv6 form */
};
static struct cidr bypass[MAX_BYPASS];
static int n_bypass;

bool cp_endpoint_is_v4(const struct cp_endpoint *ep)
{
    return memcmp(ep->addr, v4_mapped, 12) == 0;
}

int cp_endpoint_from(const struct sockaddr *sa, socklen_t len, int family,
                     struct cp_endpoint *ep)
{
    if (!sa)
        return -EFAULT;
    memset(ep, 0, sizeof(*ep));
    ep->proto = CP_TCP;
    if (family == AF_INET) {
        const struct sockaddr_in *in = (const void *)sa;
        if (len < (socklen_t)sizeof(*in))
            return -EINVAL;
        if (in->sin_family != AF_INET)
            return -EAFNOSUPPORT;
        memcpy(ep->addr, v4_mapped, 12);
        memcpy(ep->addr + 12, &in->sin_addr, 4);
        ep->port = ntohs(in->sin_port);
        return 0;
    }
    const struct sockaddr_in6 *in6 = (const void *)sa;
    if (len < (socklen_t)sizeof(*in6))
        return -EINVAL;
    if (in6->sin6_family != AF_INET6)
        return -EAFNOSUPPORT;
    memcpy(ep->addr, &in6->sin6_addr, 16);
    ep->port = ntohs(in6->sin6_port);
    return 0;
}

void cp_endpoint_to(const struct cp_endpoint *ep, int family, struct sockaddr *sa,
                    socklen_t *len)
{
    union {
        struct sockaddr_in in;
        struct sockaddr_in6 in6;
    } u;
    socklen_t size;
    memset(&u, 0, sizeof(u));
    if (family == AF_INET) {
        u.in.sin_family = AF_INET;
        u.in.sin_port = htons(ep->port);
        if (cp_endpoint_is_v4(ep))
            memcpy(&u.in.sin_addr, ep->addr + 12, 4);
        size = sizeof(u.in);
    } else {
        u.in6.sin6_family = AF_INET6;
        u.in6.sin6_port = htons(ep->port);
        memcpy(&u.in6.sin6_addr, ep->addr, 16);
        size = sizeof(u.in6);
    }
    if (sa && len)
        memcpy(sa, &u, *len < size ? *len : size);
    if (len)
        *len = size;
}

const char *cp_endpoint_str(const struct cp_endpoint *ep, char buf[CP_EP_STR])
{
    char host[INET6_ADDRSTRLEN];
    if (cp_endpoint_is_v4(ep)) {
        inet_ntop(AF_INET, ep->addr + 12, host, sizeof(host));
        snprintf(buf, CP_EP_STR, "%s:%u", host, ep->port);
    } else {
        inet_ntop(AF_INET6, ep->addr, host, sizeof(host));
        snprintf(buf, CP_EP_STR, "[%s]:%u", host, ep->port);
    }
    return buf;
}

/* "a.b.c.d/n" or "x::y/n" (a bare address is one host) into IPv6 form. */
static bool parse_cidr(const char *text, struct cidr *out)
{
    char host[INET6_ADDRSTRLEN + 8];
    const char *slash = strchr(text, '/');
    size_t n = slash ? (size_t)(slash - text) : strlen(text);
    if (n == 0 || n >= sizeof(host))
        return false;
    memcpy(host, text, n);
    host[n] = 0;
    int bits = -1;
    if (slash) {
        char *end;
        long b = strtol(slash + 1, &end, 10);
        if (*end || end == slash + 1 || b < 0 || b > 128)
            return false;
        bits = (int)b;
    }
    struct in_addr v4;
    if (inet_pton(AF_INET, host, &v4) == 1) {
        if (bits > 32)
            return false;
        memcpy(out->addr, v4_mapped, 12);
        memcpy(out->addr + 12, &v4, 4);
        out->bits = 96 + (bits < 0 ? 32 : bits);
        return true;
    }
    if (inet_pton(AF_INET6, host, out->addr) != 1)
        return false;
    out->bits = bits < 0 ? 128 : bits;
    return true;
}

void cp_bypass_init(const char *spec)
{
    if (!spec)
        return;
    char *copy = strdup(spec), *save = NULL;
    for (char *tok = copy ? strtok_r(copy, ", ", &save) : NULL; tok;
         tok = strtok_r(NULL, ", ", &save)) {
        if (n_bypass == MAX_BYPASS) {
            cp_warn("CIRCUITS_BYPASS: more than %d entries, the rest ignored", MAX_BYPASS);
            break;
        }
        if (parse_cidr(tok, &bypass[n_bypass]))
            n_bypass++;
        else
            cp_warn("CIRCUITS_BYPASS: %s is not an address or CIDR, ignored", tok);
    }
    free(copy);
}

static bool in_cidr(const uint8_t addr[16], const struct cidr *c)
{
    int full = c->bits / 8, rest = c->bits % 8;
    if (memcmp(addr, c->addr, (size_t)full) != 0)
        return false;
    if (!rest)
        return true;
    uint8_t mask = (uint8_t)(0xff << (8 - rest));
    return (addr[full] & mask) == (c->addr[full] & mask);
}

bool cp_bypassed(const struct cp_endpoint *ep)
{
    for (int i = 0; i < n_bypass; i++)
        if (in_cidr(ep->addr, &bypass[i]))
            return true;
    return false;
}
