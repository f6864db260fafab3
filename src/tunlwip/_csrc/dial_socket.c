/*
 * The socket of a C dial (dial.c): protected as the gateway's sockets are, tuned, and connecting.
 *
 * Theory of operation
 * -------------------
 * Every socket a C dial opens, to a destination or to a SOCKS5 proxy (socks5_dial.c), comes
 * from tl_dial_connector: a non-blocking TCP socket, protected first (SO_MARK or
 * SO_BINDTODEVICE, as Python's protector would; an unprotected socket would loop back into the
 * TUN), with TCP_NODELAY and the configured keepalive, its connect started, and its local
 * address read (dial.c's own table recognises the socket's packets if they come back). The
 * settings come with tl_dial_configure (tl_dial_socket_configure) and apply to sockets made
 * after. The packet fuzzer swaps tl_dial_connector for socketpairs: it never connects anywhere.
 *
 * Invariants: single-threaded; a socket is returned connecting or closed here, never leaked.
 */
#include <errno.h>
#include <string.h>
#include <unistd.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include "tl_internal.h"

/* Linux's TCP socket options (<netinet/tcp.h> would clash with lwIP's TCP_MSS). */
enum { TL_TCP_NODELAY = 1, TL_TCP_KEEPIDLE = 4, TL_TCP_KEEPINTVL = 5, TL_TCP_KEEPCNT = 6 };

static int tl_protect_kind;
static uint32_t tl_protect_mark, tl_keep[3];
static char tl_protect_ifname[16];

int tl_dial_socket_configure(int protect, uint32_t mark, const char *ifname, uint32_t keep_idle,
                             uint32_t keep_intvl, uint32_t keep_cnt)
{
    if (protect < TL_PROTECT_NONE || protect > TL_PROTECT_INTERFACE) return -EINVAL;
    if (ifname != NULL && strlen(ifname) >= sizeof tl_protect_ifname) return -EINVAL;
    tl_protect_kind = protect;
    tl_protect_mark = mark;
    memset(tl_protect_ifname, 0, sizeof tl_protect_ifname);
    if (ifname != NULL) strcpy(tl_protect_ifname, ifname);
    tl_keep[0] = keep_idle;
    tl_keep[1] = keep_intvl;
    tl_keep[2] = keep_cnt;
    return 0;
}

static int tl_dial_protect(int fd)
{
    if (tl_protect_kind == TL_PROTECT_MARK)
        return setsockopt(fd, SOL_SOCKET, SO_MARK, &tl_protect_mark, sizeof tl_protect_mark);
    if (tl_protect_kind == TL_PROTECT_INTERFACE)
        return setsockopt(fd, SOL_SOCKET, SO_BINDTODEVICE, tl_protect_ifname,
                          (socklen_t)strlen(tl_protect_ifname));
    return 0;
}

static int tl_sockaddr(const tl_endpoint *e, struct sockaddr_storage *ss, socklen_t *len)
{
    memset(ss, 0, sizeof *ss);
    if (e->family == 4) {
        struct sockaddr_in *s4 = (struct sockaddr_in *)ss;
        s4->sin_family = AF_INET;
        s4->sin_port = htons(e->port);
        memcpy(&s4->sin_addr, e->addr, 4);
        *len = sizeof *s4;
        return AF_INET;
    }
    struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)ss;
    s6->sin6_family = AF_INET6;
    s6->sin6_port = htons(e->port);
    memcpy(&s6->sin6_addr, e->addr, 16);
    *len = sizeof *s6;
    return AF_INET6;
}

static void tl_endpoint_of(tl_endpoint *e, const struct sockaddr_storage *ss)
{
    memset(e, 0, sizeof *e);
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *s4 = (const struct sockaddr_in *)ss;
        e->family = 4;
        memcpy(e->addr, &s4->sin_addr, 4);
        e->port = ntohs(s4->sin_port);
    } else {
        const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)ss;
        e->family = 6;
        memcpy(e->addr, &s6->sin6_addr, 16);
        e->port = ntohs(s6->sin6_port);
    }
}

/* A connecting socket to dst, protected and tuned; -errno (protection: -TL_DIAL_PROTECT_FAILED
 * - errno) on failure. */
static int tl_dial_socket(const tl_endpoint *dst, tl_endpoint *local)
{
    struct sockaddr_storage ss;
    socklen_t sslen;
    int family = tl_sockaddr(dst, &ss, &sslen);
    int fd = socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return -errno;
    if (tl_dial_protect(fd) != 0) {
        int err = errno;
        close(fd);
        return -(TL_DIAL_PROTECT_FAILED + err);
    }
    int one = 1;
    int err = 0;
    if (setsockopt(fd, IPPROTO_TCP, TL_TCP_NODELAY, &one, sizeof one) != 0) err = errno;
    if (!err && tl_keep[0] > 0 &&
        (setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one) != 0 ||
         setsockopt(fd, IPPROTO_TCP, TL_TCP_KEEPIDLE, &tl_keep[0], sizeof tl_keep[0]) != 0 ||
         setsockopt(fd, IPPROTO_TCP, TL_TCP_KEEPINTVL, &tl_keep[1], sizeof tl_keep[1]) != 0 ||
         setsockopt(fd, IPPROTO_TCP, TL_TCP_KEEPCNT, &tl_keep[2], sizeof tl_keep[2]) != 0))
        err = errno;
    if (!err && connect(fd, (struct sockaddr *)&ss, sslen) != 0 && errno != EINPROGRESS) err = errno;
    struct sockaddr_storage mine;
    socklen_t minelen = sizeof mine;
    if (!err && getsockname(fd, (struct sockaddr *)&mine, &minelen) != 0) err = errno;
    if (err) {
        close(fd);
        return -err;
    }
    tl_endpoint_of(local, &mine);
    return fd;
}

int (*tl_dial_connector)(const tl_endpoint *dst, tl_endpoint *local) = tl_dial_socket;
