/*
 * Thin C shim between lb-testpeer (Rust) and wolfSSL 5.9.4: the DTLS 1.3 backend.
 *
 * The counterpart of shim.c (Mbed TLS, DTLS 1.2), with the same shape: Rust sees opaque
 * pointers and a handful of small functions; all DTLS 1.3 work (HelloRetryRequest cookies,
 * CID, record protection, ACKs, retransmission) is wolfSSL's. This file supplies the datagram
 * I/O callbacks, the PSK callbacks and the configuration.
 *
 * Threads: wolfSSL is built with pthreads, so a WOLFSSL_CTX may be shared and each WOLFSSL
 * object is used by one thread at a time (the Rust side guarantees it). The one global here,
 * the RNG used for CIDs, message tags and simulated loss, has its own mutex.
 */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <netinet/in.h>

#include "dgram.h"

#include <wolfssl/options.h>
#include <wolfssl/ssl.h>
#include <wolfssl/wolfcrypt/random.h>
#include <wolfssl/wolfcrypt/error-crypt.h>
#include <wolfssl/error-ssl.h>

#if !defined(WOLFSSL_DTLS13) || !defined(WOLFSSL_DTLS_CID) || defined(NO_PSK)
#error "wolfSSL was configured without DTLS 1.3, Connection IDs or PSK"
#endif

/* Results of handshake/read/write besides >= 0 (wolfSSL's own error codes are <= -100). */
#define CIDLB13_WANT_READ (-2)
#define CIDLB13_WANT_WRITE (-3)
#define CIDLB13_CLOSED (-6) /* the peer sent close_notify */

int cidlb13_code(int which)
{
    switch (which) {
        case 0: return CIDLB13_WANT_READ;
        case 1: return CIDLB13_WANT_WRITE;
        case 2: return CIDLB13_CLOSED;
        default: return 0;
    }
}

/* ---------------------------------------------------------------- globals */

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static int g_init_done = 0;
static WC_RNG g_rng;

int cidlb13_global_init(void)
{
    int ret = 0;
    pthread_mutex_lock(&g_lock);
    if (!g_init_done) {
        ret = wolfSSL_Init();
        if (ret == WOLFSSL_SUCCESS) {
            ret = wc_InitRng(&g_rng);
        }
        if (ret == 0) {
            g_init_done = 1;
        }
    }
    pthread_mutex_unlock(&g_lock);
    return ret;
}

int cidlb13_random(unsigned char *buf, size_t len)
{
    pthread_mutex_lock(&g_lock);
    int ret = g_init_done ? wc_RNG_GenerateBlock(&g_rng, buf, (word32) len) : BAD_STATE_E;
    pthread_mutex_unlock(&g_lock);
    return ret;
}

void cidlb13_strerror(int err, char *buf, size_t len)
{
    wolfSSL_ERR_error_string_n((unsigned long) (long) err, buf, (unsigned long) len);
}

const char *cidlb13_version(void)
{
    return wolfSSL_lib_version();
}

/* ---------------------------------------------------------------- config */

typedef struct cidlb13_conf {
    WOLFSSL_CTX *ctx;
    int is_server;
    unsigned char psk[64];
    size_t psk_len;
    char identity[129]; /* NUL-terminated: wolfSSL hands identities over as C strings */
} cidlb13_conf;

typedef struct cidlb13_sess {
    WOLFSSL *ssl;
    cidlb13_conf *conf;
    cidlb_dgram io;
} cidlb13_sess;

/* The one TLS 1.3 suite both sides use; CCM is offered by the client too. */
static const char SUITE[] = "TLS13-AES128-GCM-SHA256";

/* TLS 1.3 external PSK, client side: our identity and key. The session is the I/O context. */
static unsigned int psk_client_cb(WOLFSSL *ssl, const char *hint, char *identity,
                                  unsigned int id_max_len, unsigned char *key,
                                  unsigned int key_max_len, const char **ciphersuite)
{
    (void) hint;
    cidlb13_sess *s = wolfSSL_GetIOReadCtx(ssl);
    if (s == NULL) {
        return 0;
    }
    cidlb13_conf *c = s->conf;
    size_t id_len = strlen(c->identity);
    if (id_len + 1 > id_max_len || c->psk_len > key_max_len) {
        return 0;
    }
    memcpy(identity, c->identity, id_len + 1);
    memcpy(key, c->psk, c->psk_len);
    *ciphersuite = SUITE;
    return (unsigned int) c->psk_len;
}

/* Server side: the key for a known identity, 0 (unknown identity: handshake fails) else. */
static unsigned int psk_server_cb(WOLFSSL *ssl, const char *identity, unsigned char *key,
                                  unsigned int key_max_len, const char **ciphersuite)
{
    cidlb13_sess *s = wolfSSL_GetIOReadCtx(ssl);
    if (s == NULL || identity == NULL) {
        return 0;
    }
    cidlb13_conf *c = s->conf;
    if (strcmp(identity, c->identity) != 0 || c->psk_len > key_max_len) {
        return 0;
    }
    memcpy(key, c->psk, c->psk_len);
    *ciphersuite = SUITE;
    return (unsigned int) c->psk_len;
}

void cidlb13_conf_free(cidlb13_conf *c)
{
    if (c == NULL) {
        return;
    }
    wolfSSL_CTX_free(c->ctx);
    free(c);
}

/* DTLS 1.3 only (the 1.3 methods do not fall back to 1.2), PSK only, no certificates. */
cidlb13_conf *cidlb13_conf_new(int is_server, const unsigned char *psk, size_t psk_len,
                               const char *identity, size_t identity_len, int *err)
{
    if (psk_len == 0 || psk_len > sizeof(((cidlb13_conf *) 0)->psk) ||
        identity_len == 0 || identity_len >= sizeof(((cidlb13_conf *) 0)->identity) ||
        memchr(identity, 0, identity_len) != NULL) {
        *err = BAD_FUNC_ARG;
        return NULL;
    }
    cidlb13_conf *c = calloc(1, sizeof(*c));
    if (c == NULL) {
        *err = MEMORY_E;
        return NULL;
    }
    c->is_server = is_server;
    memcpy(c->psk, psk, psk_len);
    c->psk_len = psk_len;
    memcpy(c->identity, identity, identity_len);
    c->identity[identity_len] = 0;

    c->ctx = wolfSSL_CTX_new(is_server ? wolfDTLSv1_3_server_method()
                                       : wolfDTLSv1_3_client_method());
    if (c->ctx == NULL) {
        *err = MEMORY_E;
        goto fail;
    }
    if (wolfSSL_CTX_set_cipher_list(c->ctx, "TLS13-AES128-GCM-SHA256:TLS13-AES128-CCM-SHA256") !=
        WOLFSSL_SUCCESS) {
        *err = BAD_FUNC_ARG;
        goto fail;
    }
    if (is_server) {
        wolfSSL_CTX_set_psk_server_tls13_callback(c->ctx, psk_server_cb);
    } else {
        wolfSSL_CTX_set_psk_client_tls13_callback(c->ctx, psk_client_cb);
    }
    *err = 0;
    return c;

fail:
    cidlb13_conf_free(c);
    return NULL;
}

/* ---------------------------------------------------------------- session */

/* wolfSSL asks for one datagram per call (DTLS); it never wants a partial one. */
static int io_recv(WOLFSSL *ssl, char *buf, int sz, void *ctx)
{
    (void) ssl;
    cidlb13_sess *s = ctx;
    int n = dgram_recv(&s->io, buf, (size_t) sz);
    return n == CIDLB_DGRAM_WANT ? WOLFSSL_CBIO_ERR_WANT_READ : n;
}

static int io_send(WOLFSSL *ssl, char *buf, int sz, void *ctx)
{
    (void) ssl;
    cidlb13_sess *s = ctx;
    int n = dgram_send(&s->io, buf, (size_t) sz);
    return n == CIDLB_DGRAM_WANT ? WOLFSSL_CBIO_ERR_WANT_WRITE : n;
}

void cidlb13_sess_free(cidlb13_sess *s)
{
    if (s == NULL) {
        return;
    }
    wolfSSL_free(s->ssl);
    dgram_free(&s->io);
    free(s);
}

cidlb13_sess *cidlb13_sess_new(cidlb13_conf *c, int fd, int recv_from_fd, int *err)
{
    cidlb13_sess *s = calloc(1, sizeof(*s));
    if (s == NULL) {
        *err = MEMORY_E;
        return NULL;
    }
    s->conf = c;
    dgram_init(&s->io, fd, recv_from_fd, cidlb13_random);
    s->ssl = wolfSSL_new(c->ctx);
    if (s->ssl == NULL) {
        *err = MEMORY_E;
        free(s);
        return NULL;
    }
    wolfSSL_SSLSetIORecv(s->ssl, io_recv);
    wolfSSL_SSLSetIOSend(s->ssl, io_send);
    wolfSSL_SetIOReadCtx(s->ssl, s);
    wolfSSL_SetIOWriteCtx(s->ssl, s);
    /* Our callbacks never block: wolfSSL must return WANT_READ instead of waiting. */
    wolfSSL_dtls_set_using_nonblock(s->ssl, 1);
    *err = 0;
    return s;
}

void cidlb13_sess_set_fd(cidlb13_sess *s, int fd)
{
    s->io.fd = fd;
}

void cidlb13_sess_set_drop_permille(cidlb13_sess *s, unsigned p)
{
    dgram_set_drop_permille(&s->io, p);
}

/*
 * family 4 or 6; ip is 4 or 16 bytes; port host order. Replies go here. On a server the
 * address is also given to wolfSSL: it binds the HelloRetryRequest cookie to it (tls13.c
 * CreateCookie). Its own address check lives in its socket I/O, which we do not use.
 */
int cidlb13_sess_set_peer(cidlb13_sess *s, int family, const unsigned char *ip, uint16_t port,
                          uint32_t flowinfo, uint32_t scope_id)
{
    if (dgram_set_peer(&s->io, family, ip, port, flowinfo, scope_id) != 0) {
        return -1;
    }
    if (s->conf->is_server &&
        wolfSSL_dtls_set_peer(s->ssl, &s->io.peer, (unsigned int) s->io.peer_len) !=
            WOLFSSL_SUCCESS) {
        return -1;
    }
    return 0;
}

/* Queue one received datagram for the next io_recv (replaces an unconsumed one). */
int cidlb13_sess_feed(cidlb13_sess *s, const unsigned char *data, size_t len)
{
    return dgram_feed(&s->io, data, len);
}

/*
 * Negotiate RFC 9146 / RFC 9147 connection IDs; `cid` is the one we want on records sent to
 * us (server: node id + random; client: empty). Before the handshake only.
 */
int cidlb13_sess_use_cid(cidlb13_sess *s, const unsigned char *cid, size_t len)
{
    int ret = wolfSSL_dtls_cid_use(s->ssl);
    if (ret != WOLFSSL_SUCCESS) {
        return ret;
    }
    ret = wolfSSL_dtls_cid_set(s->ssl, (unsigned char *) cid, (unsigned int) len);
    return ret == WOLFSSL_SUCCESS ? 0 : (ret < 0 ? ret : BAD_STATE_E);
}

/* 1: a CID is in use for records we send (out/len filled; len may be 0), 0: none. */
int cidlb13_sess_get_tx_cid(cidlb13_sess *s, unsigned char *out, size_t cap, size_t *len)
{
    unsigned int n = 0;
    *len = 0;
    if (!wolfSSL_dtls_cid_is_enabled(s->ssl)) {
        return 0;
    }
    if (wolfSSL_dtls_cid_get_tx_size(s->ssl, &n) != WOLFSSL_SUCCESS) {
        return 0;
    }
    if (n > cap) {
        return -1;
    }
    if (n > 0 && wolfSSL_dtls_cid_get_tx(s->ssl, out, (unsigned int) cap) != WOLFSSL_SUCCESS) {
        return -1;
    }
    *len = n;
    return 1;
}

static int result(cidlb13_sess *s, int ret)
{
    int e = wolfSSL_get_error(s->ssl, ret);
    switch (e) {
        case WOLFSSL_ERROR_WANT_READ: return CIDLB13_WANT_READ;
        case WOLFSSL_ERROR_WANT_WRITE: return CIDLB13_WANT_WRITE;
        case WOLFSSL_ERROR_ZERO_RETURN: return CIDLB13_CLOSED;
        default: return e < 0 ? e : FATAL_ERROR;
    }
}

/* 0: handshake complete; CIDLB13_WANT_*; or a wolfSSL error code. */
int cidlb13_sess_handshake(cidlb13_sess *s)
{
    int ret = wolfSSL_negotiate(s->ssl);
    return ret == WOLFSSL_SUCCESS ? 0 : result(s, ret);
}

int cidlb13_sess_read(cidlb13_sess *s, unsigned char *buf, size_t len)
{
    int ret = wolfSSL_read(s->ssl, buf, (int) len);
    return ret > 0 ? ret : result(s, ret);
}

int cidlb13_sess_write(cidlb13_sess *s, const unsigned char *buf, size_t len)
{
    int ret = wolfSSL_write(s->ssl, buf, (int) len);
    return ret > 0 ? ret : result(s, ret);
}

void cidlb13_sess_close_notify(cidlb13_sess *s)
{
    (void) wolfSSL_shutdown(s->ssl);
}

/*
 * The current retransmission timeout in ms. wolfSSL counts it in whole seconds (1 s,
 * doubling up to 64 s) and, while a DTLS 1.3 flight is being sent, wants a quarter of it
 * ("quick timeout") so that a lost flight is resent sooner.
 */
int cidlb13_sess_timeout_ms(cidlb13_sess *s)
{
    int ms = wolfSSL_dtls_get_current_timeout(s->ssl) * 1000;
    if (wolfSSL_dtls13_use_quick_timeout(s->ssl)) {
        ms /= 4;
    }
    return ms;
}

/* The timer expired: resend the last flight. 0, or a wolfSSL error (e.g. too many timeouts). */
int cidlb13_sess_got_timeout(cidlb13_sess *s)
{
    int ret = wolfSSL_dtls_got_timeout(s->ssl);
    return ret == WOLFSSL_SUCCESS ? 0 : result(s, ret);
}

/* 1 once a ClientHello with a valid cookie arrived (server), or always on a client. */
int cidlb13_sess_is_stateful(cidlb13_sess *s)
{
    return wolfSSL_is_stateful(s->ssl) ? 1 : 0;
}

const char *cidlb13_sess_ciphersuite(cidlb13_sess *s)
{
    return wolfSSL_get_cipher_name(s->ssl);
}

/* [tx datagrams, rx datagrams, tx errors, simulated drops] */
void cidlb13_sess_stats(cidlb13_sess *s, uint64_t out[4])
{
    dgram_stats(&s->io, out);
}
