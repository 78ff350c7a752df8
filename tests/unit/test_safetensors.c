/* test_safetensors.c: parsing, validation (each corruption gives one error
 * naming the file and the tensor), lookup, shards, and the writer. */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "safetensors.h"
#include "test.h"

static char root[64];
static char path[256];

/* Write an 8-byte length (hlen, or the header's length when hlen < 0), the
 * header text and data_len bytes of data (byte i = i). */
static void write_raw(const char *name, const char *header, long long hlen, size_t data_len)
{
    snprintf(path, sizeof path, "%s/%s", root, name);
    FILE *fp = fopen(path, "wb");
    uint64_t n = hlen < 0 ? strlen(header) : (uint64_t)hlen;
    unsigned char len[8];
    for (int i = 0; i < 8; i++)
        len[i] = (unsigned char)(n >> (8 * i));
    fwrite(len, 1, 8, fp);
    fwrite(header, 1, strlen(header), fp);
    for (size_t i = 0; i < data_len; i++)
        fputc((int)(i & 0xff), fp);
    fclose(fp);
}

/* Expect mm_st_open to fail with an error containing both needles. */
static int open_fails(const char *n1, const char *n2, char *err, size_t errlen)
{
    mm_st_file *f = NULL;
    int rc = mm_st_open(path, &f, err, errlen);
    if (rc >= 0 || f) {
        mm_st_close(f);
        printf("  opened, expected an error containing \"%s\"\n", n1);
        return 0;
    }
    /* every message names the file */
    if (!strstr(err, path) || !strstr(err, n1) || (n2 && !strstr(err, n2))) {
        printf("  error \"%s\" lacks %s / \"%s\" / \"%s\"\n", err, path, n1, n2 ? n2 : "");
        return 0;
    }
    return 1;
}

TEST(valid_file_lookup_and_contents)
{
    write_raw("ok.safetensors",
              "{\"__metadata__\":{\"format\":\"pt\"},"
              "\"b\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[12,28]},"
              "\"a\":{\"dtype\":\"BF16\",\"shape\":[2,3],\"data_offsets\":[0,12]},"
              "\"empty\":{\"dtype\":\"F16\",\"shape\":[0,5],\"data_offsets\":[28,28]}}",
              -1, 28);
    char err[256];
    mm_st_file *f = NULL;
    ASSERT_EQ(mm_st_open(path, &f, err, sizeof err), 0);
    ASSERT_EQ(mm_st_file_count(f), 3);
    const mm_st_tensor *a = mm_st_file_find(f, "a"), *b = mm_st_file_find(f, "b");
    ASSERT_TRUE(a && b);
    ASSERT_TRUE(!mm_st_file_find(f, "c") && !mm_st_file_find(f, "__metadata__"));
    ASSERT_EQ(a->dtype, MM_DT_BF16);
    ASSERT_EQ(a->ndim, 2);
    ASSERT_EQ(a->shape[0], 2);
    ASSERT_EQ(a->shape[1], 3);
    ASSERT_EQ(a->numel, 6);
    ASSERT_EQ(a->nbytes, 12);
    ASSERT_EQ(((const unsigned char *)a->data)[0], 0);
    ASSERT_EQ(((const unsigned char *)b->data)[0], 12);
    ASSERT_EQ(b->nbytes, 16);
    ASSERT_STR_EQ(b->file, path);
    ASSERT_EQ(mm_st_file_find(f, "empty")->numel, 0);
    mm_st_close(f);
}

TEST(file_shorter_than_length_prefix)
{
    snprintf(path, sizeof path, "%s/short.safetensors", root);
    FILE *fp = fopen(path, "wb");
    fwrite("\x05\x00\x00", 1, 3, fp);
    fclose(fp);
    char err[256];
    ASSERT_TRUE(open_fails("too short", NULL, err, sizeof err));
}

TEST(missing_file)
{
    snprintf(path, sizeof path, "%s/nope.safetensors", root);
    char err[256];
    mm_st_file *f = NULL;
    ASSERT_EQ(mm_st_open(path, &f, err, sizeof err), -ENOENT);
    ASSERT_CONTAINS(err, "nope.safetensors");
}

TEST(header_length_beyond_file)
{
    write_raw("hlen.safetensors", "{}", 1000, 0);
    char err[256];
    ASSERT_TRUE(open_fails("header length 1000 beyond the end", NULL, err, sizeof err));
    write_raw("hcap.safetensors", "{}", (long long)MM_ST_HEADER_MAX + 1, 0);
    ASSERT_TRUE(open_fails("cap", NULL, err, sizeof err));
}

TEST(truncated_data)
{
    /* a valid header whose last tensor runs past the end of the file */
    write_raw("trunc.safetensors",
              "{\"w\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16]},"
              "\"tail\":{\"dtype\":\"F32\",\"shape\":[8],\"data_offsets\":[16,48]}}",
              -1, 40);
    char err[256];
    ASSERT_TRUE(open_fails("tensor tail", "beyond the end of the data (40 bytes", err,
                           sizeof err));
    ASSERT_CONTAINS(err, "trunc.safetensors");
}

TEST(offsets_bad)
{
    char err[256];
    write_raw("rev.safetensors",
              "{\"x\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[8,4]}}", -1, 8);
    ASSERT_TRUE(open_fails("tensor x", "begin <= end", err, sizeof err));
    write_raw("neg.safetensors",
              "{\"x\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[-4,0]}}", -1, 8);
    ASSERT_TRUE(open_fails("tensor x", NULL, err, sizeof err));
    write_raw("one.safetensors", "{\"x\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0]}}",
              -1, 8);
    ASSERT_TRUE(open_fails("tensor x", NULL, err, sizeof err));
}

TEST(overlapping_tensors)
{
    write_raw("overlap.safetensors",
              "{\"first\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]},"
              "\"second\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}",
              -1, 16);
    char err[256];
    ASSERT_TRUE(open_fails("overlaps", "first", err, sizeof err));
    ASSERT_CONTAINS(err, "second");
}

TEST(bad_dtype)
{
    write_raw("dtype.safetensors",
              "{\"q\":{\"dtype\":\"Q4_K\",\"shape\":[4],\"data_offsets\":[0,2]}}", -1, 2);
    char err[256];
    ASSERT_TRUE(open_fails("tensor q", "unknown dtype \"Q4_K\"", err, sizeof err));
}

TEST(shape_size_mismatch)
{
    write_raw("size.safetensors",
              "{\"m\":{\"dtype\":\"BF16\",\"shape\":[3,3],\"data_offsets\":[0,16]}}", -1, 16);
    char err[256];
    ASSERT_TRUE(open_fails("tensor m", "16 bytes of data but shape and BF16 need 18", err,
                           sizeof err));
    write_raw("negdim.safetensors",
              "{\"m\":{\"dtype\":\"BF16\",\"shape\":[-1,2],\"data_offsets\":[0,4]}}", -1, 4);
    ASSERT_TRUE(open_fails("tensor m", "shape", err, sizeof err));
    write_raw("huge.safetensors",
              "{\"m\":{\"dtype\":\"F64\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,4]}}",
              -1, 4);
    ASSERT_TRUE(open_fails("tensor m", NULL, err, sizeof err));
}

TEST(malformed_headers)
{
    char err[256];
    write_raw("json.safetensors", "{\"a\": [", -1, 0);
    ASSERT_TRUE(open_fails("not a JSON object", NULL, err, sizeof err));
    write_raw("arr.safetensors", "[1,2]", -1, 0);
    ASSERT_TRUE(open_fails("not a JSON object", NULL, err, sizeof err));
    write_raw("dup.safetensors",
              "{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
              "\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[1,2]}}",
              -1, 2);
    ASSERT_TRUE(open_fails("dup.safetensors", NULL, err, sizeof err));
    write_raw("nodtype.safetensors", "{\"a\":{\"shape\":[1],\"data_offsets\":[0,1]}}", -1, 1);
    ASSERT_TRUE(open_fails("tensor a", "dtype", err, sizeof err));
    write_raw("meta.safetensors", "{\"__metadata__\": 5}", -1, 0);
    ASSERT_TRUE(open_fails("__metadata__", NULL, err, sizeof err));
}

static void write_model(const char *name, const char *const *names, int n, int64_t len)
{
    mm_st_desc d[4];
    for (int i = 0; i < n; i++)
        d[i] = (mm_st_desc){names[i], MM_DT_F32, 1, {len}};
    snprintf(path, sizeof path, "%s/%s", root, name);
    FILE *fp = fopen(path, "wb");
    char err[128];
    if (mm_st_write_header(fp, d, (size_t)n, err, sizeof err) == 0)
        for (int i = 0; i < n; i++)
            for (int64_t k = 0; k < len; k++) {
                float v = (float)(i * 100 + k);
                fwrite(&v, 4, 1, fp);
            }
    fclose(fp);
}

TEST(writer_roundtrip_and_alignment)
{
    const char *names[] = {"x", "yy", "zzz"};
    write_model("w.safetensors", names, 3, 5);
    char err[256];
    mm_st_file *f = NULL;
    ASSERT_EQ(mm_st_open(path, &f, err, sizeof err), 0);
    ASSERT_EQ(mm_st_file_count(f), 3);
    const mm_st_tensor *t = mm_st_file_find(f, "zzz");
    ASSERT_TRUE(t);
    ASSERT_EQ(t->nbytes, 20);
    ASSERT_EQ((uintptr_t)t->data % 4, 0);
    ASSERT_EQ((int)((const float *)t->data)[3], 203);
    ASSERT_EQ((uintptr_t)mm_st_file_find(f, "x")->data % 8, 0);   /* header padded */
    mm_st_close(f);
}

static void write_text(const char *name, const char *text)
{
    snprintf(path, sizeof path, "%s/%s", root, name);
    FILE *fp = fopen(path, "w");
    fputs(text, fp);
    fclose(fp);
}

TEST(sharded_set)
{
    char err[256], dir[128];
    snprintf(dir, sizeof dir, "%s/shard", root);
    ASSERT_EQ(mkdir(dir, 0755), 0);
    const char *n1[] = {"a", "b"}, *n2[] = {"c"};
    write_model("shard/model-00001-of-00002.safetensors", n1, 2, 3);
    write_model("shard/model-00002-of-00002.safetensors", n2, 1, 3);
    write_text("shard/model.safetensors.index.json",
               "{\"metadata\":{\"total_size\":36},\"weight_map\":{"
               "\"a\":\"model-00001-of-00002.safetensors\","
               "\"b\":\"model-00001-of-00002.safetensors\","
               "\"c\":\"model-00002-of-00002.safetensors\"}}");
    mm_st_set *s = NULL;
    ASSERT_EQ(mm_st_set_open(dir, &s, err, sizeof err), 0);
    ASSERT_EQ(mm_st_set_files(s), 2);
    const mm_st_tensor *c = mm_st_set_find(s, "c");
    ASSERT_TRUE(c && mm_st_set_find(s, "a") && !mm_st_set_find(s, "d"));
    ASSERT_CONTAINS(c->file, "model-00002-of-00002.safetensors");
    ASSERT_EQ((int)((const float *)c->data)[1], 1);
    ASSERT_CONTAINS(mm_st_set_origin(s), "model.safetensors.index.json");
    mm_st_set_close(s);

    /* the map names a tensor its shard lacks */
    write_text("shard/model.safetensors.index.json",
               "{\"weight_map\":{\"a\":\"model-00001-of-00002.safetensors\","
               "\"c\":\"model-00001-of-00002.safetensors\"}}");
    ASSERT_TRUE(mm_st_set_open(dir, &s, err, sizeof err) < 0 && !s);
    ASSERT_CONTAINS(err, "model-00001-of-00002.safetensors: tensor c");
    /* a missing shard */
    write_text("shard/model.safetensors.index.json",
               "{\"weight_map\":{\"a\":\"model-00003-of-00003.safetensors\"}}");
    ASSERT_TRUE(mm_st_set_open(dir, &s, err, sizeof err) < 0);
    ASSERT_CONTAINS(err, "model-00003-of-00003.safetensors");
    /* a shard name that leaves the directory */
    write_text("shard/model.safetensors.index.json",
               "{\"weight_map\":{\"a\":\"../w.safetensors\"}}");
    ASSERT_TRUE(mm_st_set_open(dir, &s, err, sizeof err) < 0);
    ASSERT_CONTAINS(err, "tensor a: bad shard file name");
    /* no weight_map */
    write_text("shard/model.safetensors.index.json", "{\"metadata\":{}}");
    ASSERT_TRUE(mm_st_set_open(dir, &s, err, sizeof err) < 0);
    ASSERT_CONTAINS(err, "weight_map");
}

TEST(single_file_set_and_missing)
{
    char err[256], dir[128];
    snprintf(dir, sizeof dir, "%s/single", root);
    ASSERT_EQ(mkdir(dir, 0755), 0);
    mm_st_set *s = NULL;
    ASSERT_TRUE(mm_st_set_open(dir, &s, err, sizeof err) < 0);
    ASSERT_CONTAINS(err, "single/model.safetensors");
    const char *n[] = {"w"};
    write_model("single/model.safetensors", n, 1, 2);
    ASSERT_EQ(mm_st_set_open(dir, &s, err, sizeof err), 0);
    ASSERT_TRUE(mm_st_set_find(s, "w") != NULL);
    ASSERT_CONTAINS(mm_st_set_origin(s), "single/model.safetensors");
    mm_st_set_close(s);
}

TEST(dtype_names)
{
    ASSERT_EQ(mm_dtype_parse("BF16"), MM_DT_BF16);
    ASSERT_EQ(mm_dtype_parse("F8_E4M3"), MM_DT_F8_E4M3);
    ASSERT_EQ(mm_dtype_parse("bf16"), -1);
    ASSERT_EQ(mm_dtype_size(MM_DT_F64), 8);
    ASSERT_EQ(mm_dtype_size(MM_DT_BF16), 2);
    ASSERT_STR_EQ(mm_dtype_name(MM_DT_F16), "F16");
}

int main(void)
{
    snprintf(root, sizeof root, "/tmp/mm_test_st_XXXXXX");
    if (!mkdtemp(root)) {
        perror("mkdtemp");
        return 1;
    }
    RUN(valid_file_lookup_and_contents);
    RUN(file_shorter_than_length_prefix);
    RUN(missing_file);
    RUN(header_length_beyond_file);
    RUN(truncated_data);
    RUN(offsets_bad);
    RUN(overlapping_tensors);
    RUN(bad_dtype);
    RUN(shape_size_mismatch);
    RUN(malformed_headers);
    RUN(writer_roundtrip_and_alignment);
    RUN(sharded_set);
    RUN(single_file_set_and_missing);
    RUN(dtype_names);
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", root);
    if (system(cmd) != 0)
        printf("cleanup of %s failed\n", root);
    return test_summary();
}
