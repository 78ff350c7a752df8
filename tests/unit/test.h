/* test.h: a tiny unit-test harness. Typed assertions print both values.
 *
 *   TEST(name) { ASSERT_EQ(1 + 1, 2); }
 *   int main(void) { RUN(name); return test_summary(); }
 *
 * Each binary ends with "N passed, N failed"; tests/run.sh adds them up. */
#ifndef MM_TEST_H
#define MM_TEST_H
#include <dirent.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static int test_passed, test_failed, test_cur_failed;

#define TEST(name) static void test_##name(void)
#define RUN(name)                                                  \
    do {                                                           \
        test_cur_failed = 0;                                       \
        test_##name();                                             \
        if (test_cur_failed) {                                     \
            test_failed++;                                         \
            printf("FAIL %s\n", #name);                            \
        } else {                                                   \
            test_passed++;                                         \
            printf("ok   %s\n", #name);                            \
        }                                                          \
        fflush(stdout);                                            \
    } while (0)

#define TEST_FAIL_(...)                                            \
    do {                                                           \
        printf("  %s:%d: ", __FILE__, __LINE__);                   \
        printf(__VA_ARGS__);                                       \
        printf("\n");                                              \
        test_cur_failed = 1;                                       \
    } while (0)

#define ASSERT_TRUE(c)                                             \
    do { if (!(c)) { TEST_FAIL_("expected true: %s", #c); return; } } while (0)
#define ASSERT_EQ(a, b)                                            \
    do {                                                           \
        long long a_ = (long long)(a), b_ = (long long)(b);        \
        if (a_ != b_) {                                            \
            TEST_FAIL_("%s == %s: %lld != %lld", #a, #b, a_, b_);  \
            return;                                                \
        }                                                          \
    } while (0)
#define ASSERT_NE(a, b)                                            \
    do {                                                           \
        long long a_ = (long long)(a), b_ = (long long)(b);        \
        if (a_ == b_) {                                            \
            TEST_FAIL_("%s != %s: both %lld", #a, #b, a_);         \
            return;                                                \
        }                                                          \
    } while (0)
#define ASSERT_LT(a, b)                                            \
    do {                                                           \
        double a_ = (double)(a), b_ = (double)(b);                 \
        if (!(a_ < b_)) {                                          \
            TEST_FAIL_("%s < %s: %g >= %g", #a, #b, a_, b_);       \
            return;                                                \
        }                                                          \
    } while (0)
#define ASSERT_STR_EQ(a, b)                                        \
    do {                                                           \
        const char *a_ = (a), *b_ = (b);                           \
        if (!a_ || !b_ || strcmp(a_, b_) != 0) {                   \
            TEST_FAIL_("%s == %s: \"%s\" != \"%s\"", #a, #b,       \
                       a_ ? a_ : "(null)", b_ ? b_ : "(null)");    \
            return;                                                \
        }                                                          \
    } while (0)
#define ASSERT_CONTAINS(hay, needle)                               \
    do {                                                           \
        const char *h_ = (hay), *n_ = (needle);                    \
        if (!h_ || !strstr(h_, n_)) {                              \
            TEST_FAIL_("\"%s\" does not contain \"%s\"",           \
                       h_ ? h_ : "(null)", n_);                    \
            return;                                                \
        }                                                          \
    } while (0)

/* Remove a scratch directory a test made (files and subdirectories). */
static inline void test_rm_tree(const char *dir)
{
    DIR *d = opendir(dir);
    struct dirent *e;
    char p[512];
    while (d && (e = readdir(d))) {
        if (e->d_name[0] == '.')
            continue;
        if ((size_t)snprintf(p, sizeof p, "%s/%s", dir, e->d_name) >= sizeof p)
            continue; /* no test makes paths this long */
        struct stat st;
        if (stat(p, &st) == 0 && S_ISDIR(st.st_mode))
            test_rm_tree(p);
        else
            unlink(p);
    }
    if (d)
        closedir(d);
    rmdir(dir);
}

static int test_summary(void)
{
    printf("%d passed, %d failed\n", test_passed, test_failed);
    return test_failed ? 1 : 0;
}
#endif
