/* test_tokenizer.c: the tokenizer against Hugging Face tokenizers' own output
 * (tests/fixtures/tokenizer/goldens.json) on four real tokenizer.json files,
 * the stream decoder, NFC (including NormalizationTest.txt) and load errors.
 *
 * The tokenizer files come from tests/fixtures/fetch_tokenizers.sh
 * (build/tokenizers/<name>/tokenizer.json; MM_TOKENIZERS_DIR overrides).
 * MM_TOKENIZER_GOLDENS points at another goldens file (same shape). */
#include <errno.h>
#include <jansson.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "test.h"
#include "tokenizer.h"
#include "unicode.h"

#define CASES_PATH "tests/fixtures/tokenizer/cases.json"
#define GOLDENS_PATH "tests/fixtures/tokenizer/goldens.json"

enum { NTOK = 4 };
static const char *const tok_names[NTOK] = {"qwen3", "llama3", "deepseek_v3", "llama2"};
static mm_tokenizer *toks[NTOK];
static char tok_errs[NTOK][512];
static json_t *cases, *goldens;

static const char *tok_dir(void)
{
    const char *d = getenv("MM_TOKENIZERS_DIR");
    return d && *d ? d : "build/tokenizers";
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* ---- NFC ---------------------------------------------------------------- */

static int nfc_eq(const char *in, size_t n, const char *want, size_t wn)
{
    mm_buf b;
    mm_buf_init(&b, 1 << 20);
    int rc = mm_unicode_nfc(in, n, &b);
    int ok = rc == 0 && b.len == wn && (wn == 0 || memcmp(b.data, want, wn) == 0);
    mm_buf_free(&b);
    return ok;
}
#define NFC_EQ(in, want) nfc_eq(in, sizeof(in) - 1, want, sizeof(want) - 1)

TEST(nfc_examples)
{
    ASSERT_TRUE(NFC_EQ("cafe\xCC\x81", "caf\xC3\xA9"));                  /* café NFD -> NFC */
    ASSERT_TRUE(NFC_EQ("caf\xC3\xA9", "caf\xC3\xA9"));                   /* already NFC */
    ASSERT_TRUE(NFC_EQ("\xE1\x84\x92\xE1\x85\xA1\xE1\x86\xAB", "\xED\x95\x9C")); /* jamo -> 한 */
    ASSERT_TRUE(NFC_EQ("\xE1\x84\x80\xE1\x85\xA1", "\xEA\xB0\x80"));     /* L+V -> 가 */
    ASSERT_TRUE(NFC_EQ("\xEA\xB0\x80\xE1\x86\xA8", "\xEA\xB0\x81"));     /* LV+T -> 각 */
    ASSERT_TRUE(NFC_EQ("\xE2\x84\xA6", "\xCE\xA9"));                     /* Ω singleton */
    ASSERT_TRUE(NFC_EQ("\xE2\x84\xAB", "\xC3\x85"));                     /* Å angstrom */
    /* a + dot below (220) + acute (230), given in the wrong order. */
    ASSERT_TRUE(NFC_EQ("a\xCC\x81\xCC\xA3", "\xE1\xBA\xA1\xCC\x81"));
    ASSERT_TRUE(NFC_EQ("\xCC\x81 x", "\xCC\x81 x"));                     /* lone mark stays */
    ASSERT_TRUE(NFC_EQ("", ""));
    ASSERT_TRUE(NFC_EQ("plain ascii\n", "plain ascii\n"));
    mm_buf b;
    mm_buf_init(&b, 1 << 10);
    ASSERT_EQ(mm_unicode_nfc("a\xC3", 2, &b), -EILSEQ);
    ASSERT_EQ(mm_unicode_nfc("\xED\xA0\x80", 3, &b), -EILSEQ); /* surrogate */
    ASSERT_EQ(mm_unicode_nfc("\xC0\xAF", 2, &b), -EILSEQ);     /* overlong */
    ASSERT_EQ(b.len, 0);
    mm_buf_free(&b);
    ASSERT_EQ(mm_unicode_ccc(0x0301), 230);
    ASSERT_EQ(mm_unicode_ccc(0x0323), 220);
    ASSERT_EQ(mm_unicode_ccc('a'), 0);
}

/* NFC with older tables: U+1DF7 (ccc 228, Unicode 10.0) is unassigned, so
 * a starter, at 9.0 and blocks the reordering it gets at 15.0. */
TEST(nfc_versions)
{
    const char in[] = "a\xE1\xB7\xB7\xCC\x96"; /* a U+1DF7 U+0316 */
    mm_buf b;
    mm_buf_init(&b, 1 << 10);
    ASSERT_EQ(mm_unicode_nfc_version(in, sizeof in - 1, 0, &b), 0);
    ASSERT_STR_EQ(mm_buf_cstr(&b), "a\xCC\x96\xE1\xB7\xB7");
    mm_buf_reset(&b);
    ASSERT_EQ(mm_unicode_nfc_version(in, sizeof in - 1, 900, &b), 0);
    ASSERT_STR_EQ(mm_buf_cstr(&b), in);
    /* Old characters normalize the same at any version. */
    mm_buf_reset(&b);
    ASSERT_EQ(mm_unicode_nfc_version("e\xCC\x81\xCC\xA3", 5, 900, &b), 0);
    ASSERT_STR_EQ(mm_buf_cstr(&b), "\xE1\xBA\xB9\xCC\x81");
    mm_buf_free(&b);
}

/* Hostile input: thousands of marks in alternating classes must sort stably
 * (the merge sort path) and stay correct. */
TEST(nfc_long_mark_run)
{
    mm_buf in, want, got;
    mm_buf_init(&in, 1 << 20);
    mm_buf_init(&want, 1 << 20);
    mm_buf_init(&got, 1 << 20);
    ASSERT_EQ(mm_buf_append_str(&in, "x"), 0);
    ASSERT_EQ(mm_buf_append_str(&want, "x"), 0);
    for (int i = 0; i < 2000; i++)
        ASSERT_EQ(mm_buf_append_str(&in, i % 2 ? "\xCC\xA3" : "\xCC\x81"), 0);
    for (int i = 0; i < 1000; i++)
        ASSERT_EQ(mm_buf_append_str(&want, "\xCC\xA3"), 0);
    for (int i = 0; i < 1000; i++)
        ASSERT_EQ(mm_buf_append_str(&want, "\xCC\x81"), 0);
    ASSERT_EQ(mm_unicode_nfc(in.data, in.len, &got), 0);
    ASSERT_EQ(got.len, want.len);
    ASSERT_TRUE(memcmp(got.data, want.data, got.len) == 0);
    mm_buf_free(&in);
    mm_buf_free(&want);
    mm_buf_free(&got);
}

static size_t parse_cps(const char *field, char *out, size_t cap, uint32_t *first, size_t *count)
{
    size_t n = 0;
    *count = 0;
    const char *p = field;
    while (*p && *p != ';') {
        while (*p == ' ')
            p++;
        if (*p == ';' || !*p)
            break;
        char *end;
        unsigned long cp = strtoul(p, &end, 16);
        if (end == p)
            break;
        if (n + 4 > cap)
            return 0;
        if (*count == 0)
            *first = (uint32_t)cp;
        (*count)++;
        n += mm_utf8_encode((uint32_t)cp, out + n);
        p = end;
    }
    return n;
}

/* "@Part1 # ..." -> 1 */
static int part_number(const char *line)
{
    char *end;
    long v = strtol(line + 5, &end, 10);
    return end == line + 5 ? -1 : (int)v;
}

/* Every NFC check of the UCD conformance file: c2 == NFC(c1) == NFC(c2) ==
 * NFC(c3) and c4 == NFC(c4) == NFC(c5); plus X == NFC(X) for every code
 * point not listed in Part 1. */
TEST(nfc_conformance)
{
    const char *plain = "/usr/share/unicode/NormalizationTest.txt";
    FILE *f = fopen(plain, "r");
    int piped = 0;
    if (!f && access("/usr/share/unicode/NormalizationTest.txt.bz2", R_OK) == 0) {
        f = popen("bzcat /usr/share/unicode/NormalizationTest.txt.bz2", "r");
        piped = 1;
    }
    if (!f) {
        printf("  NormalizationTest.txt not found: conformance check skipped\n");
        return;
    }
    static unsigned char listed[0x110000];
    memset(listed, 0, sizeof listed);
    char line[2048];
    long checks = 0, bad = 0;
    int part = -1;
    mm_buf b;
    mm_buf_init(&b, 1 << 16);
    while (fgets(line, sizeof line, f)) {
        if (line[0] == '@') {
            part = part_number(line);
            continue;
        }
        if (line[0] == '#' || line[0] == '\n')
            continue;
        char col[5][256];
        size_t len[5], cnt;
        uint32_t first = 0;
        const char *p = line;
        for (int c = 0; c < 5; c++) {
            len[c] = parse_cps(p, col[c], sizeof col[c], &first, &cnt);
            if (c == 0 && part == 1 && cnt == 1)
                listed[first] = 1;
            p = strchr(p, ';');
            if (!p)
                break;
            p++;
        }
        if (!p)
            continue;
        for (int c = 0; c < 5; c++) {
            int want = c < 3 ? 1 : 3;
            mm_buf_reset(&b);
            checks++;
            if (mm_unicode_nfc(col[c], len[c], &b) != 0 || b.len != len[want] ||
                memcmp(b.data, col[want], b.len) != 0) {
                if (bad++ < 5)
                    printf("  NFC mismatch (column %d): %s", c + 1, line);
            }
        }
    }
    if (piped)
        pclose(f);
    else
        fclose(f);
    long inv = 0;
    for (uint32_t cp = 0; cp < 0x110000; cp++) {
        if (listed[cp] || (cp >= 0xD800 && cp <= 0xDFFF))
            continue;
        char s[4];
        size_t n = mm_utf8_encode(cp, s);
        mm_buf_reset(&b);
        inv++;
        if (mm_unicode_nfc(s, n, &b) != 0 || b.len != n || memcmp(b.data, s, n) != 0) {
            if (bad++ < 5)
                printf("  NFC changed unlisted U+%04X\n", (unsigned)cp);
        }
    }
    mm_buf_free(&b);
    printf("  NormalizationTest: %ld column checks + %ld invariant code points, %ld failures\n",
           checks, inv, bad);
    ASSERT_TRUE(checks > 50000);
    ASSERT_EQ(bad, 0);
}

/* ---- synthetic tokenizers (no fetched files needed) ----------------------- */

static char tmpdir[256];

static int write_file(const char *name, const char *body, char *path, size_t cap)
{
    snprintf(path, cap, "%s/%s", tmpdir, name);
    FILE *f = fopen(path, "w");
    if (!f)
        return -errno;
    fputs(body, f);
    fclose(f);
    return 0;
}

/* Loads body; returns rc and leaves the message in err. */
static int load_body(const char *body, mm_tokenizer **t, char *err, size_t errlen)
{
    char path[512];
    int rc = write_file("tok.json", body, path, sizeof path);
    if (rc)
        return rc;
    err[0] = '\0';
    return mm_tokenizer_load(path, t, err, errlen);
}

static int encode_eq(mm_tokenizer *t, const char *text, int special, const int32_t *want, size_t n)
{
    mm_tok_ids ids;
    char err[256];
    mm_tok_ids_init(&ids, 1 << 20);
    int rc = mm_tokenizer_encode(t, text, strlen(text), special, &ids, err, sizeof err);
    int ok = rc == 0 && ids.n == n && (n == 0 || memcmp(ids.v, want, n * sizeof *want) == 0);
    if (!ok) {
        printf("  encode \"%s\": rc %d (%s), got", text, rc, rc ? err : "");
        for (size_t i = 0; i < ids.n; i++)
            printf(" %d", ids.v[i]);
        printf("\n");
    }
    mm_tok_ids_free(&ids);
    return ok;
}

#define TINY_VOCAB "{\"<unk>\":0,\"a\":1,\"b\":2,\"c\":3,\"ab\":4,\"bc\":5,\"abc\":6,\"<0xC3>\":7,\"<0xA9>\":8,\"\\u2581\":9,\"<s>\":10}"

static char *tiny(const char *merges, const char *extra_model)
{
    static char buf[4096];
    snprintf(buf, sizeof buf,
             "{\"version\":\"1.0\",\"added_tokens\":[{\"id\":10,\"content\":\"<s>\",\"special\":true,"
             "\"normalized\":false,\"lstrip\":false,\"rstrip\":false,\"single_word\":false}],"
             "\"normalizer\":null,\"pre_tokenizer\":null,"
             "\"post_processor\":{\"type\":\"TemplateProcessing\",\"single\":[{\"SpecialToken\":{\"id\":\"<s>\",\"type_id\":0}},"
             "{\"Sequence\":{\"id\":\"A\",\"type_id\":0}}],\"pair\":[],\"special_tokens\":{\"<s>\":{\"id\":\"<s>\",\"ids\":[10],\"tokens\":[\"<s>\"]}}},"
             "\"decoder\":{\"type\":\"Sequence\",\"decoders\":[{\"type\":\"Replace\",\"pattern\":{\"String\":\"\\u2581\"},\"content\":\" \"},"
             "{\"type\":\"ByteFallback\"},{\"type\":\"Fuse\"},{\"type\":\"Strip\",\"content\":\" \",\"start\":1,\"stop\":0}]},"
             "\"model\":{\"type\":\"BPE\",\"unk_token\":\"<unk>\",\"vocab\":" TINY_VOCAB ",\"merges\":%s%s}}",
             merges, extra_model);
    return buf;
}

TEST(bpe_merge_rank_order)
{
    mm_tokenizer *t = NULL;
    char err[256];
    /* (a,b) outranks (b,c): ab, then ab+c. */
    ASSERT_EQ(load_body(tiny("[\"a b\",\"b c\",\"ab c\"]", ""), &t, err, sizeof err), 0);
    ASSERT_TRUE(encode_eq(t, "abc", 0, (const int32_t[]){6}, 1));
    mm_tokenizer_free(t);
    /* (b,c) first leaves a + bc, which has no merge. Array merge format. */
    ASSERT_EQ(load_body(tiny("[[\"b\",\"c\"],[\"a\",\"b\"],[\"ab\",\"c\"]]", ""), &t, err, sizeof err), 0);
    ASSERT_TRUE(encode_eq(t, "abc", 0, (const int32_t[]){1, 5}, 2));
    /* Template adds BOS only with add_special_tokens. */
    ASSERT_TRUE(encode_eq(t, "abc", 1, (const int32_t[]){10, 1, 5}, 3));
    /* Equal ranks resolve leftmost first: "abab" -> ab ab. */
    ASSERT_TRUE(encode_eq(t, "abab", 0, (const int32_t[]){4, 4}, 2));
    /* The added token splits first; one unk per unknown char (fuse_unk off). */
    ASSERT_TRUE(encode_eq(t, "a<s>xyb", 0, (const int32_t[]){1, 10, 0, 0, 2}, 5));
    /* byte_fallback is off: é is unk. */
    ASSERT_TRUE(encode_eq(t, "\xC3\xA9", 0, (const int32_t[]){0}, 1));
    mm_tokenizer_free(t);
}

TEST(bpe_options)
{
    mm_tokenizer *t = NULL;
    char err[256];
    /* No merge path to "abc", but ignore_merges takes whole-word vocab hits. */
    ASSERT_EQ(load_body(tiny("[]", ",\"ignore_merges\":true"), &t, err, sizeof err), 0);
    ASSERT_TRUE(encode_eq(t, "abc", 0, (const int32_t[]){6}, 1));
    ASSERT_TRUE(encode_eq(t, "ab", 0, (const int32_t[]){4}, 1));
    mm_tokenizer_free(t);
    ASSERT_EQ(load_body(tiny("[]", ",\"ignore_merges\":false"), &t, err, sizeof err), 0);
    ASSERT_TRUE(encode_eq(t, "abc", 0, (const int32_t[]){1, 2, 3}, 3));
    mm_tokenizer_free(t);
    /* byte_fallback: é -> <0xC3><0xA9>; x has no byte tokens -> unk; fuse_unk
     * merges adjacent unks. */
    ASSERT_EQ(load_body(tiny("[]", ",\"byte_fallback\":true,\"fuse_unk\":true"), &t, err, sizeof err), 0);
    ASSERT_TRUE(encode_eq(t, "\xC3\xA9", 0, (const int32_t[]){7, 8}, 2));
    ASSERT_TRUE(encode_eq(t, "axyb", 0, (const int32_t[]){1, 0, 2}, 3));
    mm_tok_ids ids;
    mm_buf out;
    mm_tok_ids_init(&ids, 16);
    mm_buf_init(&out, 1 << 10);
    /* Decoder: ▁ -> space, bytes regrouped, one leading space stripped. */
    int32_t seq[] = {9, 1, 7, 8, 9, 2};
    ASSERT_EQ(mm_tokenizer_decode(t, seq, 6, 0, &out), 0);
    ASSERT_STR_EQ(mm_buf_cstr(&out), "a\xC3\xA9 b");
    /* A broken byte run is one U+FFFD per byte. */
    mm_buf_reset(&out);
    int32_t broken[] = {1, 7, 7, 2};
    ASSERT_EQ(mm_tokenizer_decode(t, broken, 4, 0, &out), 0);
    ASSERT_STR_EQ(mm_buf_cstr(&out), "a\xEF\xBF\xBD\xEF\xBF\xBD" "b");
    /* ids cap is enforced and leaves ids unchanged. */
    char e2[128];
    ASSERT_EQ(mm_tokenizer_encode(t, "abcabcabcabcabcabcabc", 21, 0, &ids, e2, sizeof e2), -E2BIG);
    ASSERT_EQ(ids.n, 0);
    ASSERT_EQ(mm_tokenizer_encode(t, "a\xFF", 2, 0, &ids, e2, sizeof e2), -EILSEQ);
    ASSERT_CONTAINS(e2, "UTF-8");
    mm_tok_ids_free(&ids);
    mm_buf_free(&out);
    mm_tokenizer_free(t);
}

static char *split_tok(const char *pattern)
{
    static char buf[2048];
    snprintf(buf, sizeof buf,
             "{\"added_tokens\":[],\"normalizer\":null,\"post_processor\":null,\"decoder\":null,"
             "\"pre_tokenizer\":{\"type\":\"Split\",\"pattern\":{\"Regex\":\"%s\"},\"behavior\":\"Isolated\","
             "\"invert\":false},\"model\":{\"type\":\"BPE\",\"unk_token\":\"<unk>\",\"vocab\":{\"<unk>\":0,"
             "\"a\":1,\"b\":2,\"c\":3,\"ab\":4,\"\\u180e\":5,\"ab\\u180e\":6},\"merges\":[\"a b\",\"ab \\u180e\"]}}",
             pattern);
    return buf;
}

/* The pre-tokenizer regexes are Oniguruma's; PCRE2 spells some escapes
 * differently. Each case splits differently (so gives other ids) if the
 * escape keeps PCRE2's meaning. */
TEST(regex_dialect)
{
    mm_tokenizer *t = NULL;
    char err[256];
    /* \s is White_Space: a space splits, U+180E (in PCRE2's \s) does not. */
    ASSERT_EQ(load_body(split_tok("\\\\s"), &t, err, sizeof err), 0);
    ASSERT_TRUE(encode_eq(t, "ab c", 0, (const int32_t[]){4, 0, 3}, 3));
    ASSERT_TRUE(encode_eq(t, "ab\xE1\xA0\x8E" "c", 0, (const int32_t[]){6, 3}, 2));
    mm_tokenizer_free(t);
    /* \h is a hex digit (PCRE2: horizontal space): every letter splits. */
    ASSERT_EQ(load_body(split_tok("\\\\h"), &t, err, sizeof err), 0);
    ASSERT_TRUE(encode_eq(t, "abc", 0, (const int32_t[]){1, 2, 3}, 3));
    mm_tokenizer_free(t);
    /* \S is the complement: U+180E stays inside the run. */
    ASSERT_EQ(load_body(split_tok("\\\\S+"), &t, err, sizeof err), 0);
    ASSERT_TRUE(encode_eq(t, "ab\xE1\xA0\x8E" "c", 0, (const int32_t[]){6, 3}, 2));
    /* No decoder: tokens are joined with spaces, as tokenizers does. */
    mm_buf out;
    mm_buf_init(&out, 256);
    ASSERT_EQ(mm_tokenizer_decode(t, (const int32_t[]){4, 3}, 2, 0, &out), 0);
    ASSERT_STR_EQ(mm_buf_cstr(&out), "ab c");
    mm_buf_free(&out);
    mm_tokenizer_free(t);
}

TEST(load_errors)
{
    mm_tokenizer *t = NULL;
    char err[512], path[512];
    snprintf(path, sizeof path, "%s/does-not-exist.json", tmpdir);
    ASSERT_EQ(mm_tokenizer_load(path, &t, err, sizeof err), -ENOENT);
    ASSERT_CONTAINS(err, "does-not-exist.json");
    ASSERT_TRUE(t == NULL);

    ASSERT_EQ(load_body("{\"model\": {\"type\": \"BPE\",", &t, err, sizeof err), -EINVAL);
    ASSERT_CONTAINS(err, "line");

    ASSERT_EQ(load_body("{\"model\":{\"type\":\"WordPiece\",\"vocab\":{\"a\":0}}}", &t, err, sizeof err),
              -ENOTSUP);
    ASSERT_CONTAINS(err, "WordPiece");

    static const struct {
        const char *from, *to, *needle;
    } swaps[] = {
        {"\"normalizer\":null", "\"normalizer\":{\"type\":\"Lowercase\"}", "Lowercase"},
        {"\"normalizer\":null",
         "\"normalizer\":{\"type\":\"Sequence\",\"normalizers\":[{\"type\":\"NFC\"},{\"type\":\"NFKC\"}]}", "NFKC"},
        {"\"pre_tokenizer\":null", "\"pre_tokenizer\":{\"type\":\"Metaspace\",\"replacement\":\"x\"}", "Metaspace"},
        {"\"pre_tokenizer\":null",
         "\"pre_tokenizer\":{\"type\":\"Split\",\"pattern\":{\"Regex\":\"a\"},\"behavior\":\"Removed\",\"invert\":false}",
         "Removed"},
        {"\"pre_tokenizer\":null",
         "\"pre_tokenizer\":{\"type\":\"Split\",\"pattern\":{\"Regex\":\"\\\\w+\"},\"behavior\":\"Isolated\",\"invert\":false}",
         "\\w"},
        {"\"pre_tokenizer\":null",
         "\"pre_tokenizer\":{\"type\":\"Split\",\"pattern\":{\"Regex\":\"(a\"},\"behavior\":\"Isolated\",\"invert\":false}",
         "regex"},
        {"\"pre_tokenizer\":null", "\"pre_tokenizer\":{\"type\":\"ByteLevel\",\"add_prefix_space\":true}",
         "add_prefix_space"},
        {"\"post_processor\":{", "\"post_processor\":{\"type\":\"RobertaProcessing\"},\"x\":{", "RobertaProcessing"},
        {"\"decoder\":{", "\"decoder\":{\"type\":\"CTC\"},\"y\":{", "CTC"},
        {"\"version\":\"1.0\"", "\"truncation\":{\"max_length\":5}", "truncation"},
        {"\"lstrip\":false", "\"lstrip\":true", "lstrip"},
        {"\"merges\":[]", "\"merges\":[\"a q\"]", "merges[0]"},
        {"\"merges\":[]", "\"merges\":[\"a b c\"]", "merges[0]"},
    };
    for (size_t i = 0; i < sizeof swaps / sizeof swaps[0]; i++) {
        char body[8192];
        const char *base = tiny("[]", "");
        const char *at = strstr(base, swaps[i].from);
        ASSERT_TRUE(at != NULL);
        snprintf(body, sizeof body, "%.*s%s%s", (int)(at - base), base, swaps[i].to,
                 at + strlen(swaps[i].from));
        t = NULL;
        int rc = load_body(body, &t, err, sizeof err);
        if (rc == 0 || !strstr(err, swaps[i].needle)) {
            printf("  case %zu: rc %d, err \"%s\", want \"%s\"\n", i, rc, err, swaps[i].needle);
            mm_tokenizer_free(t);
        }
        ASSERT_TRUE(rc == -ENOTSUP || rc == -EINVAL);
        ASSERT_CONTAINS(err, swaps[i].needle);
        ASSERT_TRUE(t == NULL);
    }
}

/* ---- real tokenizers ---------------------------------------------------------- */

static int need_tok(int k)
{
    if (toks[k])
        return 1;
    printf("  %s: not loaded: %s (run tests/fixtures/fetch_tokenizers.sh)\n", tok_names[k], tok_errs[k]);
    return 0;
}

TEST(real_tokenizers_load)
{
    for (int k = 0; k < NTOK; k++)
        ASSERT_TRUE(need_tok(k));
}

TEST(lookups)
{
    mm_tokenizer *q = toks[0], *l3 = toks[1], *l2 = toks[3];
    ASSERT_TRUE(need_tok(0) && need_tok(1) && need_tok(3));
    ASSERT_EQ(mm_tokenizer_token_to_id(q, "<|im_end|>"), 151645);
    ASSERT_EQ(mm_tokenizer_token_to_id(q, "<|im_start|>"), 151644);
    ASSERT_EQ(mm_tokenizer_token_to_id(q, "no such token here"), -1);
    ASSERT_EQ(mm_tokenizer_vocab_size(q), 151669);
    ASSERT_TRUE(mm_tokenizer_is_special(q, 151645));
    ASSERT_TRUE(!mm_tokenizer_is_special(q, 151667)); /* <think> is added, not special */
    size_t len = 0;
    ASSERT_STR_EQ(mm_tokenizer_id_to_token(q, 151645, &len), "<|im_end|>");
    ASSERT_EQ(len, 10);
    ASSERT_TRUE(mm_tokenizer_id_to_token(q, 999999, NULL) == NULL);
    /* Model vocab round trip (Ġ is the byte-level space). */
    int32_t id = mm_tokenizer_token_to_id(q, "\xC4\xA0the");
    ASSERT_TRUE(id >= 0);
    ASSERT_STR_EQ(mm_tokenizer_id_to_token(q, id, NULL), "\xC4\xA0the");
    ASSERT_EQ(mm_tokenizer_token_to_id(l3, "<|begin_of_text|>"), 128000);
    ASSERT_EQ(mm_tokenizer_token_to_id(l3, "<|eot_id|>"), 128009);
    ASSERT_EQ(mm_tokenizer_vocab_size(l3), 128256);
    ASSERT_EQ(mm_tokenizer_token_to_id(l2, "<s>"), 1);
    ASSERT_EQ(mm_tokenizer_vocab_size(l2), 32000);
    size_t n;
    const mm_tok_added *ad = mm_tokenizer_added_tokens(q, &n);
    ASSERT_EQ(n, 26);
    size_t nspecial = 0;
    for (size_t i = 0; i < n; i++)
        nspecial += ad[i].special ? 1 : 0;
    ASSERT_TRUE(nspecial > 10 && nspecial < n);
}

static void print_ids(const char *label, const int32_t *v, size_t n, size_t from)
{
    printf("    %s (len %zu) from %zu:", label, n, from);
    for (size_t i = from; i < n && i < from + 12; i++)
        printf(" %d", v[i]);
    printf("\n");
}

static int ids_match(const char *tname, const char *cname, const char *field, const int32_t *got,
                     size_t n, json_t *want)
{
    size_t wn = json_array_size(want), i;
    for (i = 0; i < n && i < wn; i++)
        if (got[i] != json_integer_value(json_array_get(want, i)))
            break;
    if (i == n && i == wn)
        return 1;
    int32_t *w = malloc((wn + 1) * sizeof *w);
    for (size_t k = 0; w && k < wn; k++)
        w[k] = (int32_t)json_integer_value(json_array_get(want, k));
    printf("  %s/%s: %s differ at %zu\n", tname, cname, field, i);
    print_ids("got ", got, n, i > 3 ? i - 3 : 0);
    if (w)
        print_ids("want", w, wn, i > 3 ? i - 3 : 0);
    free(w);
    return 0;
}

static int str_match(const char *tname, const char *cname, const char *field, const char *got,
                     size_t n, json_t *want)
{
    size_t wn = json_string_length(want);
    if (json_is_string(want) && wn == n && memcmp(got, json_string_value(want), n) == 0)
        return 1;
    printf("  %s/%s: %s differs: got \"%.*s\" want \"%.*s\"\n", tname, cname, field, (int)(n > 200 ? 200 : n),
           got, (int)(wn > 200 ? 200 : wn), json_string_value(want) ? json_string_value(want) : "");
    return 0;
}

static int decode_to(mm_tokenizer *t, const int32_t *ids, size_t n, int skip, mm_buf *out)
{
    mm_buf_reset(out);
    return mm_tokenizer_decode(t, ids, n, skip, out);
}

/* One tokenizer against goldens.json, case by case. */
static void check_goldens(int k)
{
    json_t *tg = json_object_get(json_object_get(goldens, "tokenizers"), tok_names[k]);
    json_t *gc = json_object_get(tg, "cases");
    ASSERT_TRUE(need_tok(k));
    ASSERT_TRUE(json_is_object(gc));
    mm_tokenizer *t = toks[k];
    size_t i, matched = 0, total = 0;
    json_t *c;
    mm_tok_ids a, b;
    mm_buf out;
    char err[256];
    mm_tok_ids_init(&a, 1 << 22);
    mm_tok_ids_init(&b, 1 << 22);
    mm_buf_init(&out, 1 << 26);
    json_array_foreach(cases, i, c) {
        const char *name = json_string_value(json_object_get(c, "name"));
        json_t *text = json_object_get(c, "text"), *g = json_object_get(gc, name);
        total++;
        if (!g) {
            printf("  %s/%s: no golden\n", tok_names[k], name);
            continue;
        }
        a.n = b.n = 0;
        int ok = mm_tokenizer_encode(t, json_string_value(text), json_string_length(text), 0, &a, err,
                                     sizeof err) == 0 &&
                 mm_tokenizer_encode(t, json_string_value(text), json_string_length(text), 1, &b, err,
                                     sizeof err) == 0;
        if (!ok) {
            printf("  %s/%s: encode failed: %s\n", tok_names[k], name, err);
            continue;
        }
        ok &= ids_match(tok_names[k], name, "ids", a.v, a.n, json_object_get(g, "ids"));
        ok &= ids_match(tok_names[k], name, "ids_special", b.v, b.n, json_object_get(g, "ids_special"));
        /* Decode the golden ids, so a decode check does not hinge on encode. */
        json_t *fields[3][3] = {{json_object_get(g, "ids"), json_false(), json_object_get(g, "decoded")},
                                {json_object_get(g, "ids_special"), json_false(), json_object_get(g, "decoded_special")},
                                {json_object_get(g, "ids_special"), json_true(), json_object_get(g, "decoded_skip")}};
        static const char *const fnames[3] = {"decoded", "decoded_special", "decoded_skip"};
        for (int f = 0; f < 3; f++) {
            json_t *gids = fields[f][0];
            size_t n = json_array_size(gids);
            int32_t *v = malloc((n + 1) * sizeof *v);
            ASSERT_TRUE(v != NULL);
            for (size_t q = 0; q < n; q++)
                v[q] = (int32_t)json_integer_value(json_array_get(gids, q));
            ok &= decode_to(t, v, n, json_is_true(fields[f][1]), &out) == 0 &&
                  str_match(tok_names[k], name, fnames[f], out.data ? out.data : "", out.len, fields[f][2]);
            /* Each prefix's decode pins how cut characters become U+FFFD. */
            json_t *pd = f == 0 ? json_object_get(g, "prefix_decodes") : NULL;
            for (size_t q = 0; pd && q < json_array_size(pd) && q < n; q++) {
                if (decode_to(t, v, q + 1, 0, &out) != 0 ||
                    !str_match(tok_names[k], name, "prefix_decode", out.data ? out.data : "", out.len,
                               json_array_get(pd, q))) {
                    printf("    (prefix of %zu ids)\n", q + 1);
                    ok = 0;
                    break;
                }
            }
            free(v);
        }
        matched += ok ? 1 : 0;
    }
    printf("  %s: %zu/%zu cases match the goldens\n", tok_names[k], matched, total);
    mm_tok_ids_free(&a);
    mm_tok_ids_free(&b);
    mm_buf_free(&out);
    ASSERT_EQ(matched, total);
}

static int goldens_present(void)
{
    if (goldens)
        return 1;
    printf("  goldens.json missing: golden comparison skipped (run tests/fixtures/tokenizer/make_goldens.py)\n");
    return 0;
}

TEST(goldens_qwen3)
{
    if (goldens_present())
        check_goldens(0);
}
TEST(goldens_llama3)
{
    if (goldens_present())
        check_goldens(1);
}
TEST(goldens_deepseek_v3)
{
    if (goldens_present())
        check_goldens(2);
}
TEST(goldens_llama2)
{
    if (goldens_present())
        check_goldens(3);
}

/* Stream every case id by id: each push appends valid UTF-8 only, and the
 * pieces plus flush equal decode(), with and without skipping specials. */
TEST(stream_matches_decode)
{
    mm_tok_ids ids;
    mm_buf full, acc, piece;
    char err[256];
    mm_tok_ids_init(&ids, 1 << 22);
    mm_buf_init(&full, 1 << 26);
    mm_buf_init(&acc, 1 << 26);
    mm_buf_init(&piece, 1 << 26);
    size_t streams = 0, pushes_holding = 0;
    for (int k = 0; k < NTOK; k++) {
        ASSERT_TRUE(need_tok(k));
        size_t i;
        json_t *c;
        json_array_foreach(cases, i, c) {
            json_t *text = json_object_get(c, "text");
            ids.n = 0;
            ASSERT_EQ(mm_tokenizer_encode(toks[k], json_string_value(text), json_string_length(text), 1,
                                          &ids, err, sizeof err), 0);
            for (int skip = 0; skip < 2; skip++) {
                ASSERT_EQ(decode_to(toks[k], ids.v, ids.n, skip, &full), 0);
                mm_tok_stream s;
                mm_tok_stream_init(&s, toks[k], skip);
                mm_buf_reset(&acc);
                for (size_t q = 0; q < ids.n; q++) {
                    mm_buf_reset(&piece);
                    ASSERT_EQ(mm_tok_stream_push(&s, ids.v[q], &piece), 0);
                    if (!mm_utf8_valid(piece.data, piece.len)) {
                        printf("  %s/%s: push %zu emitted invalid UTF-8\n", tok_names[k],
                               json_string_value(json_object_get(c, "name")), q);
                        ASSERT_TRUE(0);
                    }
                    pushes_holding += piece.len == 0;
                    ASSERT_EQ(mm_buf_append(&acc, piece.data, piece.len), 0);
                }
                ASSERT_EQ(mm_tok_stream_flush(&s, &acc), 0);
                mm_tok_stream_free(&s);
                if (acc.len != full.len || (full.len && memcmp(acc.data, full.data, full.len) != 0)) {
                    printf("  %s/%s: stream \"%.100s\" != decode \"%.100s\"\n", tok_names[k],
                           json_string_value(json_object_get(c, "name")), mm_buf_cstr(&acc), mm_buf_cstr(&full));
                    ASSERT_TRUE(0);
                }
                streams++;
            }
        }
    }
    printf("  %zu streams equal decode(); %zu pushes emitted nothing (held)\n", streams, pushes_holding);
    mm_tok_ids_free(&ids);
    mm_buf_free(&full);
    mm_buf_free(&acc);
    mm_buf_free(&piece);
}

/* A character cut across tokens: nothing comes out until it is whole. */
TEST(stream_holds_partial_chars)
{
    static const char *const texts[] = {"\xF0\x9F\x98\x80", "\xE4\xBD\xA0\xE5\xA5\xBD",
                                        "\xF0\x9F\x91\xA8\xE2\x80\x8D\xF0\x9F\x91\xA9"};
    size_t cut_seen = 0;
    for (int k = 0; k < NTOK; k++) {
        ASSERT_TRUE(need_tok(k));
        for (size_t x = 0; x < 3; x++) {
            mm_tok_ids ids;
            mm_buf acc, full;
            char err[128];
            mm_tok_ids_init(&ids, 1024);
            mm_buf_init(&acc, 1 << 16);
            mm_buf_init(&full, 1 << 16);
            ASSERT_EQ(mm_tokenizer_encode(toks[k], texts[x], strlen(texts[x]), 0, &ids, err, sizeof err), 0);
            ASSERT_EQ(mm_tokenizer_decode(toks[k], ids.v, ids.n, 0, &full), 0);
            mm_tok_stream s;
            mm_tok_stream_init(&s, toks[k], 0);
            for (size_t q = 0; q < ids.n; q++) {
                size_t before = acc.len;
                ASSERT_EQ(mm_tok_stream_push(&s, ids.v[q], &acc), 0);
                /* Output so far is always whole characters and a prefix of the full text. */
                ASSERT_TRUE(mm_utf8_valid(acc.data, acc.len));
                ASSERT_TRUE(acc.len <= full.len &&
                            (acc.len == 0 || memcmp(acc.data, full.data, acc.len) == 0));
                cut_seen += acc.len == before;
            }
            ASSERT_EQ(mm_tok_stream_flush(&s, &acc), 0);
            ASSERT_EQ(acc.len, full.len);
            ASSERT_TRUE(strstr(mm_buf_cstr(&full), texts[x]) != NULL);
            mm_tok_stream_free(&s);
            mm_tok_ids_free(&ids);
            mm_buf_free(&acc);
            mm_buf_free(&full);
        }
    }
    /* Some tokenizer splits some of these characters across tokens. */
    ASSERT_TRUE(cut_seen > 0);
}

/* An unfinished character at the end of a stream is one U+FFFD; a broken one
 * in the middle is replaced at once (qwen3: bytes E4, then 'a'). */
TEST(stream_invalid_bytes)
{
    ASSERT_TRUE(need_tok(0));
    mm_tokenizer *q = toks[0];
    /* Byte-level tokens for bytes 0xE4 and 0xBD are U+00E4 and U+00BD. */
    int32_t e4 = mm_tokenizer_token_to_id(q, "\xC3\xA4"), bd = mm_tokenizer_token_to_id(q, "\xC2\xBD"),
            a = mm_tokenizer_token_to_id(q, "a");
    ASSERT_TRUE(e4 >= 0 && bd >= 0 && a >= 0);
    mm_tok_stream s;
    mm_buf out;
    mm_buf_init(&out, 1 << 10);
    mm_tok_stream_init(&s, q, 0);
    ASSERT_EQ(mm_tok_stream_push(&s, e4, &out), 0);
    ASSERT_EQ(out.len, 0);
    ASSERT_EQ(mm_tok_stream_push(&s, bd, &out), 0);
    ASSERT_EQ(out.len, 0);
    ASSERT_EQ(mm_tok_stream_push(&s, a, &out), 0);
    ASSERT_STR_EQ(mm_buf_cstr(&out), "\xEF\xBF\xBD" "a");
    ASSERT_EQ(mm_tok_stream_push(&s, e4, &out), 0);
    ASSERT_EQ(mm_tok_stream_flush(&s, &out), 0);
    ASSERT_STR_EQ(mm_buf_cstr(&out), "\xEF\xBF\xBD" "a\xEF\xBF\xBD");
    mm_tok_stream_free(&s);
    mm_buf_free(&out);
}

/* Threads share one tokenizer (its word cache is locked): each thread's ids
 * must equal a single-threaded encode of the same texts. */
typedef struct thr_arg {
    mm_tokenizer *t;
    int           ok;
} thr_arg;

static void *thr_encode(void *p)
{
    thr_arg *a = p;
    mm_tok_ids x, y;
    char err[128];
    mm_tok_ids_init(&x, 1 << 22);
    mm_tok_ids_init(&y, 1 << 22);
    a->ok = 1;
    for (int round = 0; round < 20 && a->ok; round++) {
        size_t i;
        json_t *c;
        json_array_foreach(cases, i, c) {
            json_t *text = json_object_get(c, "text");
            x.n = 0;
            if (mm_tokenizer_encode(a->t, json_string_value(text), json_string_length(text), 1, &x, err,
                                    sizeof err) != 0) {
                a->ok = 0;
                break;
            }
            if (round == 0) {
                if (mm_tok_ids_push(&y, (int32_t)x.n) != 0) {
                    a->ok = 0;
                    break;
                }
                for (size_t k = 0; k < x.n; k++)
                    mm_tok_ids_push(&y, x.v[k]);
            }
        }
    }
    /* Replay: the first round's ids, recorded as (count, ids...), must recur. */
    size_t at = 0, i;
    json_t *c;
    json_array_foreach(cases, i, c) {
        json_t *text = json_object_get(c, "text");
        x.n = 0;
        if (!a->ok || at >= y.n ||
            mm_tokenizer_encode(a->t, json_string_value(text), json_string_length(text), 1, &x, err,
                                sizeof err) != 0 ||
            (size_t)y.v[at] != x.n || (x.n && memcmp(y.v + at + 1, x.v, x.n * sizeof *x.v) != 0)) {
            a->ok = 0;
            break;
        }
        at += 1 + x.n;
    }
    mm_tok_ids_free(&x);
    mm_tok_ids_free(&y);
    return NULL;
}

TEST(threads_share_tokenizer)
{
    ASSERT_TRUE(need_tok(0));
    enum { NT = 4 };
    pthread_t th[NT];
    thr_arg args[NT];
    for (int i = 0; i < NT; i++) {
        args[i] = (thr_arg){.t = toks[i % 2 ? 0 : 3]};
        if (!toks[3])
            args[i].t = toks[0];
        ASSERT_EQ(pthread_create(&th[i], NULL, thr_encode, &args[i]), 0);
    }
    for (int i = 0; i < NT; i++)
        pthread_join(th[i], NULL);
    for (int i = 0; i < NT; i++)
        ASSERT_TRUE(args[i].ok);
}

/* ---- throughput ------------------------------------------------------------ */

static int build_corpus(mm_buf *b, size_t want)
{
    /* Real prose (license texts), code and the multilingual cases. */
    FILE *f = popen("cat /usr/share/common-licenses/* 2>/dev/null; cat worker/*.c 2>/dev/null", "r");
    char chunk[65536];
    size_t n;
    while (f && (n = fread(chunk, 1, sizeof chunk, f)) > 0)
        if (mm_buf_append(b, chunk, n))
            break;
    if (f)
        pclose(f);
    size_t i;
    json_t *c;
    json_array_foreach(cases, i, c) {
        json_t *t = json_object_get(c, "text");
        mm_buf_append(b, json_string_value(t), json_string_length(t));
    }
    /* Repeat it (from a copy: appending may move b->data). */
    size_t base = b->len;
    char *copy = malloc(base ? base : 1);
    if (!copy)
        return 0;
    memcpy(copy, b->data, base);
    while (b->len < want && base)
        if (mm_buf_append(b, copy, base < want - b->len ? base : want - b->len))
            break;
    free(copy);
    /* Truncation may cut a character: back up to a boundary. */
    while (b->len && !mm_utf8_valid(b->data, b->len))
        b->len--;
    return b->len > 0;
}

TEST(throughput)
{
    mm_buf corpus;
    mm_buf_init(&corpus, 64 << 20);
    ASSERT_TRUE(build_corpus(&corpus, 4 << 20));
    mm_tok_ids ids;
    mm_tok_ids_init(&ids, 64 << 20);
    for (int k = 0; k < NTOK; k++) {
        if (!need_tok(k))
            continue;
        char err[128];
        ids.n = 0;
        double t0 = now_s();
        ASSERT_EQ(mm_tokenizer_encode(toks[k], corpus.data, corpus.len, 0, &ids, err, sizeof err), 0);
        double dt = now_s() - t0;
        mm_buf out;
        mm_buf_init(&out, 128 << 20);
        double t1 = now_s();
        ASSERT_EQ(mm_tokenizer_decode(toks[k], ids.v, ids.n, 0, &out), 0);
        double dd = now_s() - t1;
        printf("  %-12s encode %.1f MB/s (%zu bytes -> %zu ids, %.3f s), decode %.1f MB/s\n", tok_names[k],
               (double)corpus.len / dt / 1e6, corpus.len, ids.n, dt, (double)out.len / dd / 1e6);
        ASSERT_TRUE(ids.n > corpus.len / 16);
        mm_buf_free(&out);
    }
    mm_tok_ids_free(&ids);
    mm_buf_free(&corpus);
}

int main(void)
{
    snprintf(tmpdir, sizeof tmpdir, "%s/mm_tok_XXXXXX", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
    if (!mkdtemp(tmpdir)) {
        perror("mkdtemp");
        return 1;
    }
    json_error_t jerr;
    cases = json_load_file(CASES_PATH, JSON_ALLOW_NUL, &jerr);
    if (!cases)
        printf("cannot load %s: %s (run from the repository root)\n", CASES_PATH, jerr.text);
    const char *gp = getenv("MM_TOKENIZER_GOLDENS");
    gp = gp && *gp ? gp : GOLDENS_PATH;
    if (access(gp, F_OK) == 0) {
        goldens = json_load_file(gp, JSON_ALLOW_NUL, &jerr);
        if (!goldens) /* present but unreadable counts as a failure below */
            printf("cannot parse %s: line %d: %s\n", gp, jerr.line, jerr.text);
    }
    for (int k = 0; k < NTOK; k++) {
        char path[512];
        snprintf(path, sizeof path, "%s/%s/tokenizer.json", tok_dir(), tok_names[k]);
        double t0 = now_s();
        if (mm_tokenizer_load(path, &toks[k], tok_errs[k], sizeof tok_errs[k]) == 0)
            printf("loaded %s in %.2f s\n", path, now_s() - t0);
    }

    RUN(nfc_examples);
    RUN(nfc_versions);
    RUN(nfc_long_mark_run);
    RUN(nfc_conformance);
    RUN(bpe_merge_rank_order);
    RUN(bpe_options);
    RUN(regex_dialect);
    RUN(load_errors);
    if (!cases) {
        test_failed++;
    } else {
        RUN(real_tokenizers_load);
        RUN(lookups);
        if (!goldens && access(gp, F_OK) == 0)
            test_failed++;
        RUN(goldens_qwen3);
        RUN(goldens_llama3);
        RUN(goldens_deepseek_v3);
        RUN(goldens_llama2);
        RUN(stream_matches_decode);
        RUN(stream_holds_partial_chars);
        RUN(stream_invalid_bytes);
        RUN(threads_share_tokenizer);
        if (!getenv("MM_TOKENIZER_NO_BENCH"))
            RUN(throughput);
    }
    for (int k = 0; k < NTOK; k++)
        mm_tokenizer_free(toks[k]);
    json_decref(cases);
    json_decref(goldens);
    char path[512];
    snprintf(path, sizeof path, "%s/tok.json", tmpdir);
    unlink(path);
    rmdir(tmpdir);
    return test_summary();
}
