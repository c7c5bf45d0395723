#include "vist2_client.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

struct vist2_client {
    int fd;
    uint32_t max_frame;
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

static int write_all(int fd, const uint8_t *p, size_t n) {
    while (n > 0) {
        /* MSG_NOSIGNAL: a closed daemon is VIST2_EIO, not a SIGPIPE that kills the host editor. */
        const ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR) continue;
            return VIST2_EIO;
        }
        p += w;
        n -= (size_t)w;
    }
    return VIST2_OK;
}

static int read_all(int fd, uint8_t *p, size_t n) {
    while (n > 0) {
        const ssize_t r = read(fd, p, n);
        if (r < 0) {
            if (errno == EINTR) continue;
            return VIST2_EIO;
        }
        if (r == 0) return VIST2_ECLOSED;
        p += r;
        n -= (size_t)r;
    }
    return VIST2_OK;
}

int vist2_send(vist2_client *c, const Vist2__V1__ClientMessage *msg) {
    const size_t n = vist2__v1__client_message__get_packed_size(msg);
    if (n > c->max_frame) return VIST2_ETOOLARGE;
    uint8_t *buf = malloc(VIST2_FRAME_HEADER + n);
    if (!buf) return VIST2_ENOMEM;
    vist2_frame_header(buf, (uint32_t)n);
    vist2__v1__client_message__pack(msg, buf + VIST2_FRAME_HEADER);
    const int rc = write_all(c->fd, buf, VIST2_FRAME_HEADER + n);
    free(buf);
    return rc;
}

int vist2_recv(vist2_client *c, Vist2__V1__ServerMessage **out) {
    uint8_t hdr[VIST2_FRAME_HEADER];
    uint32_t n = 0;
    int rc = read_all(c->fd, hdr, sizeof hdr);
    if (rc) return rc;
    if ((rc = vist2_frame_parse(hdr, c->max_frame, &n))) return rc;
    uint8_t *buf = malloc(n ? n : 1);
    if (!buf) return VIST2_ENOMEM;
    if ((rc = read_all(c->fd, buf, n))) {
        free(buf);
        return rc;
    }
    *out = vist2__v1__server_message__unpack(NULL, n, buf);
    free(buf);
    return *out ? VIST2_OK : VIST2_EDECODE;
}

uint64_t vist2_next_id(vist2_client *c) { return c->next_id++; }

int vist2_connect(const char *socket_path, const char *client_name, vist2_client **out,
                  Vist2__V1__ServerMessage **reply_out) {
    char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
    if (socket_path) {
        snprintf(path, sizeof path, "%s", socket_path);
    } else if (getenv("XDG_RUNTIME_DIR")) {
        snprintf(path, sizeof path, "%s/vist2/vist2.sock", getenv("XDG_RUNTIME_DIR"));
    } else {
        snprintf(path, sizeof path, "/run/vist2/vist2.sock");
    }
    const int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return VIST2_EIO;
    struct sockaddr_un addr;
    memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    snprintf(addr.sun_path, sizeof addr.sun_path, "%s", path);
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
        close(fd);
        return VIST2_EIO;
    }
    vist2_client *c = calloc(1, sizeof *c);
    if (!c) {
        close(fd);
        return VIST2_ENOMEM;
    }
    c->fd = fd;
    c->max_frame = VIST2_DEFAULT_MAX_FRAME;
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
     * error reply can still be read after the send failed. */
    int rrc = vist2_recv(c, &reply);
    if (!rc) rc = rrc;
    if (!rrc && reply->body_case == VIST2__V1__SERVER_MESSAGE__BODY_ERROR) rc = VIST2_ESERVER;
    if (!rc && reply->body_case != VIST2__V1__SERVER_MESSAGE__BODY_HELLO) rc = VIST2_EPROTOCOL;
    if (!rc && reply->hello->limits && reply->hello->limits->max_frame_bytes) c->max_frame = reply->hello->limits->max_frame_bytes;
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
