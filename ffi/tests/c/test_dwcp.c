/* The C test of libdwcp, run by tests/c_abi.rs: a real loopback transfer between a receiver
 * and a sender both driven through the C ABI, a wrong key, and a cancel.
 * Usage: test_dwcp KEY OTHER_KEY OUT_DIR */
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include "dwcp.h"

#define CHECK(cond, ...) do { if (!(cond)) { fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); fprintf(stderr, __VA_ARGS__); fprintf(stderr, " (last error: %s)\n", dwcp_last_error()); return 1; } } while (0)

static dwcp_send_options send_opts(const char *to, const char *source, const char *name, const char *key) {
    dwcp_send_options o;
    memset(&o, 0, sizeof o);
    o.struct_size = sizeof o;
    o.to = to;
    o.source = source;
    o.name = name;
    o.key_file = key;
    o.streams = 2;
    return o;
}

int main(int argc, char **argv) {
    CHECK(argc == 4, "usage: test_dwcp KEY OTHER_KEY OUT_DIR");
    const char *key = argv[1], *other = argv[2], *out = argv[3];
    printf("libdwcp %s\n", dwcp_version());

    dwcp_recv_options ro;
    memset(&ro, 0, sizeof ro);
    ro.struct_size = sizeof ro;
    ro.listen = "127.0.0.1:0";
    ro.out_dir = out;
    ro.key_file = key;
    dwcp_receiver *rx = NULL;
    CHECK(dwcp_recv_start(&ro, &rx) == DWCP_OK && rx, "receiver");
    char to[64];
    snprintf(to, sizeof to, "127.0.0.1:%u", (unsigned)dwcp_receiver_port(rx));

    /* 1. A real transfer: verified at both ends, the result and the JSON outcome filled. */
    dwcp_send_options so = send_opts(to, "gen:16MiB:3", "c.img", key);
    dwcp_transfer *t = NULL;
    CHECK(dwcp_send_start(&so, &t) == DWCP_OK && t, "send start");
    dwcp_result r;
    CHECK(dwcp_transfer_wait(t, &r) == DWCP_OK, "send");
    CHECK(r.verified == 1 && r.size == 16u << 20 && strlen(r.digest) == 64, "result: verified %u size %llu digest %s", r.verified, (unsigned long long)r.size, r.digest);
    CHECK(dwcp_transfer_wait(t, &r) == DWCP_E_STATE, "a second wait is refused");
    const char *json = dwcp_transfer_json(t);
    CHECK(json && strstr(json, "\"verified\":true") && strstr(json, "\"plan\""), "outcome json: %s", json ? json : "(null)");
    dwcp_progress p;
    CHECK(dwcp_transfer_progress(t, &p) == DWCP_OK && p.finished == 1 && p.acked_bytes == 16u << 20, "progress after the end: %llu", (unsigned long long)p.acked_bytes);
    dwcp_transfer_free(t);
    dwcp_session s;
    CHECK(dwcp_receiver_next(rx, 10000, &s) == DWCP_OK && s.verified == 1 && strcmp(s.name, "c.img") == 0, "receiver session %s", s.name);
    printf("transfer: %llu bytes in %.3f s, digest %s\n", (unsigned long long)r.size, r.wall_seconds, r.digest);

    /* 2. A wrong key: refused as such, with a message. */
    so = send_opts(to, "gen:1MiB", "wrong.img", other);
    t = NULL;
    dwcp_status st = dwcp_send_start(&so, &t);
    CHECK(st == DWCP_E_AUTH && t == NULL, "wrong key gave %d", (int)st);
    CHECK(strstr(dwcp_last_error(), "wrong key") != NULL, "the message names the likely cause");
    printf("wrong key: %s\n", dwcp_last_error());

    /* 3. Cancelled mid-transfer: DWCP_E_CANCELLED, and the receiver publishes nothing. */
    so = send_opts(to, "gen:4GiB", "cancelled.img", key);
    so.streams = 1;
    CHECK(dwcp_send_start(&so, &t) == DWCP_OK, "send start (cancel)");
    for (int i = 0; i < 2000; i++) {
        CHECK(dwcp_transfer_progress(t, &p) == DWCP_OK, "progress");
        if (p.acked_bytes > 0) break;
        usleep(5000);
    }
    CHECK(p.acked_bytes > 0 && p.finished == 0, "it moved bytes before the cancel");
    CHECK(dwcp_transfer_cancel(t) == DWCP_OK, "cancel");
    st = dwcp_transfer_wait(t, &r);
    CHECK(st == DWCP_E_CANCELLED, "a cancelled wait gave %d", (int)st);
    printf("cancelled: %s\n", dwcp_last_error());
    dwcp_transfer_free(t);
    st = dwcp_receiver_next(rx, 10000, &s);
    CHECK(st == DWCP_E_RECEIVER && s.verified == 0 && strcmp(s.name, "cancelled.img") == 0, "the receiver's session failed: %d %s", (int)st, s.name);

    /* 4. Misuse is refused, not followed. */
    CHECK(dwcp_send_start(NULL, &t) == DWCP_E_INVALID, "NULL options");
    CHECK(dwcp_transfer_cancel(NULL) == DWCP_E_INVALID, "NULL handle");
    dwcp_transfer_free(NULL);
    dwcp_receiver_free(rx);
    printf("ok\n");
    return 0;
}
