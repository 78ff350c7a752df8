/* safetensors.c: open, validate and index .safetensors files (mmap'd, so the
 * weights are paged in on demand and shared with the page cache), plus the
 * sharded layout that model.safetensors.index.json describes. */
#include "errmsg.h"
#include "safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

static const struct {
    const char *name;
    size_t size;
} dtypes[MM_DT_COUNT] = {
    [MM_DT_BOOL] = {"BOOL", 1},       [MM_DT_U8] = {"U8", 1},
    [MM_DT_I8] = {"I8", 1},           [MM_DT_I16] = {"I16", 2},
    [MM_DT_U16] = {"U16", 2},         [MM_DT_F16] = {"F16", 2},
    [MM_DT_BF16] = {"BF16", 2},       [MM_DT_I32] = {"I32", 4},
    [MM_DT_U32] = {"U32", 4},         [MM_DT_F32] = {"F32", 4},
    [MM_DT_I64] = {"I64", 8},         [MM_DT_U64] = {"U64", 8},
    [MM_DT_F64] = {"F64", 8},         [MM_DT_F8_E4M3] = {"F8_E4M3", 1},
    [MM_DT_F8_E5M2] = {"F8_E5M2", 1},
};

const char *mm_dtype_name(mm_dtype dt)
{
    return (unsigned)dt < MM_DT_COUNT ? dtypes[dt].name : "?";
}

size_t mm_dtype_size(mm_dtype dt)
{
    return (unsigned)dt < MM_DT_COUNT ? dtypes[dt].size : 0;
}

int mm_dtype_parse(const char *name)
{
    for (int i = 0; i < MM_DT_COUNT; i++)
        if (strcmp(dtypes[i].name, name) == 0)
            return i;
    return -1;
}

struct mm_st_file {
    char         *path;
    void         *map;
    size_t        size;
    mm_st_tensor *t;      /* sorted by name */
    size_t        n;
};


static int cmp_name(const void *a, const void *b)
{
    return strcmp(((const mm_st_tensor *)a)->name, ((const mm_st_tensor *)b)->name);
}

static int cmp_offset(const void *a, const void *b)
{
    const mm_st_tensor *x = *(const mm_st_tensor *const *)a, *y = *(const mm_st_tensor *const *)b;
    const char *px = x->data, *py = y->data;
    return px < py ? -1 : px > py;
}

static void free_tensors(mm_st_tensor *t, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free((char *)t[i].name);
    free(t);
}

/* Fill *t from one header entry; data is relative to the data section. */
static int parse_entry(const char *path, const char *name, json_t *v, const char *data,
                       size_t data_len, mm_st_tensor *t, char *err, size_t errlen)
{
    json_t *jdt = json_object_get(v, "dtype"), *jshape = json_object_get(v, "shape");
    json_t *joff = json_object_get(v, "data_offsets");
    if (!json_is_object(v) || !json_is_string(jdt) || !json_is_array(jshape) ||
        !json_is_array(joff)) {
        mm_errf(err, errlen, "%s: tensor %s: header entry needs dtype, shape and data_offsets",
               path, name);
        return -EINVAL;
    }
    int dt = mm_dtype_parse(json_string_value(jdt));
    if (dt < 0) {
        mm_errf(err, errlen, "%s: tensor %s: unknown dtype \"%s\"", path, name,
               json_string_value(jdt));
        return -EINVAL;
    }
    size_t nd = json_array_size(jshape);
    if (nd > MM_ST_MAX_DIMS) {
        mm_errf(err, errlen, "%s: tensor %s: %zu dimensions (at most %d)", path, name, nd,
               MM_ST_MAX_DIMS);
        return -EINVAL;
    }
    /* The numel cap keeps numel * element size far from overflowing. */
    int64_t numel = 1;
    for (size_t i = 0; i < nd; i++) {
        json_t *d = json_array_get(jshape, i);
        if (!json_is_integer(d) || json_integer_value(d) < 0 ||
            json_integer_value(d) > ((int64_t)1 << 48)) {
            mm_errf(err, errlen, "%s: tensor %s: bad shape entry %zu", path, name, i);
            return -EINVAL;
        }
        t->shape[i] = json_integer_value(d);
        if (t->shape[i] && numel > ((int64_t)1 << 56) / t->shape[i]) {
            mm_errf(err, errlen, "%s: tensor %s: shape too large", path, name);
            return -EINVAL;
        }
        numel *= t->shape[i];
    }
    json_t *jb = json_array_get(joff, 0), *je = json_array_get(joff, 1);
    if (json_array_size(joff) != 2 || !json_is_integer(jb) || !json_is_integer(je) ||
        json_integer_value(jb) < 0 || json_integer_value(je) < json_integer_value(jb)) {
        mm_errf(err, errlen, "%s: tensor %s: data_offsets must be [begin, end] with begin <= end",
               path, name);
        return -EINVAL;
    }
    uint64_t b = (uint64_t)json_integer_value(jb), e = (uint64_t)json_integer_value(je);
    if (e > data_len) {
        mm_errf(err, errlen,
               "%s: tensor %s: data_offsets [%llu, %llu) beyond the end of the data (%zu bytes; "
               "file truncated?)",
               path, name, (unsigned long long)b, (unsigned long long)e, data_len);
        return -EINVAL;
    }
    uint64_t want = (uint64_t)numel * dtypes[dt].size;
    if (e - b != want) {
        mm_errf(err, errlen, "%s: tensor %s: %llu bytes of data but shape and %s need %llu", path,
               name, (unsigned long long)(e - b), dtypes[dt].name, (unsigned long long)want);
        return -EINVAL;
    }
    t->dtype = (mm_dtype)dt;
    t->ndim = (int)nd;
    t->numel = numel;
    t->data = data + b;
    t->nbytes = (size_t)(e - b);
    t->file = path;
    return 0;
}

static int parse_header(mm_st_file *f, const char *hdr, size_t hlen, char *err, size_t errlen)
{
    const char *data = hdr + hlen;
    size_t data_len = f->size - 8 - hlen;
    json_error_t je;
    mm_st_tensor **byoff = NULL;
    int rc = -EINVAL;
    json_t *root = json_loadb(hdr, hlen, JSON_REJECT_DUPLICATES, &je);
    if (!root || !json_is_object(root)) {
        mm_errf(err, errlen, "%s: header is not a JSON object%s%s", f->path, root ? "" : ": ",
               root ? "" : je.text);
        goto out;
    }
    size_t cap = json_object_size(root);
    f->t = calloc(cap ? cap : 1, sizeof *f->t);
    if (!f->t) {
        rc = -ENOMEM;
        mm_errf(err, errlen, "%s: out of memory", f->path);
        goto out;
    }
    const char *key;
    json_t *v;
    json_object_foreach(root, key, v) {
        if (strcmp(key, "__metadata__") == 0) {
            if (!json_is_object(v)) {
                mm_errf(err, errlen, "%s: __metadata__ is not an object", f->path);
                goto out;
            }
            continue;
        }
        mm_st_tensor *t = &f->t[f->n];
        if ((rc = parse_entry(f->path, key, v, data, data_len, t, err, errlen)) < 0)
            goto out;
        if (!(t->name = strdup(key))) {
            rc = -ENOMEM;
            mm_errf(err, errlen, "%s: out of memory", f->path);
            goto out;
        }
        f->n++;
    }
    rc = -ENOMEM;
    if (!(byoff = malloc((f->n ? f->n : 1) * sizeof *byoff))) {
        mm_errf(err, errlen, "%s: out of memory", f->path);
        goto out;
    }
    for (size_t i = 0; i < f->n; i++)
        byoff[i] = &f->t[i];
    qsort(byoff, f->n, sizeof *byoff, cmp_offset);
    rc = -EINVAL;
    for (size_t i = 1; i < f->n; i++) {
        const mm_st_tensor *p = byoff[i - 1], *q = byoff[i];
        if ((const char *)p->data + p->nbytes > (const char *)q->data) {
            mm_errf(err, errlen, "%s: tensor %s: data overlaps tensor %s", f->path, q->name,
                   p->name);
            goto out;
        }
    }
    qsort(f->t, f->n, sizeof *f->t, cmp_name);
    rc = 0;
out:
    free(byoff);
    json_decref(root);
    return rc;
}

int mm_st_open(const char *path, mm_st_file **out, char *err, size_t errlen)
{
    int rc, fd = -1;
    mm_st_file *f = calloc(1, sizeof *f);
    *out = NULL;
    if (!f || !(f->path = strdup(path))) {
        rc = -ENOMEM;
        mm_errf(err, errlen, "%s: out of memory", path);
        goto fail;
    }
    if ((fd = open(path, O_RDONLY | O_CLOEXEC)) < 0) {
        rc = -errno;
        mm_errf(err, errlen, "%s: %s", path, strerror(errno));
        goto fail;
    }
    struct stat st;
    if (fstat(fd, &st) < 0) {
        rc = -errno;
        mm_errf(err, errlen, "%s: %s", path, strerror(errno));
        goto fail;
    }
    rc = -EINVAL;
    if (!S_ISREG(st.st_mode)) {
        mm_errf(err, errlen, "%s: not a regular file", path);
        goto fail;
    }
    if (st.st_size < 8) {
        mm_errf(err, errlen, "%s: file too short (%lld bytes) for a safetensors header", path,
               (long long)st.st_size);
        goto fail;
    }
    f->size = (size_t)st.st_size;
    f->map = mmap(NULL, f->size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (f->map == MAP_FAILED) {
        f->map = NULL;
        rc = -errno;
        mm_errf(err, errlen, "%s: mmap: %s", path, strerror(errno));
        goto fail;
    }
    const unsigned char *p = f->map;
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--)
        hlen = hlen << 8 | p[i];
    if (hlen > MM_ST_HEADER_MAX) {
        mm_errf(err, errlen, "%s: header length %llu over the %u-byte cap", path,
               (unsigned long long)hlen, MM_ST_HEADER_MAX);
        goto fail;
    }
    if (hlen > f->size - 8) {
        mm_errf(err, errlen, "%s: header length %llu beyond the end of the file (%zu bytes; "
               "truncated?)", path, (unsigned long long)hlen, f->size);
        goto fail;
    }
    if ((rc = parse_header(f, (const char *)p + 8, (size_t)hlen, err, errlen)) < 0)
        goto fail;
    close(fd);
    *out = f;
    return 0;
fail:
    if (fd >= 0)
        close(fd);
    mm_st_close(f);
    return rc;
}

void mm_st_close(mm_st_file *f)
{
    if (!f)
        return;
    if (f->map)
        munmap(f->map, f->size);
    free_tensors(f->t, f->n);
    free(f->path);
    free(f);
}

const char *mm_st_file_path(const mm_st_file *f) { return f->path; }
size_t mm_st_file_count(const mm_st_file *f) { return f->n; }
const mm_st_tensor *mm_st_file_tensor(const mm_st_file *f, size_t i)
{
    return i < f->n ? &f->t[i] : NULL;
}

const mm_st_tensor *mm_st_file_find(const mm_st_file *f, const char *name)
{
    mm_st_tensor key = {.name = name};
    return bsearch(&key, f->t, f->n, sizeof *f->t, cmp_name);
}

/* ---- sets ---- */

struct mm_st_set {
    char          *origin;
    mm_st_file   **files;
    size_t         nfiles;
    const mm_st_tensor **idx;   /* all tensors of all files, sorted by name */
    size_t         n;
};

static int cmp_pname(const void *a, const void *b)
{
    return strcmp((*(const mm_st_tensor *const *)a)->name, (*(const mm_st_tensor *const *)b)->name);
}

static char *join(const char *dir, const char *name)
{
    size_t a = strlen(dir), b = strlen(name);
    char *s = malloc(a + b + 2);
    if (!s)
        return NULL;
    memcpy(s, dir, a);
    s[a] = '/';
    memcpy(s + a + 1, name, b + 1);
    return s;
}

static int set_add_file(mm_st_set *s, const char *dir, const char *name, char *err,
                        size_t errlen)
{
    char *path = join(dir, name);
    if (!path) {
        mm_errf(err, errlen, "%s: out of memory", dir);
        return -ENOMEM;
    }
    mm_st_file **nf = realloc(s->files, (s->nfiles + 1) * sizeof *nf);
    int rc = -ENOMEM;
    if (!nf) {
        mm_errf(err, errlen, "%s: out of memory", dir);
        goto out;
    }
    s->files = nf;
    if ((rc = mm_st_open(path, &s->files[s->nfiles], err, errlen)) < 0)
        goto out;
    s->nfiles++;
out:
    free(path);
    return rc;
}

static int set_index(mm_st_set *s, char *err, size_t errlen)
{
    size_t total = 0;
    for (size_t i = 0; i < s->nfiles; i++)
        total += mm_st_file_count(s->files[i]);
    if (!(s->idx = malloc((total ? total : 1) * sizeof *s->idx))) {
        mm_errf(err, errlen, "%s: out of memory", s->origin);
        return -ENOMEM;
    }
    for (size_t i = 0; i < s->nfiles; i++)
        for (size_t j = 0; j < mm_st_file_count(s->files[i]); j++)
            s->idx[s->n++] = mm_st_file_tensor(s->files[i], j);
    qsort(s->idx, s->n, sizeof *s->idx, cmp_pname);
    for (size_t i = 1; i < s->n; i++)
        if (strcmp(s->idx[i - 1]->name, s->idx[i]->name) == 0) {
            mm_errf(err, errlen, "%s: tensor %s in both %s and %s", s->origin, s->idx[i]->name,
                   s->idx[i - 1]->file, s->idx[i]->file);
            return -EINVAL;
        }
    return 0;
}

/* Shard names come from a file we did not write: keep them inside dir. */
static int shard_name_ok(const char *name)
{
    return name[0] && name[0] != '.' && !strchr(name, '/') && strlen(name) < 256;
}

static int open_sharded(mm_st_set *s, const char *dir, char *err, size_t errlen)
{
    json_error_t je;
    int rc = -EINVAL;
    json_t *root = json_load_file(s->origin, JSON_REJECT_DUPLICATES, &je);
    json_t *map = root ? json_object_get(root, "weight_map") : NULL;
    if (!root) {
        mm_errf(err, errlen, "%s: %s (line %d)", s->origin, je.text, je.line);
        goto out;
    }
    if (!json_is_object(map)) {
        mm_errf(err, errlen, "%s: no weight_map object", s->origin);
        goto out;
    }
    const char *key;
    json_t *v;
    json_object_foreach(map, key, v) {
        if (!json_is_string(v) || !shard_name_ok(json_string_value(v))) {
            mm_errf(err, errlen, "%s: tensor %s: bad shard file name", s->origin, key);
            goto out;
        }
        const char *shard = json_string_value(v);
        size_t i;
        for (i = 0; i < s->nfiles; i++) {
            const char *p = mm_st_file_path(s->files[i]);
            const char *base = strrchr(p, '/');
            if (strcmp(base ? base + 1 : p, shard) == 0)
                break;
        }
        if (i == s->nfiles && (rc = set_add_file(s, dir, shard, err, errlen)) < 0)
            goto out;
        rc = -EINVAL;
        if (!mm_st_file_find(s->files[i], key)) {
            mm_errf(err, errlen, "%s: tensor %s (listed in %s) not found", mm_st_file_path(s->files[i]),
                   key, s->origin);
            goto out;
        }
    }
    rc = 0;
out:
    json_decref(root);
    return rc;
}

int mm_st_set_open(const char *dir, mm_st_set **out, char *err, size_t errlen)
{
    int rc = -ENOMEM;
    mm_st_set *s = calloc(1, sizeof *s);
    *out = NULL;
    if (!s || !(s->origin = join(dir, "model.safetensors.index.json"))) {
        mm_errf(err, errlen, "%s: out of memory", dir);
        goto fail;
    }
    if (access(s->origin, F_OK) == 0) {
        if ((rc = open_sharded(s, dir, err, errlen)) < 0)
            goto fail;
    } else {
        free(s->origin);
        if (!(s->origin = join(dir, "model.safetensors"))) {
            mm_errf(err, errlen, "%s: out of memory", dir);
            goto fail;
        }
        if ((rc = set_add_file(s, dir, "model.safetensors", err, errlen)) < 0)
            goto fail;
    }
    if ((rc = set_index(s, err, errlen)) < 0)
        goto fail;
    *out = s;
    return 0;
fail:
    mm_st_set_close(s);
    return rc;
}

void mm_st_set_close(mm_st_set *s)
{
    if (!s)
        return;
    for (size_t i = 0; i < s->nfiles; i++)
        mm_st_close(s->files[i]);
    free(s->files);
    free(s->idx);
    free(s->origin);
    free(s);
}

const mm_st_tensor *mm_st_set_find(const mm_st_set *s, const char *name)
{
    mm_st_tensor key = {.name = name};
    const mm_st_tensor *pk = &key;
    const mm_st_tensor **hit = bsearch(&pk, s->idx, s->n, sizeof *s->idx, cmp_pname);
    return hit ? *hit : NULL;
}

const char *mm_st_set_origin(const mm_st_set *s) { return s->origin; }
size_t mm_st_set_files(const mm_st_set *s) { return s->nfiles; }
const mm_st_file *mm_st_set_file(const mm_st_set *s, size_t i)
{
    return i < s->nfiles ? s->files[i] : NULL;
}

/* ---- writing ---- */

int mm_st_write_header(FILE *fp, const mm_st_desc *d, size_t n, char *err, size_t errlen)
{
    int rc = -ENOMEM;
    char *txt = NULL;
    json_t *root = json_object();
    uint64_t off = 0;
    if (!root)
        goto out;
    for (size_t i = 0; i < n; i++) {
        json_t *e = json_object(), *shape = json_array();
        if (!e || !shape || json_object_set_new(root, d[i].name, e) < 0) {
            json_decref(e);
            json_decref(shape);
            goto out;
        }
        uint64_t numel = 1;
        for (int k = 0; k < d[i].ndim; k++) {
            json_array_append_new(shape, json_integer(d[i].shape[k]));
            numel *= (uint64_t)d[i].shape[k];
        }
        uint64_t end = off + numel * mm_dtype_size(d[i].dtype);
        json_t *offs = json_array();
        if (!offs)
            goto out;
        json_array_append_new(offs, json_integer((json_int_t)off));
        json_array_append_new(offs, json_integer((json_int_t)end));
        json_object_set_new(e, "dtype", json_string(mm_dtype_name(d[i].dtype)));
        json_object_set_new(e, "shape", shape);
        json_object_set_new(e, "data_offsets", offs);
        off = end;
    }
    if (!(txt = json_dumps(root, JSON_COMPACT | JSON_PRESERVE_ORDER)))
        goto out;
    /* Pad with spaces so the data starts 8-byte aligned, as the format
     * recommends; readers may then use the mapping as typed arrays. */
    size_t len = strlen(txt), padded = (len + 7) & ~(size_t)7;
    unsigned char hdr[8];
    for (int i = 0; i < 8; i++)
        hdr[i] = (unsigned char)((uint64_t)padded >> (8 * i));
    rc = -EIO;
    if (fwrite(hdr, 1, 8, fp) != 8 || fwrite(txt, 1, len, fp) != len)
        goto out;
    for (size_t i = len; i < padded; i++)
        if (fputc(' ', fp) == EOF)
            goto out;
    rc = 0;
out:
    if (rc == -ENOMEM)
        mm_errf(err, errlen, "safetensors header: out of memory");
    else if (rc < 0)
        mm_errf(err, errlen, "safetensors header: write failed");
    free(txt);
    json_decref(root);
    return rc;
}
