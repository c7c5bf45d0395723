#include "vist2_client.h"

#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

struct vist2_client {
    int fd;
    uint32_t max_send; /* the server's frame limit (HelloReply) */
    uint32_t max_recv; /* this client's own */
    int timeout_ms;    /* per blocking call; 0: none */
    int failed;        /* the error that left the stream out of step, or 0 */
    uint64_t next_id;
};

const char *vist2_strerror(int code) {
    switch (code) {
    case VIST2_OK: return "ok";
    case VIST2_EIO: return "I/O error";
    case VIST2_ECLOSED: return "connection closed by the daemon";
    case VIST2_EFRAME: return "not a vist2 frame (bad magic, version or flags)";
    case VIST2_ETOOLARGE: return "frame larger than the limit";
    case VIST2_EDECODE: return "undecodable message";
    case VIST2_ENOMEM: return "out of memory";
    case VIST2_EPROTOCOL: return "unexpected reply";
    case VIST2_ESERVER: return "the daemon returned an error";
    case VIST2_ETIMEOUT: return "timed out waiting for the daemon";
    case VIST2_EPATH: return "socket path too long for a Unix socket";
    case VIST2_EBROKEN: return "the connection failed earlier and can no longer be used";
    default: return "unknown error";
    }
}

void vist2_frame_header(uint8_t out[VIST2_FRAME_HEADER], uint32_t len) {
    out[0] = 'V';
    out[1] = '2';
    out[2] = 1;
    out[3] = 0;
    out[4] = (uint8_t)(len >> 24);
    out[5] = (uint8_t)(len >> 16);
    out[6] = (uint8_t)(len >> 8);
    out[7] = (uint8_t)len;
}

int vist2_frame_parse(const uint8_t hdr[VIST2_FRAME_HEADER], uint32_t max_len, uint32_t *len) {
    if (hdr[0] != 'V' || hdr[1] != '2' || hdr[2] != 1 || hdr[3] != 0) return VIST2_EFRAME;
    const uint32_t n = (uint32_t)hdr[4] << 24 | (uint32_t)hdr[5] << 16 | (uint32_t)hdr[6] << 8 | hdr[7];
    if (n > max_len) return VIST2_ETOOLARGE;
    *len = n;
    return VIST2_OK;
}

static int64_t now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

/* Waits until fd is ready for `events` or the deadline (ms on CLOCK_MONOTONIC; -1: none) passes. */
static int wait_ready(int fd, short events, int64_t deadline) {
    for (;;) {
        int wait = -1;
        if (deadline >= 0) {
            const int64_t left = deadline - now_ms();
            if (left <= 0) return VIST2_ETIMEOUT;
            wait = left > 0x7fffffff ? 0x7fffffff : (int)left;
        }
        struct pollfd p = {.fd = fd, .events = events};
        const int r = poll(&p, 1, wait);
        if (r > 0) return VIST2_OK;
        if (r == 0) return VIST2_ETIMEOUT;
        if (errno != EINTR) return VIST2_EIO;
    }
}

static int64_t deadline_of(const vist2_client *c) { return c->timeout_ms > 0 ? now_ms() + c->timeout_ms : -1; }

static int write_all(int fd, const uint8_t *p, size_t n, int64_t deadline) {
    while (n > 0) {
        int rc = wait_ready(fd, POLLOUT, deadline);
        if (rc) return rc;
        /* MSG_NOSIGNAL: a closed daemon is VIST2_EIO, not a SIGPIPE that kills the host editor. */
        const ssize_t w = send(fd, p, n, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w < 0) {
            if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK) continue;
            return VIST2_EIO;
        }
        p += w;
        n -= (size_t)w;
    }
    return VIST2_OK;
}

static int read_all(int fd, uint8_t *p, size_t n, int64_t deadline) {
    while (n > 0) {
        int rc = wait_ready(fd, POLLIN, deadline);
        if (rc) return rc;
        const ssize_t r = recv(fd, p, n, MSG_DONTWAIT);
        if (r < 0) {
            if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK) continue;
            return VIST2_EIO;
        }
        if (r == 0) return VIST2_ECLOSED;
        p += r;
        n -= (size_t)r;
    }
    return VIST2_OK;
}

/* Marks the connection failed with `rc` (the stream is out of step) and returns rc. */
static int fail(vist2_client *c, int rc) {
    if (!c->failed) c->failed = rc;
    return rc;
}

int vist2_send(vist2_client *c, const Vist2__V1__ClientMessage *msg) {
    if (c->failed) return VIST2_EBROKEN;
    const size_t n = vist2__v1__client_message__get_packed_size(msg);
    if (n > c->max_send) return VIST2_ETOOLARGE;
    uint8_t *buf = malloc(VIST2_FRAME_HEADER + n);
    if (!buf) return VIST2_ENOMEM;
    vist2_frame_header(buf, (uint32_t)n);
    vist2__v1__client_message__pack(msg, buf + VIST2_FRAME_HEADER);
    const int rc = write_all(c->fd, buf, VIST2_FRAME_HEADER + n, deadline_of(c));
    free(buf);
    /* A frame sent in part leaves the server's decoder mid-frame. */
    return rc ? fail(c, rc) : VIST2_OK;
}

int vist2_recv(vist2_client *c, Vist2__V1__ServerMessage **out) {
    *out = NULL;
    if (c->failed) return VIST2_EBROKEN;
    const int64_t deadline = deadline_of(c);
    uint8_t hdr[VIST2_FRAME_HEADER];
    uint32_t n = 0;
    /* Nothing consumed yet: a timeout here leaves the stream in step. */
    int rc = wait_ready(c->fd, POLLIN, deadline);
    if (rc == VIST2_ETIMEOUT) return rc;
    if (rc) return fail(c, rc);
    if ((rc = read_all(c->fd, hdr, sizeof hdr, deadline))) return fail(c, rc);
    if ((rc = vist2_frame_parse(hdr, c->max_recv, &n))) return fail(c, rc);
    uint8_t *buf = malloc(n ? n : 1);
    if (!buf) return fail(c, VIST2_ENOMEM);
    if ((rc = read_all(c->fd, buf, n, deadline))) {
        free(buf);
        return fail(c, rc);
    }
    *out = vist2__v1__server_message__unpack(NULL, n, buf);
    free(buf);
    return *out ? VIST2_OK : VIST2_EDECODE;
}

void vist2_set_timeout(vist2_client *c, int timeout_ms) { c->timeout_ms = timeout_ms > 0 ? timeout_ms : 0; }

void vist2_set_max_recv(vist2_client *c, uint32_t max_bytes) { c->max_recv = max_bytes; }

uint64_t vist2_next_id(vist2_client *c) { return c->next_id++; }

int vist2_connect(const char *socket_path, const char *client_name, vist2_client **out,
                  Vist2__V1__ServerMessage **reply_out) {
    struct sockaddr_un addr;
    memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    int len;
    if (socket_path) {
        len = snprintf(addr.sun_path, sizeof addr.sun_path, "%s", socket_path);
    } else if (getenv("XDG_RUNTIME_DIR")) {
        len = snprintf(addr.sun_path, sizeof addr.sun_path, "%s/vist2/vist2.sock", getenv("XDG_RUNTIME_DIR"));
    } else {
        len = snprintf(addr.sun_path, sizeof addr.sun_path, "/run/vist2/vist2.sock");
    }
    /* A truncated path would name another socket: refuse it. */
    if (len < 0 || (size_t)len >= sizeof addr.sun_path) return VIST2_EPATH;
    const int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return VIST2_EIO;
    /* connect(2) on a Unix socket blocks while the listener's backlog is full: bound it too. */
    const struct timeval tv = {.tv_sec = VIST2_DEFAULT_TIMEOUT_MS / 1000, .tv_usec = (VIST2_DEFAULT_TIMEOUT_MS % 1000) * 1000};
    (void)setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
        const int timed_out = errno == EAGAIN || errno == EINPROGRESS;
        close(fd);
        return timed_out ? VIST2_ETIMEOUT : VIST2_EIO;
    }
    vist2_client *c = calloc(1, sizeof *c);
    if (!c) {
        close(fd);
        return VIST2_ENOMEM;
    }
    c->fd = fd;
    c->max_send = VIST2_DEFAULT_MAX_FRAME;
    c->max_recv = VIST2_DEFAULT_MAX_RECV;
    c->timeout_ms = VIST2_DEFAULT_TIMEOUT_MS;
    c->next_id = 1;

    Vist2__V1__Hello hello = VIST2__V1__HELLO__INIT;
    hello.protocol_version = 1;
    hello.client_name = (char *)(client_name ? client_name : "vist2-c");
    Vist2__V1__ClientMessage msg = VIST2__V1__CLIENT_MESSAGE__INIT;
    msg.request_id = 0;
    msg.body_case = VIST2__V1__CLIENT_MESSAGE__BODY_HELLO;
    msg.hello = &hello;
    Vist2__V1__ServerMessage *reply = NULL;
    int rc = vist2_send(c, &msg);
    /* The daemon may refuse a peer (PERMISSION_DENIED) and close before reading the Hello: its
     * error reply can still be read after the send failed (what arrives is in step, whatever
     * became of the Hello). */
    c->failed = 0;
    int rrc = vist2_recv(c, &reply);
    if (!rc) rc = rrc;
    if (!rrc && reply->body_case == VIST2__V1__SERVER_MESSAGE__BODY_ERROR) rc = VIST2_ESERVER;
    if (!rc && reply->body_case != VIST2__V1__SERVER_MESSAGE__BODY_HELLO) rc = VIST2_EPROTOCOL;
    /* The server's limit bounds what this client sends; what it accepts is its own. */
    if (!rc && reply->hello->limits && reply->hello->limits->max_frame_bytes) c->max_send = reply->hello->limits->max_frame_bytes;
    if (rc) {
        if (reply) vist2__v1__server_message__free_unpacked(reply, NULL);
        vist2_close(c);
        return rc;
    }
    if (reply_out) {
        *reply_out = reply;
    } else {
        vist2__v1__server_message__free_unpacked(reply, NULL);
    }
    *out = c;
    return VIST2_OK;
}

void vist2_close(vist2_client *c) {
    if (!c) return;
    close(c->fd);
    free(c);
}
