/* LD_PRELOAD shim for tests: fsync()/fdatasync() fail with EIO while the file
 * named by RELAYGW_TEST_FAIL_FSYNC exists. Lets a test break durability in the
 * real daemon and repair it again without restarting it. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <unistd.h>

static int failing(void) {
    const char *marker = getenv("RELAYGW_TEST_FAIL_FSYNC");
    return marker != NULL && access(marker, F_OK) == 0;
}

int fsync(int fd) {
    static int (*real)(int) = NULL;
    if (real == NULL) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    if (failing()) { errno = EIO; return -1; }
    return real(fd);
}

int fdatasync(int fd) {
    static int (*real)(int) = NULL;
    if (real == NULL) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    if (failing()) { errno = EIO; return -1; }
    return real(fd);
}
