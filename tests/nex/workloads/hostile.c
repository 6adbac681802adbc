/*
 * A hostile tenant for nex's tests: it tries, one by one, what a workload that wants out of its
 * sandbox would try, and says for each attack whether it worked. Built with
 *     gcc -static -O2 -pthread -o hostile hostile.c
 * and deployed both into the jail (every attack must fail) and onto an unjailed machine (no_sandbox,
 * where it runs as host root and the attacks succeed). So every attack that succeeds undoes itself at
 * once or is harmless by construction (the same hostname set again, the same byte written back, a
 * settimeofday that sets nothing, files unlinked as soon as they are made, bounded sleeps), except
 * `plant` and `journal`, which write only where the test tells them to, into paths the test owns and
 * cleans up.
 *
 * Protocol (stdout, line-buffered, one log message per line):
 *     ATTACK <name> <status> <detail>
 * with status OK (the attack worked: the protection failed), BLOCKED (it did not), SKIPPED (a
 * parameter was missing, or a precondition failed: the attack was not tried) or INFO (a measurement,
 * not an attack). After the last attack of the mode, one line DONE; the program then exits 0 unless
 * the mode says otherwise. Progress lines of the resource modes start with PROGRESS.
 *
 * Modes (argv[1]); parameters come from the environment, and a missing one skips its attack:
 *
 *   escape          read:<label> (READ_1..READ_9 = label=path), proc_pids (HOST_PIDS_MIN, HOST_PID),
 *                   proc_mem (MEM_PID), setns (HOST_PID), setns_init, mount, mknod, unshare,
 *                   unshare_user, ptrace, sethostname, settimeofday, init_module, finit_module, bpf,
 *                   keyctl, perf_event_open, userfaultfd, process_vm_readv, open_by_handle_at, vsock,
 *                   af_alg, uevent, socketpair, core_limit,
 *                   write:<label> (WRITE_1..WRITE_5 = label=path), stat:<label> (STAT_1..STAT_5 =
 *                   label=path), plant (PLANT_DIR, PLANT_NAME, PLANT_TARGET), journal (JOURNAL_DIR,
 *                   JOURNAL_RECORD), connect:<label> (CONNECT_1..CONNECT_5 = label=ip:port or
 *                   label=[ipv6]:port), caps (INFO: CapEff NoNewPrivs Seccomp uid=N workload_pid=N); then
 *                   DONE.
 *                   A read is OK if it got at least one byte (a directory: at least one name); a write
 *                   creates the file with O_EXCL and unlinks it at once; a connect (2 s timeout) is OK
 *                   when it connects or is refused (a host answered); a call into the kernel with
 *                   invalid arguments (init_module, finit_module, open_by_handle_at) is BLOCKED only
 *                   on EPERM, since any other answer means the call got past seccomp and capabilities.
 *                   An unset slot of a numbered family (READ_4 when only READ_1..READ_3 are given) is
 *                   silently left out: it has no label to report under.
 *                   Each attack runs in a child process of its own, so that an attack which changes
 *                   the process (setns, unshare) does not change what the next one measures, and so
 *                   that an attack killed by the kernel (SIGSYS from a seccomp filter, say) is still
 *                   reported: as BLOCKED, "killed by SIG...". An attack that hangs is killed after
 *                   ATTACK_TIMEOUT seconds and reported as BLOCKED, "timed out".
 *   escape_pidns    with HOST_PID and ESCAPE_PIDFILE: a helper enters /proc/<HOST_PID>/ns/pid (setns
 *                   CLONE_NEWPID) and forks a child there, in a session of its own, which writes its
 *                   getpid() to ESCAPE_PIDFILE, prints ATTACK pidns_child OK pid=<n>, and lives at most
 *                   60 s, its stdio on /dev/null. Otherwise ATTACK pidns_child BLOCKED <errno>. Then
 *                   DONE, and the program sleeps until it is stopped.
 *   memory <MiB>    allocates and touches 1 MiB at a time up to MiB (PROGRESS allocated <n> every 16);
 *                   ATTACK memory OK allocated <n> MiB (or BLOCKED when malloc fails first).
 *   forkbomb <max>  forks children that sleep (60 s at most) until fork fails or max is reached;
 *                   ATTACK forkbomb <OK|BLOCKED> forked=<n> errno=<name>; kills and reaps them all.
 *   cpu <seconds>   four threads spin for that many wall seconds;
 *                   ATTACK cpu INFO cpu_seconds=<user+sys> wall=<s> ratio=<cpu/wall>.
 *   cpu forever     the same until killed, with PROGRESS cpu ratio=<r> every second (no DONE).
 *   sockmem <MiB>   fills TCP loopback connections of its own and never reads them, up to MiB (1024
 *                   at most): ATTACK sockmem <OK|BLOCKED> held=<MiB> connections=<n> errno=<name>.
 *   disk <MiB>      writes 1 MiB blocks of zeros to ./nex-hostile-fill (/tmp/nex-hostile-fill where
 *                   the working directory is not writable) until a write fails or MiB are written,
 *                   fsyncs, ATTACK disk <OK|BLOCKED> written=<MiB> errno=<name>, and unlinks the file.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/bpf.h>
#include <linux/keyctl.h>
#include <linux/if_alg.h>
#include <linux/netlink.h>
#include <linux/perf_event.h>
#include <linux/vm_sockets.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MIB (1024 * 1024)
#define ATTACK_TIMEOUT 15     /* seconds an attack child may take before it is killed */
#define CONNECT_TIMEOUT_MS 2000
#define ESCAPEE_LIFETIME 60   /* seconds the escaped child of escape_pidns lives, at most */
#define FORKBOMB_LIFETIME 60  /* seconds a fork-bomb child lives, at most */

/* ------------------------------------------------------------------------------------------------
 * Output
 * ------------------------------------------------------------------------------------------------ */

static int reported; /* set by report(): an attack child that said nothing exits non-zero */

/* One ATTACK line; the detail is kept on one line whatever it contains. */
__attribute__((format(printf, 3, 4))) static void report(const char *name, const char *status, const char *fmt, ...) {
    char detail[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(detail, sizeof detail, fmt, ap);
    va_end(ap);
    for (char *c = detail; *c != 0; c++)
        if (*c == '\n' || *c == '\r') *c = ' ';
    printf("ATTACK %s %s %s\n", name, status, detail);
    fflush(stdout);
    reported = 1;
}

/* "EPERM" for EPERM: the symbolic name of an errno value. */
static const char *errname(int err) {
    if (err == 0) return "none";
    const char *name = strerrorname_np(err);
    return name != NULL ? name : "E?";
}

/* An ATTACK line whose detail is an errno: "[what: ]ENAME (description)". */
static void report_err(const char *name, const char *status, const char *what, int err) {
    if (what != NULL)
        report(name, status, "%s: %s (%s)", what, errname(err), strerror(err));
    else
        report(name, status, "%s (%s)", errname(err), strerror(err));
}

/* "SYS" for SIGSYS. */
static const char *signame(int sig) {
    const char *name = sigabbrev_np(sig);
    return name != NULL ? name : "?";
}

static void done(void) {
    printf("DONE\n");
    fflush(stdout);
}

/* ------------------------------------------------------------------------------------------------
 * Parameters
 * ------------------------------------------------------------------------------------------------ */

/* The environment variable, or NULL after reporting the attack as skipped. */
static const char *need(const char *name, const char *var) {
    const char *value = getenv(var);
    if (value == NULL || value[0] == 0) report(name, "SKIPPED", "missing %s", var);
    return value != NULL && value[0] != 0 ? value : NULL;
}

/* A non-negative whole number: 0 on success, -1 if text is not one. */
static int parse_number(const char *text, long *out) {
    char *end;
    errno = 0;
    long value = strtol(text, &end, 10);
    if (errno != 0 || end == text || *end != 0 || value < 0) return -1;
    *out = value;
    return 0;
}

/* The environment variable as a number; 0 after reporting the attack as skipped. */
static int need_number(const char *name, const char *var, long *out) {
    const char *text = need(name, var);
    if (text == NULL) return 0;
    if (parse_number(text, out) != 0) {
        report(name, "SKIPPED", "%s is not a number: %s", var, text);
        return 0;
    }
    return 1;
}

/* The directory that mount and mknod work in: the working directory if a file can be made there,
 * else /tmp, else NULL. Chosen once, by the parent, before the attacks. */
static const char *scratch;

static const char *pick_scratch(void) {
    static const char *const candidates[] = {".", "/tmp"};
    for (size_t i = 0; i < sizeof candidates / sizeof candidates[0]; i++) {
        char probe[PATH_MAX];
        snprintf(probe, sizeof probe, "%s/nex-hostile-probe.%d", candidates[i], (int)getpid());
        int fd = open(probe, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
        if (fd < 0) continue;
        close(fd);
        unlink(probe);
        return candidates[i];
    }
    return NULL;
}

/* ------------------------------------------------------------------------------------------------
 * Families: one attack per label=value variable (READ_1 ... READ_9 and so on)
 * ------------------------------------------------------------------------------------------------ */

static void attack_read(const char *name, const char *path) {
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
    if (fd < 0) {
        report_err(name, "BLOCKED", "open", errno);
        return;
    }
    struct stat st;
    if (fstat(fd, &st) == 0 && S_ISDIR(st.st_mode)) {
        /* a directory has no bytes to read: listing a name in it is the leak */
        DIR *dir = fdopendir(fd);
        if (dir == NULL) {
            report_err(name, "BLOCKED", "opendir", errno);
            close(fd);
            return;
        }
        long names = 0;
        struct dirent *entry;
        while ((entry = readdir(dir)) != NULL)
            if (strcmp(entry->d_name, ".") != 0 && strcmp(entry->d_name, "..") != 0) names++;
        closedir(dir);
        report(name, names > 0 ? "OK" : "BLOCKED", "directory, listed %ld entries", names);
        return;
    }
    char buf[64];
    ssize_t n = read(fd, buf, sizeof buf);
    int err = errno;
    close(fd);
    if (n > 0)
        report(name, "OK", "read %zd bytes", n);
    else if (n == 0)
        report(name, "BLOCKED", "opened, but read 0 bytes");
    else
        report_err(name, "BLOCKED", "read", err);
}

static void attack_write(const char *name, const char *path) {
    /* O_EXCL: only a file this call created is ever unlinked */
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0) {
        report_err(name, "BLOCKED", "open", errno);
        return;
    }
    close(fd);
    if (unlink(path) == 0)
        report(name, "OK", "created the file (removed again)");
    else
        report(name, "OK", "created the file; unlink failed: %s", errname(errno));
}

static void attack_stat(const char *name, const char *path) {
    struct stat st;
    if (stat(path, &st) != 0) {
        report_err(name, "BLOCKED", "stat", errno);
        return;
    }
    report(name, "OK", "exists (%s)", S_ISDIR(st.st_mode) ? "directory" : S_ISREG(st.st_mode) ? "file" : "other");
}

/* "1.2.3.4:80" or "[::1]:80" into an address; -1 if it is neither. */
static int parse_endpoint(const char *text, struct sockaddr_storage *addr, socklen_t *len) {
    char host[128];
    const char *colon = strrchr(text, ':');
    if (colon == NULL || (size_t)(colon - text) >= sizeof host) return -1;
    memcpy(host, text, (size_t)(colon - text));
    host[colon - text] = 0;
    long port;
    if (parse_number(colon + 1, &port) != 0 || port < 1 || port > 65535) return -1;
    memset(addr, 0, sizeof *addr);
    size_t hlen = strlen(host);
    if (hlen >= 2 && host[0] == '[' && host[hlen - 1] == ']') {
        struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)addr;
        host[hlen - 1] = 0;
        if (inet_pton(AF_INET6, host + 1, &in6->sin6_addr) != 1) return -1;
        in6->sin6_family = AF_INET6;
        in6->sin6_port = htons((unsigned short)port);
        *len = sizeof *in6;
        return 0;
    }
    struct sockaddr_in *in = (struct sockaddr_in *)addr;
    if (inet_pton(AF_INET, host, &in->sin_addr) != 1) return -1;
    in->sin_family = AF_INET;
    in->sin_port = htons((unsigned short)port);
    *len = sizeof *in;
    return 0;
}

/* A TCP connect with a timeout. A refusal counts as OK: the packet got out, and a host answered. */
static void attack_connect(const char *name, const char *endpoint) {
    struct sockaddr_storage addr;
    socklen_t len;
    if (parse_endpoint(endpoint, &addr, &len) != 0) {
        report(name, "SKIPPED", "not ip:port: %s", endpoint);
        return;
    }
    int fd = socket(addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        report_err(name, "BLOCKED", "socket", errno);
        return;
    }
    int err = 0;
    if (connect(fd, (struct sockaddr *)&addr, len) != 0) {
        err = errno;
        if (err == EINPROGRESS) {
            struct pollfd pfd = {.fd = fd, .events = POLLOUT};
            int ready = poll(&pfd, 1, CONNECT_TIMEOUT_MS);
            if (ready == 0) {
                close(fd);
                report(name, "BLOCKED", "timeout after %d ms", CONNECT_TIMEOUT_MS);
                return;
            }
            socklen_t elen = sizeof err;
            if (ready < 0)
                err = errno;
            else if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &elen) != 0)
                err = errno;
        }
    }
    close(fd);
    if (err == 0)
        report(name, "OK", "connected");
    else if (err == ECONNREFUSED)
        report(name, "OK", "refused: the packet reached a host that answered (%s)", errname(err));
    else
        report_err(name, "BLOCKED", NULL, err);
}

/* ------------------------------------------------------------------------------------------------
 * The host's processes
 * ------------------------------------------------------------------------------------------------ */

static void attack_proc_pids(const char *name) {
    const char *min_text = getenv("HOST_PIDS_MIN");
    const char *host_text = getenv("HOST_PID");
    long min = -1, host = -1;
    if (min_text != NULL && parse_number(min_text, &min) != 0) min = -1;
    if (host_text != NULL && parse_number(host_text, &host) != 0) host = -1;
    if (min < 0 && host < 0) {
        report(name, "SKIPPED", "missing HOST_PIDS_MIN and HOST_PID");
        return;
    }
    DIR *proc = opendir("/proc");
    if (proc == NULL) {
        report_err(name, "BLOCKED", "opendir /proc", errno);
        return;
    }
    long count = 0;
    struct dirent *entry;
    while ((entry = readdir(proc)) != NULL)
        if (entry->d_name[0] != 0 && strspn(entry->d_name, "0123456789") == strlen(entry->d_name)) count++;
    closedir(proc);
    int host_seen = 0;
    if (host > 0) {
        char path[64];
        struct stat st;
        snprintf(path, sizeof path, "/proc/%ld", host);
        host_seen = stat(path, &st) == 0;
    }
    int ok = (min >= 0 && count > min) || host_seen;
    report(name, ok ? "OK" : "BLOCKED", "count=%ld host_pid=%s", count,
           host <= 0 ? "unset" : host_seen ? "visible" : "absent");
}

/* Write access to another process's memory: the same byte is read and written back, nothing else. */
static void attack_proc_mem(const char *name) {
    long pid;
    if (!need_number(name, "MEM_PID", &pid)) return;
    char path[64];
    snprintf(path, sizeof path, "/proc/%ld/mem", pid);
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        report_err(name, "BLOCKED", "open mem", errno);
        return;
    }
    snprintf(path, sizeof path, "/proc/%ld/maps", pid);
    FILE *maps = fopen(path, "re");
    if (maps == NULL) {
        int err = errno;
        close(fd);
        report_err(name, "BLOCKED", "mem opened read-write, but maps", err);
        return;
    }
    unsigned long long start = 0, end = 0;
    int found = 0;
    char *line = NULL;
    size_t cap = 0;
    while (!found && getline(&line, &cap, maps) > 0) {
        char perms[8];
        if (sscanf(line, "%llx-%llx %7s", &start, &end, perms) == 3 && perms[0] == 'r' && perms[1] == 'w' &&
            perms[3] == 'p' && start <= (unsigned long long)INT64_MAX)
            found = 1;
    }
    free(line);
    fclose(maps);
    if (!found) {
        close(fd);
        report(name, "BLOCKED", "mem opened read-write, but no writable mapping found");
        return;
    }
    unsigned char byte;
    if (pread(fd, &byte, 1, (off_t)start) != 1) {
        int err = errno;
        close(fd);
        report_err(name, "BLOCKED", "pread", err);
        return;
    }
    ssize_t written = pwrite(fd, &byte, 1, (off_t)start); /* the very byte that is there */
    int err = errno;
    close(fd);
    if (written == 1)
        report(name, "OK", "wrote pid %ld's memory at 0x%llx (the same byte back)", pid, start);
    else
        report_err(name, "BLOCKED", "pwrite", err);
}

static void attack_ptrace(const char *name) {
    pid_t parent = getpid();
    pid_t child = fork();
    if (child < 0) {
        report_err(name, "SKIPPED", "fork", errno);
        return;
    }
    if (child == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() == parent) sleep(ATTACK_TIMEOUT);
        _exit(0);
    }
    long result = ptrace(PTRACE_SEIZE, child, NULL, NULL);
    int err = errno;
    if (result == 0) ptrace(PTRACE_DETACH, child, NULL, NULL); /* may say ESRCH (not stopped): it is killed next */
    kill(child, SIGKILL);
    while (waitpid(child, NULL, 0) < 0 && errno == EINTR) {
    }
    if (result == 0)
        report(name, "OK", "PTRACE_SEIZE of its own child worked");
    else
        report_err(name, "BLOCKED", "PTRACE_SEIZE", err);
}

static void attack_process_vm_readv(const char *name) {
    char mine[1] = {'x'}, copy[1] = {0}; /* one byte of its own stack */
    struct iovec local = {.iov_base = copy, .iov_len = 1};
    struct iovec remote = {.iov_base = mine, .iov_len = 1};
    ssize_t n = process_vm_readv(getpid(), &local, 1, &remote, 1, 0);
    if (n == 1)
        report(name, "OK", "read 1 byte of its own memory (the syscall is available)");
    else
        report_err(name, "BLOCKED", NULL, errno);
}

/* ------------------------------------------------------------------------------------------------
 * Namespaces and the mount table (each in a child of its own: see run_isolated)
 * ------------------------------------------------------------------------------------------------ */

/* Enter the namespace at path; the detail says whether it is another one than its own. */
static void try_setns(const char *name, const char *path, const char *own, int nstype) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        report_err(name, "BLOCKED", "open", errno);
        return;
    }
    struct stat theirs, mine;
    const char *which = "unknown namespace";
    if (fstat(fd, &theirs) == 0 && stat(own, &mine) == 0)
        which = theirs.st_ino == mine.st_ino && theirs.st_dev == mine.st_dev ? "its own namespace" : "another namespace";
    int result = setns(fd, nstype);
    int err = errno;
    close(fd);
    if (result == 0)
        report(name, "OK", "entered %s (%s)", path, which);
    else
        report_err(name, "BLOCKED", "setns", err);
}

static void attack_setns(const char *name) {
    long pid;
    if (!need_number(name, "HOST_PID", &pid)) return;
    char path[64];
    snprintf(path, sizeof path, "/proc/%ld/ns/net", pid);
    try_setns(name, path, "/proc/self/ns/net", CLONE_NEWNET);
}

static void attack_setns_init(const char *name) {
    try_setns(name, "/proc/1/ns/mnt", "/proc/self/ns/mnt", 0);
}

static void try_unshare(const char *name, int flags) {
    if (unshare(flags) == 0)
        report(name, "OK", "unshare worked (for itself only)");
    else
        report_err(name, "BLOCKED", NULL, errno);
}

static void attack_unshare(const char *name) {
    try_unshare(name, CLONE_NEWNS);
}

static void attack_unshare_user(const char *name) {
    try_unshare(name, CLONE_NEWUSER);
}

/* A tmpfs on a directory it has just made itself (never on one that was there), unmounted at once. */
static void attack_mount(const char *name) {
    if (scratch == NULL) {
        report(name, "SKIPPED", "no writable directory (neither the working directory nor /tmp)");
        return;
    }
    char dir[PATH_MAX];
    snprintf(dir, sizeof dir, "%s/nex-hostile-mnt", scratch);
    if (mkdir(dir, 0700) != 0 && (errno != EEXIST || rmdir(dir) != 0 || mkdir(dir, 0700) != 0)) {
        report_err(name, "SKIPPED", "mkdir", errno);
        return;
    }
    if (mount("none", dir, "tmpfs", 0, "size=1m") == 0) {
        int unmounted = umount2(dir, 0) == 0 || umount2(dir, MNT_DETACH) == 0;
        int err = errno;
        if (unmounted)
            report(name, "OK", "mounted a tmpfs on %s (unmounted again)", dir);
        else
            report(name, "OK", "mounted a tmpfs on %s; UNMOUNT FAILED: %s", dir, errname(err));
    } else {
        report_err(name, "BLOCKED", "mount", errno);
    }
    rmdir(dir);
}

/* /dev/null's device number, unlinked at once. */
static void attack_mknod(const char *name) {
    if (scratch == NULL) {
        report(name, "SKIPPED", "no writable directory (neither the working directory nor /tmp)");
        return;
    }
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/nex-hostile-null", scratch);
    struct stat st;
    if (lstat(path, &st) == 0 && S_ISCHR(st.st_mode)) unlink(path); /* a leftover of its own */
    if (mknod(path, S_IFCHR | 0600, makedev(1, 3)) == 0) {
        unlink(path);
        report(name, "OK", "made a character device (removed again)");
    } else {
        report_err(name, "BLOCKED", "mknod", errno);
    }
}

/* ------------------------------------------------------------------------------------------------
 * The host's identity and clock: harmless even where they work
 * ------------------------------------------------------------------------------------------------ */

static void attack_sethostname(const char *name) {
    char host[HOST_NAME_MAX + 1] = {0};
    if (gethostname(host, sizeof host - 1) != 0) {
        report_err(name, "SKIPPED", "gethostname", errno);
        return;
    }
    if (sethostname(host, strlen(host)) == 0) { /* the same name: nothing changes */
        report(name, "OK", "hostname=%s (set to itself)", host);
    } else {
        int err = errno;
        report(name, "BLOCKED", "%s (%s) hostname=%s", errname(err), strerror(err), host);
    }
}

static void attack_settimeofday(const char *name) {
    /* Both NULL: the kernel checks CAP_SYS_TIME and sets nothing. (glibc's wrapper would dereference
     * the NULL timeval, hence the raw syscall.) */
    if (syscall(SYS_settimeofday, NULL, NULL) == 0)
        report(name, "OK", "settimeofday(NULL, NULL) was allowed");
    else
        report_err(name, "BLOCKED", NULL, errno);
}

/* ------------------------------------------------------------------------------------------------
 * The kernel's attack surface
 * ------------------------------------------------------------------------------------------------ */

/* For calls whose arguments are invalid anyway: only EPERM means the call was stopped before the
 * kernel looked at them (by seccomp or for want of a capability). */
static void reached_kernel(const char *name, long result, int err) {
    if (result >= 0)
        report(name, "OK", "returned %ld", result);
    else if (err == EPERM)
        report_err(name, "BLOCKED", NULL, err);
    else
        report(name, "OK", "reached the kernel: %s (%s)", errname(err), strerror(err));
}

static void attack_init_module(const char *name) {
    long result = syscall(SYS_init_module, NULL, 0UL, "");
    reached_kernel(name, result, errno);
}

static void attack_finit_module(const char *name) {
    long result = syscall(SYS_finit_module, -1, "", 0);
    reached_kernel(name, result, errno);
}

static void attack_open_by_handle_at(const char *name) {
    static char space[sizeof(struct file_handle) + MAX_HANDLE_SZ] __attribute__((aligned(8)));
    memset(space, 0, sizeof space); /* an empty handle: invalid, if the kernel gets to look at it */
    long result = open_by_handle_at(AT_FDCWD, (struct file_handle *)space, O_RDONLY);
    int err = errno;
    if (result >= 0) close((int)result);
    reached_kernel(name, result, err);
}

/* A syscall that returns a descriptor on success: OK with it (closed at once). */
static void report_fd(const char *name, long fd, int err, const char *what) {
    if (fd >= 0) {
        close((int)fd);
        report(name, "OK", "%s", what);
    } else {
        report_err(name, "BLOCKED", NULL, err);
    }
}

static void attack_bpf(const char *name) {
    union bpf_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.map_type = BPF_MAP_TYPE_ARRAY;
    attr.key_size = 4;
    attr.value_size = 4;
    attr.max_entries = 1;
    long fd = syscall(SYS_bpf, BPF_MAP_CREATE, &attr, sizeof attr);
    report_fd(name, fd, errno, "created an array map");
}

static void attack_keyctl(const char *name) {
    long id = syscall(SYS_keyctl, KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0);
    if (id >= 0)
        report(name, "OK", "session keyring id %ld", id);
    else
        report_err(name, "BLOCKED", NULL, errno);
}

static void attack_perf_event_open(const char *name) {
    struct perf_event_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.type = PERF_TYPE_SOFTWARE;
    attr.size = sizeof attr;
    attr.config = PERF_COUNT_SW_TASK_CLOCK;
    attr.disabled = 1;
    attr.exclude_kernel = 1; /* what the least privileged perf_event_paranoid setting still allows */
    attr.exclude_hv = 1;
    long fd = syscall(SYS_perf_event_open, &attr, 0, -1, -1, PERF_FLAG_FD_CLOEXEC);
    report_fd(name, fd, errno, "opened a task-clock counter on itself");
}

static void attack_userfaultfd(const char *name) {
    long fd = syscall(SYS_userfaultfd, 0);
    report_fd(name, fd, errno, "got a userfaultfd");
}

/* Sockets past the network namespace and the fence (a red team's findings): vsock has no network
 * namespaces (the hypervisor, other guests); AF_ALG is the kernel's crypto API (CVE-2026-31431).
 * Neither is in every kernel, so only EPERM counts as stopped. The uevent stream shows the host's
 * devices. Each socket is only opened, and closed at once. */
static void attack_vsock(const char *name) {
    long fd = socket(AF_VSOCK, SOCK_STREAM, 0); /* a host without vsock answers EAFNOSUPPORT */
    int err = errno;
    if (fd >= 0) close((int)fd);
    reached_kernel(name, fd, err);
}

static void attack_af_alg(const char *name) {
    long fd = socket(AF_ALG, SOCK_SEQPACKET, 0);
    int err = errno;
    if (fd >= 0) close((int)fd);
    reached_kernel(name, fd, err);
}

/* socketpair makes the family's socket (loading its module) before it can refuse: the same families
 * must be closed there (a reviewer's finding: TIPC pairs work where only socket() is filtered). */
static void attack_socketpair(const char *name) {
    int pair[2];
    long result = socketpair(AF_TIPC, SOCK_SEQPACKET, 0, pair);
    int err = errno;
    if (result == 0) {
        close(pair[0]);
        close(pair[1]);
    }
    reached_kernel(name, result, err);
}

static void attack_uevent(const char *name) {
    long fd = socket(AF_NETLINK, SOCK_DGRAM, NETLINK_KOBJECT_UEVENT);
    report_fd(name, fd, errno, "opened the kernel's uevent socket");
}

/* Lowering its core-size limit to 0: with a core_pattern that pipes to a helper, the kernel runs the
 * helper as host root for any core but one limited to exactly 1 byte. Only its own limit changes. */
static void attack_core_limit(const char *name) {
    struct rlimit zero = {0, 0};
    if (setrlimit(RLIMIT_CORE, &zero) == 0)
        report(name, "OK", "set its core size limit to 0");
    else
        report_err(name, "BLOCKED", "setrlimit", errno);
}

/* ------------------------------------------------------------------------------------------------
 * Planting files where the test lets it (the test checks them and removes them)
 * ------------------------------------------------------------------------------------------------ */

static void attack_plant(const char *name) {
    const char *dir, *file, *target;
    if ((dir = need(name, "PLANT_DIR")) == NULL || (file = need(name, "PLANT_NAME")) == NULL ||
        (target = need(name, "PLANT_TARGET")) == NULL)
        return;
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/%s", dir, file);
    if (symlink(target, path) == 0)
        report(name, "OK", "planted a symlink %s -> %s", path, target);
    else
        report_err(name, "BLOCKED", "symlink", errno);
}

static void attack_journal(const char *name) {
    const char *dir, *record;
    if ((dir = need(name, "JOURNAL_DIR")) == NULL || (record = need(name, "JOURNAL_RECORD")) == NULL) return;
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/0-0-0-planted.json", dir);
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
    if (fd < 0) {
        report_err(name, "BLOCKED", "open", errno);
        return;
    }
    size_t len = strlen(record), done_bytes = 0;
    while (done_bytes < len) {
        ssize_t n = write(fd, record + done_bytes, len - done_bytes);
        if (n <= 0) break;
        done_bytes += (size_t)n;
    }
    int err = errno;
    close(fd);
    if (done_bytes == len) {
        report(name, "OK", "wrote %zu bytes to %s", len, path);
    } else {
        unlink(path); /* half a record is no use to anyone */
        report_err(name, "BLOCKED", "write", err);
    }
}

/* ------------------------------------------------------------------------------------------------
 * What it is allowed
 * ------------------------------------------------------------------------------------------------ */

static void attack_caps(const char *name) {
    char cap_eff[64] = "?", nnp[16] = "?", seccomp[16] = "?";
    FILE *status = fopen("/proc/self/status", "re");
    if (status != NULL) {
        char line[256];
        while (fgets(line, sizeof line, status) != NULL) {
            sscanf(line, "CapEff: %63s", cap_eff);
            sscanf(line, "NoNewPrivs: %15s", nnp);
            sscanf(line, "Seccomp: %15s", seccomp);
        }
        fclose(status);
    }
    /* the attack's parent is the workload itself: pid 1 when it is its PID namespace's init */
    report(name, "INFO", "%s %s %s uid=%d workload_pid=%d", cap_eff, nnp, seccomp, (int)getuid(), (int)getppid());
}

/* ------------------------------------------------------------------------------------------------
 * Mode escape
 * ------------------------------------------------------------------------------------------------ */

typedef void (*single_fn)(const char *name);
typedef void (*family_fn)(const char *name, const char *value);

/* Run one attack in a child of its own and wait for it; report for it if it dies without a word. */
static void run_isolated(const char *name, single_fn single, family_fn family, const char *value) {
    fflush(stdout);
    pid_t child = fork();
    if (child < 0) {
        report_err(name, "SKIPPED", "fork", errno);
        return;
    }
    if (child == 0) {
        alarm(ATTACK_TIMEOUT);
        if (single != NULL)
            single(name);
        else
            family(name, value);
        fflush(stdout);
        _exit(reported ? 0 : 3);
    }
    int status;
    while (waitpid(child, &status, 0) < 0)
        if (errno != EINTR) {
            report_err(name, "SKIPPED", "waitpid", errno);
            return;
        }
    if (WIFSIGNALED(status) && WTERMSIG(status) == SIGALRM)
        report(name, "BLOCKED", "timed out after %d s", ATTACK_TIMEOUT);
    else if (WIFSIGNALED(status))
        report(name, "BLOCKED", "killed by SIG%s", signame(WTERMSIG(status)));
    else if (WEXITSTATUS(status) != 0)
        report(name, "BLOCKED", "the attack's process exited %d without a result", WEXITSTATUS(status));
}

/* Every PREFIX_<n> that is set, as label=value: attack "<kind>:<label>" on value. */
static void run_family(const char *kind, const char *prefix, int count, family_fn fn) {
    for (int i = 1; i <= count; i++) {
        char var[32], name[160];
        snprintf(var, sizeof var, "%s_%d", prefix, i);
        const char *entry = getenv(var);
        if (entry == NULL || entry[0] == 0) continue;
        const char *eq = strchr(entry, '=');
        if (eq == NULL || eq == entry) {
            snprintf(name, sizeof name, "%s:%s", kind, var);
            report(name, "SKIPPED", "%s is not label=value", var);
            continue;
        }
        int label = (int)(eq - entry) < 120 ? (int)(eq - entry) : 120;
        snprintf(name, sizeof name, "%s:%.*s", kind, label, entry);
        for (char *c = name; *c != 0; c++) /* the name is one word */
            if (*c == ' ' || *c == '\t' || *c == '\n' || *c == '\r') *c = '_';
        run_isolated(name, NULL, fn, eq + 1);
    }
}

/* The attacks of mode escape, in order: a single attack, or a family of numbered variables. */
static const struct attack {
    const char *name;  /* the attack, or the family's kind */
    single_fn single;  /* a single attack */
    family_fn family;  /* or a family: ... */
    const char *prefix; /* ... over PREFIX_1 ... PREFIX_<count> */
    int count;
} attacks[] = {
    {"read", NULL, attack_read, "READ", 9},
    {"proc_pids", attack_proc_pids, NULL, NULL, 0},
    {"proc_mem", attack_proc_mem, NULL, NULL, 0},
    {"setns", attack_setns, NULL, NULL, 0},
    {"setns_init", attack_setns_init, NULL, NULL, 0},
    {"mount", attack_mount, NULL, NULL, 0},
    {"mknod", attack_mknod, NULL, NULL, 0},
    {"unshare", attack_unshare, NULL, NULL, 0},
    {"unshare_user", attack_unshare_user, NULL, NULL, 0},
    {"ptrace", attack_ptrace, NULL, NULL, 0},
    {"sethostname", attack_sethostname, NULL, NULL, 0},
    {"settimeofday", attack_settimeofday, NULL, NULL, 0},
    {"init_module", attack_init_module, NULL, NULL, 0},
    {"finit_module", attack_finit_module, NULL, NULL, 0},
    {"bpf", attack_bpf, NULL, NULL, 0},
    {"keyctl", attack_keyctl, NULL, NULL, 0},
    {"perf_event_open", attack_perf_event_open, NULL, NULL, 0},
    {"userfaultfd", attack_userfaultfd, NULL, NULL, 0},
    {"process_vm_readv", attack_process_vm_readv, NULL, NULL, 0},
    {"open_by_handle_at", attack_open_by_handle_at, NULL, NULL, 0},
    {"vsock", attack_vsock, NULL, NULL, 0},
    {"af_alg", attack_af_alg, NULL, NULL, 0},
    {"uevent", attack_uevent, NULL, NULL, 0},
    {"socketpair", attack_socketpair, NULL, NULL, 0},
    {"core_limit", attack_core_limit, NULL, NULL, 0},
    {"write", NULL, attack_write, "WRITE", 5},
    {"stat", NULL, attack_stat, "STAT", 5},
    {"plant", attack_plant, NULL, NULL, 0},
    {"journal", attack_journal, NULL, NULL, 0},
    {"connect", NULL, attack_connect, "CONNECT", 5},
    {"caps", attack_caps, NULL, NULL, 0},
};

static int mode_escape(void) {
    scratch = pick_scratch();
    for (size_t i = 0; i < sizeof attacks / sizeof attacks[0]; i++) {
        const struct attack *a = &attacks[i];
        if (a->family != NULL)
            run_family(a->name, a->prefix, a->count, a->family);
        else
            run_isolated(a->name, a->single, NULL, NULL);
    }
    done();
    return 0;
}

/* ------------------------------------------------------------------------------------------------
 * Mode escape_pidns
 * ------------------------------------------------------------------------------------------------ */

/* The child born in the host's PID namespace: it says who it is, then lingers, bounded. */
static void escapee(const char *name, const char *pidfile, int up) {
    setsid();
    int me = (int)getpid();
    int fd = open(pidfile, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0644);
    int err = fd < 0 ? errno : 0;
    if (fd >= 0) {
        dprintf(fd, "%d\n", me);
        close(fd);
    }
    if (err == 0)
        report(name, "OK", "pid=%d", me);
    else
        report(name, "OK", "pid=%d (pidfile: %s)", me, errname(err));
    /* let go of the workload's stdio and of the parent's pipe: it lives on, but holds nothing open */
    int null = open("/dev/null", O_RDWR);
    if (null >= 0) {
        dup2(null, 0);
        dup2(null, 1);
        dup2(null, 2);
        if (null > 2) close(null);
    }
    close(up);
    sleep(ESCAPEE_LIFETIME);
    _exit(0);
}

static int mode_escape_pidns(void) {
    const char *name = "pidns_child";
    long host_pid;
    const char *pidfile;
    if (!need_number(name, "HOST_PID", &host_pid) || (pidfile = need(name, "ESCAPE_PIDFILE")) == NULL) goto linger;
    int up[2];
    if (pipe(up) != 0) {
        report_err(name, "SKIPPED", "pipe", errno);
        goto linger;
    }
    fflush(stdout);
    /* A helper enters the namespace (setns CLONE_NEWPID only places the caller's future children
     * there) and forks the escapee, then exits at once, so the escapee outlives its parent. */
    pid_t helper = fork();
    if (helper < 0) {
        report_err(name, "SKIPPED", "fork", errno);
        goto linger;
    }
    if (helper == 0) {
        close(up[0]);
        char path[64];
        snprintf(path, sizeof path, "/proc/%ld/ns/pid", host_pid);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
            report_err(name, "BLOCKED", "open", errno);
            _exit(0);
        }
        if (setns(fd, CLONE_NEWPID) != 0) {
            report_err(name, "BLOCKED", "setns", errno);
            _exit(0);
        }
        close(fd);
        pid_t child = fork();
        if (child < 0) report_err(name, "BLOCKED", "fork after setns", errno);
        if (child == 0) escapee(name, pidfile, up[1]);
        _exit(0);
    }
    close(up[1]);
    /* the escapee's line comes before DONE: wait until every writer has closed the pipe */
    struct pollfd pfd = {.fd = up[0], .events = POLLIN};
    char byte;
    while (poll(&pfd, 1, ATTACK_TIMEOUT * 1000) > 0 && read(up[0], &byte, 1) > 0) {
    }
    close(up[0]);
    int status;
    while (waitpid(helper, &status, 0) < 0 && errno == EINTR) {
    }
    if (WIFSIGNALED(status))
        report(name, "BLOCKED", "killed by SIG%s", signame(WTERMSIG(status)));
linger:
    done();
    for (;;) pause(); /* until nex stops it */
}

/* ------------------------------------------------------------------------------------------------
 * Resource modes
 * ------------------------------------------------------------------------------------------------ */

/* Each chunk's first word points at the previous one: all of it stays reachable, so the compiler
 * cannot drop an allocation or its memset. */
static void *volatile hoard;

static int mode_memory(long target) {
    long have = 0;
    int err = 0;
    while (have < target) {
        char *chunk = malloc(MIB);
        if (chunk == NULL) {
            err = errno;
            break;
        }
        memset(chunk, 0x5a, MIB);
        *(void **)chunk = hoard;
        hoard = chunk;
        have++;
        if (have % 16 == 0) {
            printf("PROGRESS allocated %ld\n", have);
            fflush(stdout);
        }
    }
    if (have == target)
        report("memory", "OK", "allocated %ld MiB", have);
    else
        report("memory", "BLOCKED", "allocated %ld MiB; malloc: %s", have, errname(err));
    done();
    return 0;
}

static int mode_forkbomb(long max) {
    pid_t *children = calloc((size_t)max, sizeof *children);
    if (children == NULL) {
        fprintf(stderr, "hostile: cannot keep %ld pids\n", max);
        return 2;
    }
    pid_t parent = getpid();
    long forked = 0;
    int err = 0;
    fflush(stdout);
    while (forked < max) {
        pid_t child = fork();
        if (child < 0) {
            err = errno;
            break;
        }
        if (child == 0) {
            prctl(PR_SET_PDEATHSIG, SIGKILL); /* and if the parent is gone already: */
            if (getppid() == parent) sleep(FORKBOMB_LIFETIME);
            _exit(0);
        }
        children[forked++] = child;
    }
    report("forkbomb", forked == max ? "OK" : "BLOCKED", "forked=%ld errno=%s", forked, errname(err));
    for (long i = 0; i < forked; i++) kill(children[i], SIGKILL);
    for (long i = 0; i < forked; i++)
        while (waitpid(children[i], NULL, 0) < 0 && errno == EINTR) {
        }
    free(children);
    done();
    return 0;
}

#define SPINNERS 4
static atomic_int spin_stop;

static void *spin(void *arg) {
    (void)arg;
    volatile unsigned long counter = 0;
    while (!atomic_load_explicit(&spin_stop, memory_order_relaxed)) counter++;
    return NULL;
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static double cpu_seconds(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
           (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

static void sleep_seconds(double seconds) {
    struct timespec ts = {.tv_sec = (time_t)seconds, .tv_nsec = (long)((seconds - (double)(time_t)seconds) * 1e9)};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

/* seconds < 0: forever, with a PROGRESS line per second. */
static int mode_cpu(double seconds) {
    pthread_t threads[SPINNERS];
    int started = 0;
    double start = now(), cpu_start = cpu_seconds();
    for (int i = 0; i < SPINNERS; i++)
        if (pthread_create(&threads[started], NULL, spin, NULL) == 0) started++;
    if (started < SPINNERS) {
        printf("PROGRESS cpu started %d of %d threads\n", started, SPINNERS);
        fflush(stdout);
    }
    if (seconds < 0) {
        double last = start, last_cpu = cpu_start;
        for (;;) {
            sleep_seconds(1);
            double t = now(), c = cpu_seconds();
            printf("PROGRESS cpu ratio=%.2f\n", t > last ? (c - last_cpu) / (t - last) : 0.0);
            fflush(stdout);
            last = t;
            last_cpu = c;
        }
    }
    sleep_seconds(seconds);
    atomic_store(&spin_stop, 1);
    for (int i = 0; i < started; i++) pthread_join(threads[i], NULL);
    double wall = now() - start, cpu = cpu_seconds() - cpu_start;
    report("cpu", "INFO", "cpu_seconds=%.2f wall=%.2f ratio=%.2f", cpu, wall, wall > 0 ? cpu / wall : 0.0);
    done();
    return 0;
}

static int mode_disk(long target) {
    static char block[MIB]; /* zeros */
    signal(SIGXFSZ, SIG_IGN); /* past RLIMIT_FSIZE, write fails with EFBIG instead of killing it */
    const char *path = "./nex-hostile-fill";
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0) {
        path = "/tmp/nex-hostile-fill";
        fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0600);
    }
    if (fd < 0) {
        report("disk", "BLOCKED", "written=0 errno=%s", errname(errno));
        done();
        return 0;
    }
    long long bytes = 0;
    int err = 0;
    while (bytes < (long long)target * MIB) {
        ssize_t n = write(fd, block, sizeof block);
        if (n < 0) {
            err = errno;
            break;
        }
        bytes += n; /* a short write: the next one says why */
    }
    if (fsync(fd) != 0 && err == 0) err = errno;
    close(fd);
    long written = (long)(bytes / MIB);
    report("disk", written >= target && err == 0 ? "OK" : "BLOCKED", "written=%ld errno=%s", written, errname(err));
    unlink(path);
    done();
    return 0;
}

/* ------------------------------------------------------------------------------------------------ */

static int usage(void) {
    fprintf(stderr,
            "usage: hostile escape | escape_pidns | memory <MiB> | forkbomb <max> | cpu <seconds>|forever | "
            "disk <MiB> | sockmem <MiB>\n");
    return 2;
}

/* Memory the kernel holds for it outside its heap: TCP buffers on loopback connections of its own
 * network namespace, filled and never read (cgroup v1 charges them only where the machine's cgroup
 * accounts TCP memory). Bounded: at most 400 connections, released when it exits. */
static int mode_sockmem(long target_mib) {
    int listener = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof addr;
    if (listener < 0 || bind(listener, (struct sockaddr *)&addr, sizeof addr) != 0 ||
        getsockname(listener, (struct sockaddr *)&addr, &len) != 0 || listen(listener, 512) != 0) {
        report_err("sockmem", "SKIPPED", "listen on loopback", errno);
        done();
        return 0;
    }
    static char chunk[65536];
    memset(chunk, 'T', sizeof chunk);
    long held = 0, target = target_mib << 20;
    int conns = 0, big = 4 << 20, err = 0;
    while (held < target && conns < 400 && err == 0) {
        int client = socket(AF_INET, SOCK_STREAM, 0);
        setsockopt(client, SOL_SOCKET, SO_SNDBUF, &big, sizeof big);
        if (client < 0 || connect(client, (struct sockaddr *)&addr, sizeof addr) != 0) {
            err = errno;
            break;
        }
        int server = accept(listener, NULL, NULL); /* never read: what is sent stays in the kernel */
        if (server < 0) {
            err = errno;
            break;
        }
        setsockopt(server, SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
        fcntl(client, F_SETFL, O_NONBLOCK);
        conns++;
        long before = held;
        for (int i = 0; i < 2000 && held < target; i++) {
            ssize_t n = send(client, chunk, sizeof chunk, MSG_NOSIGNAL);
            if (n <= 0) break;
            held += n;
        }
        if (held == before) break; /* nothing more goes in: the kernel holds no more for us */
    }
    report("sockmem", held >= target ? "OK" : "BLOCKED", "held=%ld MiB connections=%d errno=%s", held >> 20, conns,
           errname(err));
    done();
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    struct rlimit no_core = {0, 0};
    setrlimit(RLIMIT_CORE, &no_core); /* an attack killed by a signal leaves no core file behind */
    if (argc < 2) return usage();
    const char *mode = argv[1];
    if (strcmp(mode, "escape") == 0) return mode_escape();
    if (strcmp(mode, "escape_pidns") == 0) return mode_escape_pidns();
    if (argc < 3) return usage();
    if (strcmp(mode, "cpu") == 0 && strcmp(argv[2], "forever") == 0) return mode_cpu(-1);
    if (strcmp(mode, "cpu") == 0) {
        char *end;
        double seconds = strtod(argv[2], &end);
        if (end == argv[2] || *end != 0 || !(seconds >= 0) || seconds > 1e6) return usage();
        return mode_cpu(seconds);
    }
    long amount;
    if (parse_number(argv[2], &amount) != 0 || amount < 1) return usage();
    if (strcmp(mode, "memory") == 0) return mode_memory(amount);
    if (strcmp(mode, "forkbomb") == 0) return mode_forkbomb(amount);
    if (strcmp(mode, "disk") == 0) return mode_disk(amount);
    if (strcmp(mode, "sockmem") == 0) return mode_sockmem(amount > 1024 ? 1024 : amount);
    return usage();
}
