/*
 * vist2_example — connect to vist2d, open a file as a document, stream a generation over it.
 *
 *   vist2_example [-s SOCKET] [-n MAX_TOKENS] FILE INSTRUCTION
 *
 * Prints the generated text as it streams, then one line of statistics on stderr. Exit status 0
 * on success, 1 on any error (with the daemon's error code and message).
 */
#include "vist2_client.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    size_t cap = 65536, n = 0;
    char *buf = malloc(cap + 1);
    size_t r;
    while (buf && (r = fread(buf + n, 1, cap - n, f)) > 0) {
        n += r;
        if (n == cap) {
            char *b = realloc(buf, cap * 2 + 1);
            if (!b) {
                free(buf);
                buf = NULL;
                break;
            }
            buf = b;
            cap *= 2;
        }
    }
    fclose(f);
    if (buf) buf[n] = 0;
    *len = n;
    return buf;
}

/* Reads replies until the final one for `id`; text deltas go to stdout. */
static int await_final(vist2_client *c, uint64_t id, Vist2__V1__ServerMessage **final) {
    for (;;) {
        Vist2__V1__ServerMessage *m = NULL;
        int rc = vist2_recv(c, &m);
        if (rc != 0) return rc;
        if (m->request_id != id) {
            vist2__v1__server_message__free_unpacked(m, NULL);
            continue;
        }
        if (m->body_case == VIST2__V1__SERVER_MESSAGE__BODY_TEXT_DELTA) {
            fputs(m->text_delta->text, stdout);
            fflush(stdout);
        }
        if (m->final) {
            *final = m;
            return 0;
        }
        vist2__v1__server_message__free_unpacked(m, NULL);
    }
}

static int failed(Vist2__V1__ServerMessage *m, const char *what) {
    if (m->body_case != VIST2__V1__SERVER_MESSAGE__BODY_ERROR) return 0;
    fprintf(stderr, "vist2_example: %s: error %d: %s\n", what, m->error->code, m->error->message);
    return 1;
}

int main(int argc, char **argv) {
    const char *sock = NULL;
    unsigned max_tokens = 32;
    int opt;
    while ((opt = getopt(argc, argv, "s:n:")) != -1) {
        if (opt == 's') sock = optarg;
        else if (opt == 'n') max_tokens = (unsigned)strtoul(optarg, NULL, 10);
        else {
            fprintf(stderr, "usage: %s [-s SOCKET] [-n MAX_TOKENS] FILE INSTRUCTION\n", argv[0]);
            return 2;
        }
    }
    if (argc - optind != 2) {
        fprintf(stderr, "usage: %s [-s SOCKET] [-n MAX_TOKENS] FILE INSTRUCTION\n", argv[0]);
        return 2;
    }
    size_t len = 0;
    char *text = read_file(argv[optind], &len);
    if (!text) {
        fprintf(stderr, "vist2_example: cannot read %s: %s\n", argv[optind], strerror(errno));
        return 1;
    }
    vist2_client *c = NULL;
    Vist2__V1__ServerMessage *hello = NULL;
    int rc = vist2_connect(sock, "vist2_example", &c, &hello);
    if (rc != 0) {
        fprintf(stderr, "vist2_example: cannot connect to %s: %s\n", sock ? sock : "the default socket", vist2_strerror(rc));
        free(text);
        return 1;
    }
    fprintf(stderr, "connected: %s, model %s (%s), L=%u, m=%u\n", hello->hello->server_version, hello->hello->model_name,
            hello->hello->model_fingerprint, hello->hello->chunk_length, hello->hello->visual_tokens);
    vist2__v1__server_message__free_unpacked(hello, NULL);

    /* Open the document. */
    Vist2__V1__OpenDocument open = VIST2__V1__OPEN_DOCUMENT__INIT;
    open.text = text;
    open.path = argv[optind];
    Vist2__V1__ClientMessage msg = VIST2__V1__CLIENT_MESSAGE__INIT;
    msg.request_id = vist2_next_id(c);
    msg.body_case = VIST2__V1__CLIENT_MESSAGE__BODY_OPEN_DOCUMENT;
    msg.open_document = &open;
    Vist2__V1__ServerMessage *reply = NULL;
    int status = 1;
    if ((rc = vist2_send(c, &msg)) != 0 || (rc = await_final(c, msg.request_id, &reply)) != 0) {
        fprintf(stderr, "vist2_example: %s\n", vist2_strerror(rc));
        goto out;
    }
    if (failed(reply, "open")) goto out;
    char *doc_id = strdup(reply->document->document_id);
    vist2__v1__server_message__free_unpacked(reply, NULL);
    reply = NULL;

    /* Stream a greedy generation over it. */
    Vist2__V1__Sampling sampling = VIST2__V1__SAMPLING__INIT;
    sampling.temperature = 0;
    sampling.top_p = 1;
    Vist2__V1__GenerateRequest gen = VIST2__V1__GENERATE_REQUEST__INIT;
    gen.n_document_ids = 1;
    gen.document_ids = &doc_id;
    gen.instruction = argv[optind + 1];
    gen.sampling = &sampling;
    gen.max_tokens = max_tokens;
    msg = (Vist2__V1__ClientMessage)VIST2__V1__CLIENT_MESSAGE__INIT;
    msg.request_id = vist2_next_id(c);
    msg.body_case = VIST2__V1__CLIENT_MESSAGE__BODY_GENERATE;
    msg.generate = &gen;
    if ((rc = vist2_send(c, &msg)) != 0 || (rc = await_final(c, msg.request_id, &reply)) != 0) {
        fprintf(stderr, "vist2_example: %s\n", vist2_strerror(rc));
        free(doc_id);
        goto out;
    }
    free(doc_id);
    if (failed(reply, "generate")) goto out;
    Vist2__V1__GenerateResult *r = reply->generate_result;
    printf("\n");
    fprintf(stderr, "generated %u tokens (%s); %u chunks as %u visual tokens, ratio %.2f; cache: %u prefix hits, %u chunk hits, %u encoded\n",
            r->generated_tokens, r->stop_reason, r->chunks, r->visual_tokens, r->compression_ratio, r->prefix_cache_hits,
            r->chunk_cache_hits, r->chunks_encoded);
    status = r->generated_tokens > 0 ? 0 : 1;
out:
    if (reply) vist2__v1__server_message__free_unpacked(reply, NULL);
    vist2_close(c);
    free(text);
    return status;
}
