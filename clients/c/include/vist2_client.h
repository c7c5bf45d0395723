/*
 * vist2_client — a small C client for vist2d (protocol v1, see Protocols/PROTOCOL.md), on
 * protobuf-c. Editor plugins link this and speak to the daemon over its Unix socket.
 *
 * Framing: 8-byte header ('V', '2', version 1, flags 0, u32 big-endian payload length), then one
 * serialized vist2.v1.ClientMessage / ServerMessage (clients/c/gen/vist2.pb-c.h).
 *
 * Every function returns 0 on success or a negative VIST2_E* code; vist2_strerror() names it.
 */
#ifndef VIST2_CLIENT_H
#define VIST2_CLIENT_H

#include <stddef.h>
#include <stdint.h>

#include "../gen/vist2.pb-c.h"

#ifdef __cplusplus
extern "C" {
#endif

enum {
    VIST2_OK = 0,
    VIST2_EIO = -1,        /* read/write/connect failed (errno is set) */
    VIST2_ECLOSED = -2,    /* the peer closed the connection */
    VIST2_EFRAME = -3,     /* bad magic, version or flags */
    VIST2_ETOOLARGE = -4,  /* payload over the limit; nothing was allocated for it */
    VIST2_EDECODE = -5,    /* the payload is not a valid message */
    VIST2_ENOMEM = -6,
    VIST2_EPROTOCOL = -7,  /* an unexpected reply (e.g. to the handshake) */
    VIST2_ESERVER = -8,    /* the server answered with an Error message */
    VIST2_ETIMEOUT = -9,   /* nothing arrived (or could be sent) within the timeout */
    VIST2_EPATH = -10,     /* the socket path does not fit a Unix socket address (107 bytes) */
    VIST2_EBROKEN = -11,   /* an earlier error left the stream out of step; close the connection */
};

#define VIST2_FRAME_HEADER 8
/* The server's default frame limit: the largest request a client sends before the handshake
 * tells it the server's (HelloReply.limits.max_frame_bytes). */
#define VIST2_DEFAULT_MAX_FRAME (4u << 20)
/* The largest reply this client accepts unless told otherwise (vist2_set_max_recv). The server's
 * limit bounds what the client may send, not what it may receive. */
#define VIST2_DEFAULT_MAX_RECV (64u << 20)
/* How long one blocking call (connect, send, receive) may wait, unless told otherwise. */
#define VIST2_DEFAULT_TIMEOUT_MS 60000

const char *vist2_strerror(int code);

/* ---- framing, no I/O ---------------------------------------------------------------------- */

/* Writes the 8-byte header for a payload of `len` bytes into `out`. */
void vist2_frame_header(uint8_t out[VIST2_FRAME_HEADER], uint32_t len);

/* Parses a header: on success stores the payload length (checked against max_len). */
int vist2_frame_parse(const uint8_t hdr[VIST2_FRAME_HEADER], uint32_t max_len, uint32_t *len);

/* ---- connection --------------------------------------------------------------------------- */

typedef struct vist2_client vist2_client;

/* Connects to the daemon's socket (NULL: $XDG_RUNTIME_DIR/vist2/vist2.sock, else
 * /run/vist2/vist2.sock) and performs the handshake, each within VIST2_DEFAULT_TIMEOUT_MS;
 * *reply_out (optional) receives the HelloReply, to be freed with
 * vist2__v1__server_message__free_unpacked. A path too long for a Unix socket is VIST2_EPATH
 * (never silently truncated). */
int vist2_connect(const char *socket_path, const char *client_name, vist2_client **out,
                  Vist2__V1__ServerMessage **reply_out);

void vist2_close(vist2_client *c);

/* The longest one blocking call waits, in milliseconds; 0 waits forever. */
void vist2_set_timeout(vist2_client *c, int timeout_ms);

/* The largest reply payload accepted (default VIST2_DEFAULT_MAX_RECV); a larger one is refused
 * with VIST2_ETOOLARGE before anything is allocated for it. */
void vist2_set_max_recv(vist2_client *c, uint32_t max_bytes);

/* Sends one ClientMessage (framed). A payload over the server's frame limit is VIST2_ETOOLARGE
 * and nothing is sent. */
int vist2_send(vist2_client *c, const Vist2__V1__ClientMessage *msg);

/* Receives one ServerMessage (blocking, at most the timeout); free it with
 * vist2__v1__server_message__free_unpacked. VIST2_ETIMEOUT before the first byte of a frame
 * leaves the connection usable (call again); any error inside a frame (a bad or oversized
 * header, a timeout or EOF halfway, an I/O error) marks the connection failed, and every later
 * call returns VIST2_EBROKEN. */
int vist2_recv(vist2_client *c, Vist2__V1__ServerMessage **out);

/* Next request id for this connection (1, 2, ...). */
uint64_t vist2_next_id(vist2_client *c);

#ifdef __cplusplus
}
#endif
#endif
