/* In-guest disk reader for bench/vm-boot.sh: O_DIRECT reads from a block device for a
 * number of seconds with several threads, sequential 1 MiB or random 4 KiB.
 * usage: vm-guest-io DEV seq|rand SECONDS THREADS   -> prints "MiB/s IOPS" */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <linux/fs.h>
#include <time.h>
#include <unistd.h>

static const char *dev;
static int rnd;
static double secs;
static uint64_t size;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static void *worker(void *arg) {
    long id = (long)arg;
    size_t bs = rnd ? 4096 : 1 << 20;
    int fd = open(dev, O_RDONLY | O_DIRECT);
    void *buf;
    uint64_t *ops = calloc(1, sizeof *ops), seed = 0x9e3779b97f4a7c15ull * (id + 1);
    uint64_t off = (size / 4) * (id % 4) / bs * bs;
    if (fd < 0 || posix_memalign(&buf, 4096, bs)) return ops;
    double end = now() + secs;
    while (now() < end) {
        for (int i = 0; i < 16; i++) {
            if (rnd) {
                seed ^= seed << 13; seed ^= seed >> 7; seed ^= seed << 17;
                off = (seed % (size / bs)) * bs;
            } else if (off + bs > size) {
                off = 0;
            }
            if (pread(fd, buf, bs, off) != (ssize_t)bs) { close(fd); return ops; }
            if (!rnd) off += bs;
            (*ops)++;
        }
    }
    close(fd);
    return ops;
}

int main(int argc, char **argv) {
    if (argc != 5) return 2;
    dev = argv[1];
    rnd = strcmp(argv[2], "rand") == 0;
    secs = atof(argv[3]);
    int n = atoi(argv[4]);
    int fd = open(dev, O_RDONLY);
    if (fd < 0 || ioctl(fd, BLKGETSIZE64, &size) < 0) return 1;
    close(fd);
    pthread_t t[64];
    double t0 = now();
    for (long i = 0; i < n && i < 64; i++) pthread_create(&t[i], 0, worker, (void *)i);
    uint64_t total = 0;
    for (long i = 0; i < n && i < 64; i++) {
        void *r;
        pthread_join(t[i], &r);
        total += *(uint64_t *)r;
    }
    double dt = now() - t0;
    double bytes = (double)total * (rnd ? 4096 : 1 << 20);
    printf("%.1f %.0f\n", bytes / dt / (1 << 20), total / dt);
    return 0;
}
