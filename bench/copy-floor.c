/* The least a tmpfs-to-tmpfs copy can cost, for bench/copy-floor.sh: copies SRC's first
 * BYTES to a new file DST in 1 MiB pieces with THREADS threads, each taking every
 * THREADS-th piece, in one of three ways:
 *   rw     pread into a buffer, pwrite out of it (what convert does, minus everything else)
 *   mmap   memcpy from a mapping of SRC to a mapping of DST (no system call per piece)
 *   fill   pread straight into a mapping of DST (one copy, DST's pages faulted in first)
 *   read   pread into a buffer only (DST is created and left empty)
 *   cfr    copy_file_range (the kernel copies between the two page caches)
 *   falloc fallocate DST whole first, then pread + pwrite (no page allocation per write)
 * usage: copy-floor SRC DST BYTES THREADS rw|mmap|fill|read|cfr|falloc -> prints the seconds */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PIECE (1L << 20)

static long bytes, threads;
static int mode, sfd, dfd;
static char *smap, *dmap;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static void *worker(void *arg) {
    char *buf = aligned_alloc(4096, PIECE);
    if (!buf) return (void *)1;
    for (long off = (long)arg * PIECE; off < bytes; off += threads * PIECE) {
        if (mode == 4) {
            loff_t in = off, out = off;
            if (copy_file_range(sfd, &in, dfd, &out, PIECE, 0) != PIECE)
                return (void *)1;
        } else if (mode == 0 || mode == 3 || mode == 5) {
            if (pread(sfd, buf, PIECE, off) != PIECE ||
                (mode != 3 && pwrite(dfd, buf, PIECE, off) != PIECE))
                return (void *)1;
        } else if (mode == 1) {
            memcpy(dmap + off, smap + off, PIECE);
        } else {
            if (madvise(dmap + off, PIECE, MADV_POPULATE_WRITE) ||
                pread(sfd, dmap + off, PIECE, off) != PIECE)
                return (void *)1;
        }
    }
    free(buf);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 6) return 2;
    bytes = atol(argv[3]) / PIECE * PIECE;
    threads = atol(argv[4]);
    static const char *modes[] = {"rw", "mmap", "fill", "read", "cfr", "falloc"};
    mode = -1;
    for (int i = 0; i < 6; i++)
        if (!strcmp(argv[5], modes[i])) mode = i;
    if (mode < 0) return 2;
    if (threads < 1 || threads > 64) return 2;
    sfd = open(argv[1], O_RDONLY);
    unlink(argv[2]);
    dfd = open(argv[2], O_RDWR | O_CREAT | O_EXCL, 0644);
    if (sfd < 0 || dfd < 0) return 1;
    double t0 = now();
    if (mode == 5 && fallocate(dfd, 0, 0, bytes)) return 1;
    if (mode == 1 || mode == 2) {
        if (ftruncate(dfd, bytes)) return 1;
        smap = mmap(0, bytes, PROT_READ, MAP_SHARED, sfd, 0);
        dmap = mmap(0, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, dfd, 0);
        if (smap == MAP_FAILED || dmap == MAP_FAILED) return 1;
    }
    pthread_t t[64];
    void *r;
    int failed = 0;
    for (long i = 0; i < threads; i++) pthread_create(&t[i], 0, worker, (void *)i);
    for (long i = 0; i < threads; i++) {
        pthread_join(t[i], &r);
        failed |= r != NULL;
    }
    if (mode == 1 || mode == 2) {
        munmap(smap, bytes);
        munmap(dmap, bytes);
    }
    close(dfd);
    printf("%.3f\n", now() - t0);
    return failed;
}
