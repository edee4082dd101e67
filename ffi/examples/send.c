/* Sends a file (or gen:SIZE) to a dwcp receiver through libdwcp, with a progress line, and
 * prints the verified digest.
 *   cc -o send ffi/examples/send.c $(pkg-config --cflags --libs dwcp)
 *   ./send 10.0.0.2:7470 /vm/disk.img /etc/dwcp/key */
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include "dwcp.h"

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s HOST:PORT SOURCE KEY_FILE\n", argv[0]);
        return 2;
    }
    dwcp_send_options o;
    memset(&o, 0, sizeof o);           /* zero: every knob is the engine's choice */
    o.struct_size = sizeof o;
    o.to = argv[1];
    o.source = argv[2];
    o.key_file = argv[3];
    dwcp_transfer *t = NULL;
    if (dwcp_send_start(&o, &t) != DWCP_OK) {   /* probes and plans; t is ours to free */
        fprintf(stderr, "send: %s\n", dwcp_last_error());
        return 1;
    }
    dwcp_progress p;
    while (dwcp_transfer_progress(t, &p) == DWCP_OK && !p.finished) {
        fprintf(stderr, "\r%llu of %llu bytes", (unsigned long long)p.acked_bytes, (unsigned long long)p.total_bytes);
        usleep(200 * 1000);
    }
    dwcp_result r;
    dwcp_status st = dwcp_transfer_wait(t, &r);
    if (st == DWCP_OK)
        printf("\nverified: %llu bytes in %.2f s, digest %s\n", (unsigned long long)r.size, r.wall_seconds, r.digest);
    else
        fprintf(stderr, "\nsend failed (%d): %s\n", (int)st, dwcp_last_error());
    dwcp_transfer_free(t);
    return st == DWCP_OK ? 0 : 1;
}
