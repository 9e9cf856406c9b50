/*
 * Datagram I/O shared by both shims (shim.c: Mbed TLS, wolf_shim.c: wolfSSL): the socket, the
 * peer address, the one fed datagram of a server session, simulated loss and the counters.
 * Each shim wraps these in its library's I/O callbacks and result codes. Included by each
 * shim once (static functions, no symbols of its own).
 */
#ifndef CIDLB_DGRAM_H
#define CIDLB_DGRAM_H

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <netinet/in.h>
#include <arpa/inet.h>

#define CIDLB_MAX_DGRAM 65536
/* dgram_send / dgram_recv: nothing can be done now (the shim returns its WANT code). */
#define CIDLB_DGRAM_WANT (-1)

typedef struct cidlb_dgram {
    int fd;
    int recv_from_fd; /* client: read the (connected) socket; server: only fed datagrams */
    struct sockaddr_storage peer;
    socklen_t peer_len; /* 0: send() on a connected socket */
    unsigned char *in;  /* one queued datagram (server) */
    size_t in_len;
    int in_full;
    unsigned drop_permille; /* test aid: drop this share of received datagrams */
    uint64_t tx_dgrams, rx_dgrams, tx_errors, sim_drops;
    int (*random)(unsigned char *buf, size_t len); /* the library's RNG, 0 on success */
} cidlb_dgram;

static void dgram_init(cidlb_dgram *d, int fd, int recv_from_fd,
                       int (*random)(unsigned char *, size_t))
{
    d->fd = fd;
    d->recv_from_fd = recv_from_fd;
    d->random = random;
}

static void dgram_free(cidlb_dgram *d)
{
    free(d->in);
    d->in = NULL;
}

/* Bytes sent (or `len` for a send error taken as loss), or CIDLB_DGRAM_WANT. */
static int dgram_send(cidlb_dgram *d, const void *buf, size_t len)
{
    ssize_t n;
    if (d->peer_len > 0) {
        n = sendto(d->fd, buf, len, 0, (const struct sockaddr *) &d->peer, d->peer_len);
    } else {
        n = send(d->fd, buf, len, 0);
    }
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            return CIDLB_DGRAM_WANT;
        }
        /* Treat as loss (e.g. ECONNREFUSED from an earlier ICMP); DTLS timers recover. */
        d->tx_errors++;
        return (int) len;
    }
    d->tx_dgrams++;
    return (int) n;
}

static int dgram_sim_drop(cidlb_dgram *d)
{
    if (d->drop_permille == 0) {
        return 0;
    }
    unsigned char r[2];
    if (d->random(r, 2) != 0) {
        return 0;
    }
    if (((unsigned) r[0] << 8 | r[1]) % 1000 < d->drop_permille) {
        d->sim_drops++;
        return 1;
    }
    return 0;
}

/* One datagram (the libraries ask for one per call in DTLS), or CIDLB_DGRAM_WANT. */
static int dgram_recv(cidlb_dgram *d, void *buf, size_t len)
{
    if (d->recv_from_fd) {
        for (int i = 0; i < 64; i++) {
            ssize_t n = recv(d->fd, buf, len, MSG_DONTWAIT);
            if (n < 0) {
                /* EAGAIN, or ECONNREFUSED/other transient errors: nothing to read now. */
                return CIDLB_DGRAM_WANT;
            }
            if (dgram_sim_drop(d)) {
                continue;
            }
            d->rx_dgrams++;
            return (int) n;
        }
        return CIDLB_DGRAM_WANT;
    }
    if (!d->in_full) {
        return CIDLB_DGRAM_WANT;
    }
    size_t n = d->in_len < len ? d->in_len : len;
    memcpy(buf, d->in, n);
    d->in_full = 0;
    d->rx_dgrams++;
    return (int) n;
}

/* Queue one received datagram for the next dgram_recv (replaces an unconsumed one). */
static int dgram_feed(cidlb_dgram *d, const unsigned char *data, size_t len)
{
    if (len > CIDLB_MAX_DGRAM) {
        return -1;
    }
    if (d->in == NULL) {
        d->in = malloc(CIDLB_MAX_DGRAM);
        if (d->in == NULL) {
            return -1;
        }
    }
    memcpy(d->in, data, len);
    d->in_len = len;
    d->in_full = 1;
    return 0;
}

static void dgram_set_drop_permille(cidlb_dgram *d, unsigned p)
{
    d->drop_permille = p > 1000 ? 1000 : p;
}

/* family 4 or 6; ip is 4 or 16 bytes; port host order. Replies go here. -1: bad family. */
static int dgram_set_peer(cidlb_dgram *d, int family, const unsigned char *ip, uint16_t port,
                          uint32_t flowinfo, uint32_t scope_id)
{
    memset(&d->peer, 0, sizeof(d->peer));
    if (family == 4) {
        struct sockaddr_in *a = (struct sockaddr_in *) &d->peer;
        a->sin_family = AF_INET;
        a->sin_port = htons(port);
        memcpy(&a->sin_addr, ip, 4);
        d->peer_len = sizeof(*a);
    } else if (family == 6) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *) &d->peer;
        a->sin6_family = AF_INET6;
        a->sin6_port = htons(port);
        a->sin6_flowinfo = htonl(flowinfo);
        memcpy(&a->sin6_addr, ip, 16);
        a->sin6_scope_id = scope_id;
        d->peer_len = sizeof(*a);
    } else {
        return -1;
    }
    return 0;
}

static void dgram_stats(const cidlb_dgram *d, uint64_t out[4])
{
    out[0] = d->tx_dgrams;
    out[1] = d->rx_dgrams;
    out[2] = d->tx_errors;
    out[3] = d->sim_drops;
}

#endif
