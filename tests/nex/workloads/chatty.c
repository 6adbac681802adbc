/*
 * A workload that floods its output, for nex's log budget tests (tests/nex/test_log_budget.py). Built with
 *     gcc -static -O2 -o chatty chatty.c
 * and run only as a workload (in a node's machine, or in the agent's launchpad), never on the host.
 *
 *     chatty N [WIDTH [STREAMS]]
 *
 * prints the lines 1, 2, ..., N as fast as it can, each its number padded with '.' to WIDTH characters
 * when WIDTH is larger (so a test can tell every line, and their order, from the text alone), then a
 * last line DONE, and exits 0. With STREAMS 2, odd lines go to stdout and even ones to stderr (DONE to
 * both), so a test can see that both streams share one budget. Output is written in large blocks, as a
 * program that floods its log would: stdio buffers a pipe fully, and stderr is given a buffer too.
 * It exits 2 on bad arguments, and 3 (or dies of SIGPIPE) if it cannot write: its reader went away.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static char err_buffer[1 << 16];

static long number(const char *text, long fallback) {
    char *end;
    long value;
    if (text == NULL) return fallback;
    value = strtol(text, &end, 10);
    if (*text == '\0' || *end != '\0' || value < 0) {
        fprintf(stderr, "chatty: not a number: %s\n", text);
        exit(2);
    }
    return value;
}

static void line(FILE *out, long n, long width) {
    int len = fprintf(out, "%ld", n);
    for (long i = len; i < width; i++) putc('.', out);
    if (putc('\n', out) == EOF) exit(3);
}

int main(int argc, char **argv) {
    long count = number(argc > 1 ? argv[1] : NULL, 1000);
    long width = number(argc > 2 ? argv[2] : NULL, 0);
    long streams = number(argc > 3 ? argv[3] : NULL, 1);
    setvbuf(stderr, err_buffer, _IOFBF, sizeof err_buffer);
    for (long n = 1; n <= count; n++) line(streams == 2 && n % 2 == 0 ? stderr : stdout, n, width);
    if (streams == 2 && fputs("DONE\n", stderr) == EOF) return 3;
    if (fputs("DONE\n", stdout) == EOF || fflush(stdout) == EOF || fflush(stderr) == EOF) return 3;
    return 0;
}
