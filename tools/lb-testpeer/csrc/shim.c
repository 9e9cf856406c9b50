/*
 * Thin C shim between lb-testpeer (Rust) and Mbed TLS 3.6 (default config).
 *
 * Mbed TLS structs are large and their layout depends on the config, so they are only ever
 * allocated and touched here; Rust sees opaque pointers and a handful of small functions.
 * All DTLS work (handshake, cookies, CID, record protection, retransmission) is Mbed TLS's;
 * this file only supplies the datagram BIO, a timer and the configuration.
 *
 * Not thread-safe (the default config has no MBEDTLS_THREADING_C): the Rust side serialises
 * every call into this file with one global mutex.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <netinet/in.h>
#include <arpa/inet.h>

#include "dgram.h"

#include "mbedtls/build_info.h"
#include "mbedtls/ctr_drbg.h"
#include "mbedtls/debug.h"
#include "mbedtls/entropy.h"
#include "mbedtls/error.h"
#include "mbedtls/ssl.h"
#include "mbedtls/ssl_ciphersuites.h"
#include "mbedtls/ssl_cookie.h"
#include "mbedtls/timing.h"
#include "psa/crypto.h"

#if !defined(MBEDTLS_SSL_DTLS_CONNECTION_ID) || !defined(MBEDTLS_SSL_PROTO_DTLS) ||          \
    !defined(MBEDTLS_SSL_COOKIE_C) || !defined(MBEDTLS_TIMING_C) ||                          \
    !defined(MBEDTLS_KEY_EXCHANGE_PSK_ENABLED)
#error "Mbed TLS config lacks DTLS / CID / cookies / timing / PSK"
#endif
#if MBEDTLS_SSL_DTLS_CONNECTION_ID_COMPAT != 0
#error "expected RFC 9146 CID (MBEDTLS_SSL_DTLS_CONNECTION_ID_COMPAT 0)"
#endif

/* ---------------------------------------------------------------- globals */

static int g_init_done = 0;
static mbedtls_entropy_context g_entropy;
static mbedtls_ctr_drbg_context g_drbg;

int cidlb_global_init(void)
{
    if (g_init_done) {
        return 0;
    }
    psa_status_t st = psa_crypto_init();
    if (st != PSA_SUCCESS) {
        return (int) st;
    }
    mbedtls_entropy_init(&g_entropy);
    mbedtls_ctr_drbg_init(&g_drbg);
    static const unsigned char pers[] = "cidlb-testpeer";
    int ret = mbedtls_ctr_drbg_seed(&g_drbg, mbedtls_entropy_func, &g_entropy, pers,
                                    sizeof(pers) - 1);
    if (ret != 0) {
        return ret;
    }
    g_init_done = 1;
    return 0;
}

int cidlb_random(unsigned char *buf, size_t len)
{
    return mbedtls_ctr_drbg_random(&g_drbg, buf, len);
}

void cidlb_strerror(int err, char *buf, size_t len)
{
    mbedtls_strerror(err, buf, len);
}

const char *cidlb_version(void)
{
    return MBEDTLS_VERSION_STRING_FULL;
}

/* Named error codes, so the Rust side does not hard-code them. */
int cidlb_err_code(int which)
{
    switch (which) {
        case 0: return MBEDTLS_ERR_SSL_WANT_READ;
        case 1: return MBEDTLS_ERR_SSL_WANT_WRITE;
        case 2: return MBEDTLS_ERR_SSL_HELLO_VERIFY_REQUIRED;
        case 3: return MBEDTLS_ERR_SSL_CLIENT_RECONNECT;
        case 4: return MBEDTLS_ERR_SSL_PEER_CLOSE_NOTIFY;
        case 5: return MBEDTLS_ERR_SSL_TIMEOUT;
        default: return 0;
    }
}

static void debug_cb(void *ctx, int level, const char *file, int line, const char *str)
{
    (void) ctx;
    const char *base = strrchr(file, '/');
    fprintf(stderr, "mbedtls[%d] %s:%04d: %s", level, base ? base + 1 : file, line, str);
}

/* ---------------------------------------------------------------- config */

typedef struct cidlb_conf {
    mbedtls_ssl_config conf;
    mbedtls_ssl_cookie_ctx cookie;
    int is_server;
    int ciphersuites[3];
} cidlb_conf;

void cidlb_conf_free(cidlb_conf *c)
{
    if (c == NULL) {
        return;
    }
    mbedtls_ssl_config_free(&c->conf);
    mbedtls_ssl_cookie_free(&c->cookie);
    free(c);
}

/*
 * is_server: 1 server, 0 client.
 * cid_len: length of the CID *we* ask the peer to put on records sent to us (server: L,
 *          client: 0). Ignored when use_cid is 0.
 */
cidlb_conf *cidlb_conf_new(int is_server, const unsigned char *psk, size_t psk_len,
                           const unsigned char *identity, size_t identity_len, int use_cid,
                           size_t cid_len, uint32_t hs_timeout_min_ms,
                           uint32_t hs_timeout_max_ms, int debug_level, int *err)
{
    int ret;
    cidlb_conf *c = calloc(1, sizeof(*c));
    if (c == NULL) {
        *err = MBEDTLS_ERR_SSL_ALLOC_FAILED;
        return NULL;
    }
    c->is_server = is_server;
    mbedtls_ssl_config_init(&c->conf);
    mbedtls_ssl_cookie_init(&c->cookie);

    ret = mbedtls_ssl_config_defaults(&c->conf,
                                      is_server ? MBEDTLS_SSL_IS_SERVER : MBEDTLS_SSL_IS_CLIENT,
                                      MBEDTLS_SSL_TRANSPORT_DATAGRAM, MBEDTLS_SSL_PRESET_DEFAULT);
    if (ret != 0) {
        goto fail;
    }
    /* DTLS 1.2 only. */
    mbedtls_ssl_conf_min_tls_version(&c->conf, MBEDTLS_SSL_VERSION_TLS1_2);
    mbedtls_ssl_conf_max_tls_version(&c->conf, MBEDTLS_SSL_VERSION_TLS1_2);
    mbedtls_ssl_conf_rng(&c->conf, mbedtls_ctr_drbg_random, &g_drbg);
    mbedtls_ssl_conf_authmode(&c->conf, MBEDTLS_SSL_VERIFY_NONE); /* PSK only, no certs */

    c->ciphersuites[0] = MBEDTLS_TLS_PSK_WITH_AES_128_GCM_SHA256;
    c->ciphersuites[1] = MBEDTLS_TLS_PSK_WITH_AES_128_CCM;
    c->ciphersuites[2] = 0;
    mbedtls_ssl_conf_ciphersuites(&c->conf, c->ciphersuites);

    ret = mbedtls_ssl_conf_psk(&c->conf, psk, psk_len, identity, identity_len);
    if (ret != 0) {
        goto fail;
    }
    if (hs_timeout_min_ms > 0 && hs_timeout_max_ms >= hs_timeout_min_ms) {
        mbedtls_ssl_conf_handshake_timeout(&c->conf, hs_timeout_min_ms, hs_timeout_max_ms);
    }

    if (use_cid) {
        /* IGNORE: a record carrying a CID we did not negotiate is dropped, not fatal. */
        ret = mbedtls_ssl_conf_cid(&c->conf, cid_len, MBEDTLS_SSL_UNEXPECTED_CID_IGNORE);
        if (ret != 0) {
            goto fail;
        }
    }

    if (is_server) {
        ret = mbedtls_ssl_cookie_setup(&c->cookie, mbedtls_ctr_drbg_random, &g_drbg);
        if (ret != 0) {
            goto fail;
        }
        mbedtls_ssl_conf_dtls_cookies(&c->conf, mbedtls_ssl_cookie_write, mbedtls_ssl_cookie_check,
                                      &c->cookie);
    }

    if (debug_level > 0) {
        mbedtls_debug_set_threshold(debug_level);
        mbedtls_ssl_conf_dbg(&c->conf, debug_cb, NULL);
    }
    *err = 0;
    return c;

fail:
    *err = ret;
    cidlb_conf_free(c);
    return NULL;
}

/* ---------------------------------------------------------------- session */

typedef struct cidlb_sess {
    mbedtls_ssl_context ssl;
    mbedtls_timing_delay_context timer;
    cidlb_dgram io;
} cidlb_sess;

static int bio_send(void *ctx, const unsigned char *buf, size_t len)
{
    cidlb_sess *s = ctx;
    int n = dgram_send(&s->io, buf, len);
    return n == CIDLB_DGRAM_WANT ? MBEDTLS_ERR_SSL_WANT_WRITE : n;
}

static int bio_recv(void *ctx, unsigned char *buf, size_t len)
{
    cidlb_sess *s = ctx;
    int n = dgram_recv(&s->io, buf, len);
    return n == CIDLB_DGRAM_WANT ? MBEDTLS_ERR_SSL_WANT_READ : n;
}

void cidlb_sess_free(cidlb_sess *s)
{
    if (s == NULL) {
        return;
    }
    mbedtls_ssl_free(&s->ssl);
    dgram_free(&s->io);
    free(s);
}

cidlb_sess *cidlb_sess_new(cidlb_conf *c, int fd, int recv_from_fd, int *err)
{
    cidlb_sess *s = calloc(1, sizeof(*s));
    if (s == NULL) {
        *err = MBEDTLS_ERR_SSL_ALLOC_FAILED;
        return NULL;
    }
    mbedtls_ssl_init(&s->ssl);
    dgram_init(&s->io, fd, recv_from_fd, cidlb_random);
    int ret = mbedtls_ssl_setup(&s->ssl, &c->conf);
    if (ret != 0) {
        *err = ret;
        cidlb_sess_free(s);
        return NULL;
    }
    mbedtls_ssl_set_bio(&s->ssl, s, bio_send, bio_recv, NULL);
    mbedtls_ssl_set_timer_cb(&s->ssl, &s->timer, mbedtls_timing_set_delay,
                             mbedtls_timing_get_delay);
    *err = 0;
    return s;
}

void cidlb_sess_set_fd(cidlb_sess *s, int fd)
{
    s->io.fd = fd;
}

void cidlb_sess_set_drop_permille(cidlb_sess *s, unsigned p)
{
    dgram_set_drop_permille(&s->io, p);
}

/* See dgram_set_peer. */
int cidlb_sess_set_peer(cidlb_sess *s, int family, const unsigned char *ip, uint16_t port,
                        uint32_t flowinfo, uint32_t scope_id)
{
    return dgram_set_peer(&s->io, family, ip, port, flowinfo, scope_id);
}

int cidlb_sess_set_transport_id(cidlb_sess *s, const unsigned char *id, size_t len)
{
    return mbedtls_ssl_set_client_transport_id(&s->ssl, id, len);
}

/* Queue one received datagram for the next bio_recv (replaces an unconsumed one). */
int cidlb_sess_feed(cidlb_sess *s, const unsigned char *data, size_t len)
{
    return dgram_feed(&s->io, data, len);
}

int cidlb_sess_set_cid(cidlb_sess *s, int enable, const unsigned char *cid, size_t len)
{
    return mbedtls_ssl_set_cid(&s->ssl,
                               enable ? MBEDTLS_SSL_CID_ENABLED : MBEDTLS_SSL_CID_DISABLED,
                               cid, len);
}

/* 1: CID in use (peer_cid/len filled, len may be 0), 0: not negotiated, <0: error. */
int cidlb_sess_get_peer_cid(cidlb_sess *s, unsigned char *out, size_t cap, size_t *len)
{
    int enabled = 0;
    unsigned char tmp[MBEDTLS_SSL_CID_OUT_LEN_MAX];
    size_t n = 0;
    int ret = mbedtls_ssl_get_peer_cid(&s->ssl, &enabled, tmp, &n);
    if (ret != 0) {
        return ret;
    }
    if (enabled != MBEDTLS_SSL_CID_ENABLED) {
        *len = 0;
        return 0;
    }
    if (n > cap) {
        n = cap;
    }
    memcpy(out, tmp, n);
    *len = n;
    return 1;
}

int cidlb_sess_handshake(cidlb_sess *s)
{
    return mbedtls_ssl_handshake(&s->ssl);
}

int cidlb_sess_handshake_done(cidlb_sess *s)
{
    return mbedtls_ssl_is_handshake_over(&s->ssl);
}

int cidlb_sess_read(cidlb_sess *s, unsigned char *buf, size_t len)
{
    return mbedtls_ssl_read(&s->ssl, buf, len);
}

int cidlb_sess_write(cidlb_sess *s, const unsigned char *buf, size_t len)
{
    return mbedtls_ssl_write(&s->ssl, buf, len);
}

int cidlb_sess_close_notify(cidlb_sess *s)
{
    return mbedtls_ssl_close_notify(&s->ssl);
}

/* -1 no timer, 0 running, 1 intermediate expired, 2 final expired (retransmit due). */
int cidlb_sess_timer_state(cidlb_sess *s)
{
    return mbedtls_timing_get_delay(&s->timer);
}

const char *cidlb_sess_ciphersuite(cidlb_sess *s)
{
    return mbedtls_ssl_get_ciphersuite(&s->ssl);
}

void cidlb_sess_stats(cidlb_sess *s, uint64_t out[4])
{
    dgram_stats(&s->io, out);
}
