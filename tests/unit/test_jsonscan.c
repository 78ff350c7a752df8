/* test_jsonscan.c: the strict JSON validator used on every routed body. */
#include <errno.h>
#include <string.h>

#include "jsonscan.h"
#include "test.h"

static int scan(const char *s, size_t *count, mm_json_member *m, size_t max)
{
    char err[160];
    size_t c = 0;
    int rc = mm_json_scan(s, strlen(s), m, max, &c, err, sizeof err);
    if (count)
        *count = c;
    return rc;
}

TEST(valid_documents)
{
    static const char *const ok[] = {
        "{}", " {\"a\":1} ", "{\"a\":[1,2,{\"b\":null}],\"c\":true,\"d\":false}",
        "{\"n\":-0.5e+10}", "{\"n\":0}", "{\"s\":\"\\u00e9\\n\\\"\\\\\\/\"}",
        "{\"e\":\"\\ud83d\\ude00\"}", "{\"u\":\"caf\xc3\xa9 \xf0\x9f\x98\x80\"}", "{\"a\":{}}",
        "{\"a\":[]}", "{\"deep\":[[[[[[1]]]]]]}",
    };
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++) {
        int rc = scan(ok[i], NULL, NULL, 0);
        if (rc != 0)
            printf("  rejected: %s\n", ok[i]);
        ASSERT_EQ(rc, 0);
    }
}

TEST(invalid_documents)
{
    static const char *const bad[] = {
        "", "{", "}", "{\"a\":1,}", "{\"a\" 1}", "{'a':1}", "{\"a\":01}", "{\"a\":1.}",
        "{\"a\":.5}", "{\"a\":+1}", "{\"a\":NaN}", "{\"a\":tru}", "{\"a\":\"x}", "{\"a\":\"\t\"}",
        "{\"a\":\"\\x\"}", "{\"a\":\"\\ud800\"}", "{\"a\":\"\\udc00\"}", "{\"a\":\"\\u12\"}",
        "{\"a\":1} x", "{\"a\":1}{}", "{a:1}", "{\"a\":[1,]}", "{\"a\":\"\xc0\xaf\"}",
        "{\"a\":\"\xed\xa0\x80\"}", "{\"a\":\"\xf5\x80\x80\x80\"}", "{\"a\":\"\xe2\x82\"}",
        "{\"a\":1 /* c */}", "{\"a\":-}", "{\"a\":1e}",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        int rc = scan(bad[i], NULL, NULL, 0);
        if (rc != -EINVAL)
            printf("  accepted: %s\n", bad[i]);
        ASSERT_EQ(rc, -EINVAL);
    }
}

TEST(not_an_object)
{
    ASSERT_EQ(scan("[1,2]", NULL, NULL, 0), -EDOM);
    ASSERT_EQ(scan("\"s\"", NULL, NULL, 0), -EDOM);
    ASSERT_EQ(scan("42", NULL, NULL, 0), -EDOM);
}

TEST(depth_cap)
{
    char buf[2 * MM_JSON_MAX_DEPTH + 16];
    size_t n = 0;
    buf[n++] = '{';
    memcpy(buf + n, "\"a\":", 4);
    n += 4;
    for (int i = 0; i < MM_JSON_MAX_DEPTH + 1; i++)
        buf[n++] = '[';
    for (int i = 0; i < MM_JSON_MAX_DEPTH + 1; i++)
        buf[n++] = ']';
    buf[n++] = '}';
    buf[n] = '\0';
    ASSERT_EQ(scan(buf, NULL, NULL, 0), -EINVAL);
}

TEST(members_and_spans)
{
    const char *s = "{ \"model\" : \"q\\u0077en\", \"stream\":true,\"n\":12,"
                    "\"stream_options\":{\"include_usage\":false},\"m\":[1]}";
    mm_json_member m[8];
    size_t c = 0;
    ASSERT_EQ(scan(s, &c, m, 8), 0);
    ASSERT_EQ(c, 5);
    const mm_json_member *model = mm_json_find(m, c, "model");
    ASSERT_TRUE(model != NULL);
    ASSERT_EQ(model->type, 's');
    ASSERT_EQ(model->val_len, strlen("\"q\\u0077en\""));
    mm_buf b;
    mm_buf_init(&b, 64);
    ASSERT_EQ(mm_json_decode_string(model->val, model->val_len, &b), 0);
    ASSERT_STR_EQ(b.data, "qwen");
    mm_buf_free(&b);
    ASSERT_EQ(mm_json_find(m, c, "stream")->type, 't');
    ASSERT_EQ(mm_json_find(m, c, "n")->val_len, 2);
    ASSERT_EQ(mm_json_find(m, c, "stream_options")->type, 'o');
    ASSERT_EQ(mm_json_find(m, c, "m")->type, 'a');
    ASSERT_TRUE(mm_json_find(m, c, "absent") == NULL);
    ASSERT_EQ(mm_json_has_duplicate(m, c), 0);
}

TEST(escaped_keys_and_duplicates)
{
    /* "mod\u0065l" is "model": a duplicate the upstream would also see. */
    const char *s = "{\"model\":\"a\",\"mod\\u0065l\":\"b\"}";
    mm_json_member m[4];
    size_t c = 0;
    ASSERT_EQ(scan(s, &c, m, 4), 0);
    ASSERT_EQ(c, 2);
    ASSERT_EQ(mm_json_has_duplicate(m, c), 1);
    const mm_json_member *only = mm_json_find(m + 1, 1, "model");
    ASSERT_TRUE(only != NULL);
    ASSERT_EQ(mm_json_has_duplicate(m, 1), 0);
}

TEST(count_beyond_max)
{
    mm_json_member m[2];
    size_t c = 0;
    ASSERT_EQ(scan("{\"a\":1,\"b\":2,\"c\":3}", &c, m, 2), 0);
    ASSERT_EQ(c, 3);
}

TEST(decode_utf16_pair)
{
    mm_buf b;
    mm_buf_init(&b, 64);
    const char *v = "\"\\ud83d\\ude00x\\t\"";
    ASSERT_EQ(mm_json_decode_string(v, strlen(v), &b), 0);
    ASSERT_EQ(b.len, 6);
    ASSERT_TRUE(memcmp(b.data, "\xf0\x9f\x98\x80x\t", 6) == 0);
    mm_buf_free(&b);
}

int main(void)
{
    RUN(valid_documents);
    RUN(invalid_documents);
    RUN(not_an_object);
    RUN(depth_cap);
    RUN(members_and_spans);
    RUN(escaped_keys_and_duplicates);
    RUN(count_beyond_max);
    RUN(decode_utf16_pair);
    return test_summary();
}
