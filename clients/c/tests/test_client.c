/* Tests of the C client against a fake daemon in a child process (the real daemon is tested
 * with this library by the daemon issue): framing, handshake, a request and its replies, and the
 * refusal of oversized or foreign frames. Prints "N passed, N failed". */
#include "vist2_client.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

static int passed, failed;
#define CHECK(cond)                                                                \
    do {                                                                           \
        if (cond) {                                                                \
            passed++;                                                              \
        } else {                                                                   \
            failed++;                                                              \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
        }                                                                          \
    } while (0)

static int read_n(int fd, uint8_t *p, size_t n) {
    while (n) {
        ssize_t r = read(fd, p, n);
        if (r <= 0) return -1;
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

static void send_server(int fd, Vist2__V1__ServerMessage *m) {
    size_t n = vist2__v1__server_message__get_packed_size(m);
    uint8_t *buf = malloc(VIST2_FRAME_HEADER + n);
    vist2_frame_header(buf, (uint32_t)n);
    vist2__v1__server_message__pack(m, buf + VIST2_FRAME_HEADER);
    /* Dribble the bytes one at a time: the client must handle partial reads. */
    for (size_t i = 0; i < VIST2_FRAME_HEADER + n; i++) (void)!write(fd, buf + i, 1);
    free(buf);
}

/* The same in one write. */
static void send_whole(int fd, Vist2__V1__ServerMessage *m) {
    size_t n = vist2__v1__server_message__get_packed_size(m);
    uint8_t *buf = malloc(VIST2_FRAME_HEADER + n);
    vist2_frame_header(buf, (uint32_t)n);
    vist2__v1__server_message__pack(m, buf + VIST2_FRAME_HEADER);
    size_t off = 0;
    while (off < VIST2_FRAME_HEADER + n) {
        ssize_t w = write(fd, buf + off, VIST2_FRAME_HEADER + n - off);
        if (w <= 0) break;
        off += (size_t)w;
    }
    free(buf);
}

static Vist2__V1__ClientMessage *recv_client(int fd) {
    uint8_t hdr[VIST2_FRAME_HEADER];
    uint32_t n;
    if (read_n(fd, hdr, sizeof hdr) || vist2_frame_parse(hdr, VIST2_DEFAULT_MAX_FRAME, &n)) return NULL;
    uint8_t *buf = malloc(n ? n : 1);
    if (read_n(fd, buf, n)) return NULL;
    Vist2__V1__ClientMessage *m = vist2__v1__client_message__unpack(NULL, n, buf);
    free(buf);
    return m;
}

/* The fake daemon: answers Hello, then one Generate with two deltas and a final result, then
 * sends a frame with bad magic. */
static void fake_daemon(int listener) {
    int fd = accept(listener, NULL, NULL);
    Vist2__V1__ClientMessage *m = recv_client(fd);
    if (!m || m->body_case != VIST2__V1__CLIENT_MESSAGE__BODY_HELLO) _exit(2);
    Vist2__V1__Limits limits = VIST2__V1__LIMITS__INIT;
    limits.max_frame_bytes = 1 << 16;
    Vist2__V1__HelloReply hr = VIST2__V1__HELLO_REPLY__INIT;
    hr.protocol_version = 1;
    hr.server_version = "fake 0";
    hr.model_fingerprint = "abc";
    hr.chunk_length = 400;
    hr.limits = &limits;
    Vist2__V1__ServerMessage r = VIST2__V1__SERVER_MESSAGE__INIT;
    r.request_id = 0;
    r.final = 1;
    r.body_case = VIST2__V1__SERVER_MESSAGE__BODY_HELLO;
    r.hello = &hr;
    send_server(fd, &r);
    vist2__v1__client_message__free_unpacked(m, NULL);

    m = recv_client(fd);
    if (!m || m->body_case != VIST2__V1__CLIENT_MESSAGE__BODY_GENERATE) _exit(3);
    const uint64_t id = m->request_id;
    Vist2__V1__TextDelta d = VIST2__V1__TEXT_DELTA__INIT;
    Vist2__V1__ServerMessage dm = VIST2__V1__SERVER_MESSAGE__INIT;
    dm.request_id = id;
    dm.body_case = VIST2__V1__SERVER_MESSAGE__BODY_TEXT_DELTA;
    dm.text_delta = &d;
    d.text = "Hello";
    send_server(fd, &dm);
    d.text = ", world";
    send_server(fd, &dm);
    Vist2__V1__GenerateResult gr = VIST2__V1__GENERATE_RESULT__INIT;
    gr.text = "Hello, world";
    gr.generated_tokens = 4;
    Vist2__V1__ServerMessage fm = VIST2__V1__SERVER_MESSAGE__INIT;
    fm.request_id = id;
    fm.final = 1;
    fm.body_case = VIST2__V1__SERVER_MESSAGE__BODY_GENERATE_RESULT;
    fm.generate_result = &gr;
    send_server(fd, &fm);
    vist2__v1__client_message__free_unpacked(m, NULL);
    /* A reply larger than the daemon's own frame limit (64 KiB): the client's limit is its own. */
    static char large[100 << 10];
    memset(large, 'x', sizeof large - 1);
    d.text = large;
    send_whole(fd, &dm);
    /* Silence past the client's timeout, then a small reply: the client timed out between
     * frames and can go on. */
    usleep(600 * 1000);
    d.text = "late";
    send_whole(fd, &dm);
    /* Half a frame, then silence: the client times out inside a frame. */
    uint8_t half[VIST2_FRAME_HEADER + 3];
    vist2_frame_header(half, 10);
    (void)!write(fd, half, sizeof half);
    uint8_t sink[64];
    while (read(fd, sink, sizeof sink) > 0) {
    }
    close(fd);

    /* Second connection: a frame over the limit the client set for itself. */
    fd = accept(listener, NULL, NULL);
    m = recv_client(fd);
    if (!m || m->body_case != VIST2__V1__CLIENT_MESSAGE__BODY_HELLO) _exit(4);
    vist2__v1__client_message__free_unpacked(m, NULL);
    send_server(fd, &r);
    d.text = large;
    send_whole(fd, &dm);
    while (read(fd, sink, sizeof sink) > 0) {
    }
    close(fd);
    _exit(0);
}

int main(void) {
    /* Framing without I/O. */
    uint8_t h[VIST2_FRAME_HEADER];
    uint32_t n = 0;
    vist2_frame_header(h, 0x01020304);
    CHECK(h[0] == 'V' && h[1] == '2' && h[2] == 1 && h[3] == 0 && h[4] == 1 && h[7] == 4);
    CHECK(vist2_frame_parse(h, 0x01020304, &n) == VIST2_OK && n == 0x01020304);
    CHECK(vist2_frame_parse(h, 0x01020303, &n) == VIST2_ETOOLARGE);
    h[0] = 'G';
    CHECK(vist2_frame_parse(h, ~0u, &n) == VIST2_EFRAME);
    CHECK(strcmp(vist2_strerror(VIST2_ETOOLARGE), "frame larger than the limit") == 0);

    /* A fake daemon on a socket in a temporary directory. */
    char dir[] = "/tmp/vist2-ctest-XXXXXX";
    CHECK(mkdtemp(dir) != NULL);
    struct sockaddr_un addr = {0};
    char path[sizeof addr.sun_path];
    snprintf(path, sizeof path, "%s/vist2.sock", dir);
    int listener = socket(AF_UNIX, SOCK_STREAM, 0);
    addr.sun_family = AF_UNIX;
    snprintf(addr.sun_path, sizeof addr.sun_path, "%s", path);
    CHECK(bind(listener, (struct sockaddr *)&addr, sizeof addr) == 0);
    CHECK(listen(listener, 4) == 0);
    pid_t pid = fork();
    if (pid == 0) fake_daemon(listener);

    vist2_client *c = NULL;
    Vist2__V1__ServerMessage *hello = NULL;
    CHECK(vist2_connect(path, "test", &c, &hello) == VIST2_OK);
    CHECK(hello && hello->hello && hello->hello->chunk_length == 400 && strcmp(hello->hello->model_fingerprint, "abc") == 0);
    if (hello) vist2__v1__server_message__free_unpacked(hello, NULL);

    Vist2__V1__GenerateRequest g = VIST2__V1__GENERATE_REQUEST__INIT;
    g.instruction = "Say hello.";
    g.max_tokens = 8;
    Vist2__V1__ClientMessage m = VIST2__V1__CLIENT_MESSAGE__INIT;
    m.request_id = vist2_next_id(c);
    m.body_case = VIST2__V1__CLIENT_MESSAGE__BODY_GENERATE;
    m.generate = &g;
    CHECK(m.request_id == 1);
    CHECK(vist2_send(c, &m) == VIST2_OK);
    char text[64] = "";
    int finals = 0;
    for (int i = 0; i < 3; i++) {
        Vist2__V1__ServerMessage *r = NULL;
        CHECK(vist2_recv(c, &r) == VIST2_OK);
        if (!r) break;
        CHECK(r->request_id == 1);
        if (r->body_case == VIST2__V1__SERVER_MESSAGE__BODY_TEXT_DELTA) strncat(text, r->text_delta->text, sizeof text - strlen(text) - 1);
        if (r->final) {
            finals++;
            CHECK(r->body_case == VIST2__V1__SERVER_MESSAGE__BODY_GENERATE_RESULT && r->generate_result->generated_tokens == 4);
        }
        vist2__v1__server_message__free_unpacked(r, NULL);
    }
    CHECK(strcmp(text, "Hello, world") == 0 && finals == 1);
    /* 100 KiB: over the daemon's frame limit, within the client's own. */
    Vist2__V1__ServerMessage *r = NULL;
    CHECK(vist2_recv(c, &r) == VIST2_OK && r && strlen(r->text_delta->text) == (100 << 10) - 1);
    if (r) vist2__v1__server_message__free_unpacked(r, NULL);
    /* A timeout between frames: reported, and the connection still works. */
    vist2_set_timeout(c, 200);
    CHECK(vist2_recv(c, &r) == VIST2_ETIMEOUT && r == NULL);
    vist2_set_timeout(c, 5000);
    CHECK(vist2_recv(c, &r) == VIST2_OK && r && strcmp(r->text_delta->text, "late") == 0);
    if (r) vist2__v1__server_message__free_unpacked(r, NULL);
    /* A timeout inside a frame: the stream is out of step, the connection is failed for good. */
    vist2_set_timeout(c, 300);
    CHECK(vist2_recv(c, &r) == VIST2_ETIMEOUT && r == NULL);
    CHECK(vist2_recv(c, &r) == VIST2_EBROKEN);
    CHECK(vist2_send(c, &m) == VIST2_EBROKEN);
    vist2_close(c);
    /* The client's own receive limit: refused before allocation, then the connection is failed. */
    CHECK(vist2_connect(path, "test", &c, NULL) == VIST2_OK);
    vist2_set_max_recv(c, 1 << 10);
    CHECK(vist2_recv(c, &r) == VIST2_ETOOLARGE && r == NULL);
    CHECK(vist2_recv(c, &r) == VIST2_EBROKEN);
    vist2_close(c);
    close(listener);
    int status = 0;
    waitpid(pid, &status, 0);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    unlink(path);
    rmdir(dir);

    /* Nobody listening: a clear error, not a crash. */
    CHECK(vist2_connect("/nonexistent/vist2.sock", "test", &c, NULL) == VIST2_EIO);
    /* A path that does not fit sockaddr_un is refused, not truncated to another socket's. */
    char long_path[200];
    memset(long_path, 'a', sizeof long_path - 1);
    long_path[0] = '/';
    long_path[sizeof long_path - 1] = 0;
    CHECK(vist2_connect(long_path, "test", &c, NULL) == VIST2_EPATH);

    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
