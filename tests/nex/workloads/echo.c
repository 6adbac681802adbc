/*
 * A NATS echo service for nex's tests, as small as a NATS client can be (static, no libraries).
 *
 * Reads NATS_URL (nats://host:port), ECHO_SUBJECT and ECHO_PREFIX from its environment, subscribes to
 * the subject and answers every request with ECHO_PREFIX followed by the request's payload. It prints
 * one line to stdout when it is subscribed and one to stderr per request, so tests can watch its logs.
 * It exits 0 on SIGTERM and 3 when the server goes away. With ECHO_EXIT=N it prints a line and exits
 * with code N at once (a workload that fails). With ECHO_DAEMON=1 it first leaves a daemon behind: a
 * grandchild in a session of its own that prints one line and sleeps until killed.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

static char buf[1 << 16];
static size_t have;
static int fd = -1;

static void on_term(int sig) {
    (void)sig;
    _exit(0);
}

static int send_all(const char *data, size_t len) {
    while (len > 0) {
        ssize_t n = write(fd, data, len);
        if (n <= 0) return -1;
        data += n;
        len -= (size_t)n;
    }
    return 0;
}

/* One CRLF-terminated line from the socket into line (without CRLF); -1 when the connection ends. */
static int read_line(char *line, size_t cap) {
    for (;;) {
        char *end = memmem(buf, have, "\r\n", 2);
        if (end != NULL) {
            size_t len = (size_t)(end - buf);
            if (len >= cap) return -1;
            memcpy(line, buf, len);
            line[len] = 0;
            memmove(buf, end + 2, have - len - 2);
            have -= len + 2;
            return 0;
        }
        if (have == sizeof buf) return -1;
        ssize_t n = read(fd, buf + have, sizeof buf - have);
        if (n <= 0) return -1;
        have += (size_t)n;
    }
}

/* Exactly len bytes of payload and its CRLF. */
static int read_payload(char *out, size_t len) {
    while (have < len + 2) {
        if (have == sizeof buf) return -1;
        ssize_t n = read(fd, buf + have, sizeof buf - have);
        if (n <= 0) return -1;
        have += (size_t)n;
    }
    memcpy(out, buf, len);
    memmove(buf, buf + len + 2, have - len - 2);
    have -= len + 2;
    return 0;
}

static void leave_a_daemon(void) {
    int up[2];
    if (pipe(up) != 0) return;
    pid_t child = fork();
    if (child == 0) {
        setsid();
        if (fork() == 0) {
            printf("echo: daemon %d running\n", (int)getpid());
            fflush(stdout);
            close(up[1]);  /* it is up and has said so: the workload goes on */
            for (;;) pause();
        }
        _exit(0);
    }
    close(up[1]);
    char byte;
    while (read(up[0], &byte, 1) > 0) {
    }
    close(up[0]);
    waitpid(child, NULL, 0);
}

int main(int argc, char **argv) {
    if (getenv("ECHO_DAEMON") != NULL) leave_a_daemon();
    const char *code = getenv("ECHO_EXIT");
    if (code != NULL) {
        printf("echo: exiting with code %s (argv:", code);
        for (int i = 1; i < argc; i++) printf(" %s", argv[i]);
        printf(")\n");
        return atoi(code);
    }
    const char *url = getenv("NATS_URL");
    const char *subject = getenv("ECHO_SUBJECT");
    const char *prefix = getenv("ECHO_PREFIX");
    if (url == NULL || subject == NULL) {
        fprintf(stderr, "echo: NATS_URL and ECHO_SUBJECT must be set\n");
        return 2;
    }
    if (prefix == NULL) prefix = "";
    signal(SIGTERM, on_term);

    char host[256];
    int port = 4222;
    if (sscanf(url, "nats://%255[^:]:%d", host, &port) < 1) {
        fprintf(stderr, "echo: cannot parse NATS_URL %s\n", url);
        return 2;
    }
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port)};
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) {
        fprintf(stderr, "echo: NATS_URL needs an IPv4 address, not %s\n", host);
        return 2;
    }
    fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
        perror("echo: connect");
        return 3;
    }

    static char line[4096], payload[1 << 15], out[1 << 16];
    if (read_line(line, sizeof line) != 0 || strncmp(line, "INFO ", 5) != 0) {
        fprintf(stderr, "echo: no INFO from the server\n");
        return 3;
    }
    int n = snprintf(out, sizeof out,
                     "CONNECT {\"verbose\":false,\"pedantic\":false,\"name\":\"echo\"}\r\nSUB %s 1\r\nPING\r\n", subject);
    if (send_all(out, (size_t)n) != 0) return 3;
    for (;;) {
        if (read_line(line, sizeof line) != 0) return 3;
        if (strcmp(line, "PONG") == 0) break;
        if (strncmp(line, "-ERR", 4) == 0) {
            fprintf(stderr, "echo: server said %s\n", line);
            return 3;
        }
    }
    printf("echo: answering on %s\n", subject);
    fflush(stdout);

    for (;;) {
        if (read_line(line, sizeof line) != 0) return 3;
        if (strcmp(line, "PING") == 0) {
            if (send_all("PONG\r\n", 6) != 0) return 3;
            continue;
        }
        if (strncmp(line, "MSG ", 4) != 0) continue;
        char subj[512], sid[32], reply[512];
        size_t len = 0;
        int fields = sscanf(line + 4, "%511s %31s %511s %zu", subj, sid, reply, &len);
        if (fields == 3) { /* no reply subject: the third field was the size */
            len = (size_t)strtoul(reply, NULL, 10);
            reply[0] = 0;
        } else if (fields != 4) {
            return 3;
        }
        if (len >= sizeof payload || read_payload(payload, len) != 0) return 3;
        if (reply[0] == 0) continue;
        size_t plen = strlen(prefix);
        int head = snprintf(out, sizeof out, "PUB %s %zu\r\n", reply, plen + len);
        memcpy(out + head, prefix, plen);
        memcpy(out + head + plen, payload, len);
        memcpy(out + head + plen + len, "\r\n", 2);
        if (send_all(out, (size_t)head + plen + len + 2) != 0) return 3;
        fprintf(stderr, "echo: answered %zu bytes\n", len);
    }
}
