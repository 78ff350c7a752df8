/* jsonscan.c: strict JSON validation with top-level member spans. */
#include "jsonscan.h"
#include "pctdec.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

typedef struct scan {
    const char *s;
    size_t      n, i;
    int         depth;
    char       *err;
    size_t      errlen;
} scan;

static int fail(scan *c, const char *why)
{
    if (c->err && c->errlen)
        snprintf(c->err, c->errlen, "at byte %zu: %s", c->i, why);
    return -EINVAL;
}

static void ws(scan *c)
{
    while (c->i < c->n) {
        char ch = c->s[c->i];
        if (ch != ' ' && ch != '\t' && ch != '\n' && ch != '\r')
            break;
        c->i++;
    }
}

static int hex4(scan *c, unsigned *out)
{
    if (c->n - c->i < 4)
        return fail(c, "truncated \\u escape");
    unsigned v = 0;
    for (int k = 0; k < 4; k++) {
        int h = mm_hexval(c->s[c->i + (size_t)k]);
        if (h < 0)
            return fail(c, "bad \\u escape");
        v = v << 4 | (unsigned)h;
    }
    c->i += 4;
    *out = v;
    return 0;
}

/* One UTF-8 sequence starting at s[i] (non-ASCII lead byte). */
static int utf8_seq(scan *c)
{
    const unsigned char *p = (const unsigned char *)c->s + c->i;
    size_t left = c->n - c->i;
    unsigned char b = p[0];
    size_t len;
    unsigned cp;
    if (b >= 0xC2 && b <= 0xDF) {
        len = 2;
        cp = b & 0x1F;
    } else if (b >= 0xE0 && b <= 0xEF) {
        len = 3;
        cp = b & 0x0F;
    } else if (b >= 0xF0 && b <= 0xF4) {
        len = 4;
        cp = b & 0x07;
    } else {
        return fail(c, "invalid UTF-8");
    }
    if (left < len)
        return fail(c, "truncated UTF-8");
    for (size_t k = 1; k < len; k++) {
        if ((p[k] & 0xC0) != 0x80)
            return fail(c, "invalid UTF-8");
        cp = cp << 6 | (p[k] & 0x3F);
    }
    if ((len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10FFFF)) ||
        (cp >= 0xD800 && cp <= 0xDFFF))
        return fail(c, "invalid UTF-8");
    c->i += len;
    return 0;
}

/* s[i] == '"'. */
static int string(scan *c, int *escaped)
{
    c->i++;
    *escaped = 0;
    while (c->i < c->n) {
        unsigned char ch = (unsigned char)c->s[c->i];
        if (ch == '"') {
            c->i++;
            return 0;
        }
        if (ch < 0x20)
            return fail(c, "control character in string");
        if (ch == '\\') {
            *escaped = 1;
            c->i++;
            if (c->i >= c->n)
                break;
            char e = c->s[c->i++];
            if (e == 'u') {
                unsigned u;
                int rc = hex4(c, &u);
                if (rc)
                    return rc;
                if (u >= 0xD800 && u <= 0xDBFF) {
                    unsigned lo;
                    if (c->n - c->i < 2 || c->s[c->i] != '\\' || c->s[c->i + 1] != 'u')
                        return fail(c, "lone surrogate in \\u escape");
                    c->i += 2;
                    rc = hex4(c, &lo);
                    if (rc)
                        return rc;
                    if (lo < 0xDC00 || lo > 0xDFFF)
                        return fail(c, "lone surrogate in \\u escape");
                } else if (u >= 0xDC00 && u <= 0xDFFF) {
                    return fail(c, "lone surrogate in \\u escape");
                }
            } else if (!strchr("\"\\/bfnrt", e) || e == '\0') {
                return fail(c, "bad escape in string");
            }
            continue;
        }
        if (ch >= 0x80) {
            int rc = utf8_seq(c);
            if (rc)
                return rc;
            continue;
        }
        c->i++;
    }
    return fail(c, "unterminated string");
}

static int number(scan *c)
{
    size_t i = c->i;
    if (i < c->n && c->s[i] == '-')
        i++;
    if (i >= c->n)
        goto bad;
    if (c->s[i] == '0') {
        i++;
    } else if (c->s[i] >= '1' && c->s[i] <= '9') {
        while (i < c->n && c->s[i] >= '0' && c->s[i] <= '9')
            i++;
    } else {
        goto bad;
    }
    if (i < c->n && c->s[i] == '.') {
        i++;
        size_t d = i;
        while (i < c->n && c->s[i] >= '0' && c->s[i] <= '9')
            i++;
        if (i == d)
            goto bad;
    }
    if (i < c->n && (c->s[i] == 'e' || c->s[i] == 'E')) {
        i++;
        if (i < c->n && (c->s[i] == '+' || c->s[i] == '-'))
            i++;
        size_t d = i;
        while (i < c->n && c->s[i] >= '0' && c->s[i] <= '9')
            i++;
        if (i == d)
            goto bad;
    }
    c->i = i;
    return 0;
bad:
    c->i = i;
    return fail(c, "bad number");
}

static int literal(scan *c, const char *word)
{
    size_t l = strlen(word);
    if (c->n - c->i < l || memcmp(c->s + c->i, word, l) != 0)
        return fail(c, "unexpected character");
    c->i += l;
    return 0;
}

static int value(scan *c, char *type, mm_json_member *members, size_t max, size_t *count);

static int object(scan *c, mm_json_member *members, size_t max, size_t *count)
{
    if (++c->depth > MM_JSON_MAX_DEPTH)
        return fail(c, "nesting too deep");
    c->i++;
    ws(c);
    if (c->i < c->n && c->s[c->i] == '}') {
        c->i++;
        c->depth--;
        return 0;
    }
    for (;;) {
        ws(c);
        if (c->i >= c->n || c->s[c->i] != '"')
            return fail(c, "expected a string key");
        size_t ks = c->i;
        int esc;
        int rc = string(c, &esc);
        if (rc)
            return rc;
        size_t ke = c->i;
        ws(c);
        if (c->i >= c->n || c->s[c->i] != ':')
            return fail(c, "expected ':'");
        c->i++;
        ws(c);
        size_t vs = c->i;
        char t;
        rc = value(c, &t, NULL, 0, NULL);
        if (rc)
            return rc;
        if (count) {
            if (*count < max) {
                mm_json_member *m = &members[*count];
                m->key = c->s + ks + 1;
                m->key_len = ke - ks - 2;
                m->key_escaped = esc;
                m->val = c->s + vs;
                m->val_len = c->i - vs;
                m->type = t;
            }
            (*count)++;
        }
        ws(c);
        if (c->i < c->n && c->s[c->i] == ',') {
            c->i++;
            continue;
        }
        if (c->i < c->n && c->s[c->i] == '}') {
            c->i++;
            c->depth--;
            return 0;
        }
        return fail(c, "expected ',' or '}'");
    }
}

static int array(scan *c)
{
    if (++c->depth > MM_JSON_MAX_DEPTH)
        return fail(c, "nesting too deep");
    c->i++;
    ws(c);
    if (c->i < c->n && c->s[c->i] == ']') {
        c->i++;
        c->depth--;
        return 0;
    }
    for (;;) {
        ws(c);
        char t;
        int rc = value(c, &t, NULL, 0, NULL);
        if (rc)
            return rc;
        ws(c);
        if (c->i < c->n && c->s[c->i] == ',') {
            c->i++;
            continue;
        }
        if (c->i < c->n && c->s[c->i] == ']') {
            c->i++;
            c->depth--;
            return 0;
        }
        return fail(c, "expected ',' or ']'");
    }
}

static int value(scan *c, char *type, mm_json_member *members, size_t max, size_t *count)
{
    if (c->i >= c->n)
        return fail(c, "unexpected end of input");
    int esc;
    switch (c->s[c->i]) {
    case '{': *type = 'o'; return object(c, members, max, count);
    case '[': *type = 'a'; return array(c);
    case '"': *type = 's'; return string(c, &esc);
    case 't': *type = 't'; return literal(c, "true");
    case 'f': *type = 'f'; return literal(c, "false");
    case 'n': *type = 'z'; return literal(c, "null");
    default:  *type = 'n'; return number(c);
    }
}

int mm_json_scan(const char *s, size_t n, mm_json_member *members, size_t max, size_t *count,
                 char *err, size_t errlen)
{
    scan c = {s, n, 0, 0, err, errlen};
    size_t cnt = 0;
    char t;
    ws(&c);
    int rc = value(&c, &t, members, max, &cnt);
    if (rc)
        return rc;
    ws(&c);
    if (c.i != n)
        return fail(&c, "trailing characters after the JSON value");
    if (count)
        *count = cnt;
    return t == 'o' ? 0 : -EDOM;
}

int mm_json_decode_string(const char *val, size_t len, mm_buf *out)
{
    if (len < 2 || val[0] != '"' || val[len - 1] != '"')
        return -EINVAL;
    int rc = 0;
    for (size_t i = 1; i + 1 < len && rc == 0;) {
        char ch = val[i];
        if (ch != '\\') {
            size_t j = i;
            while (j + 1 < len && val[j] != '\\')
                j++;
            rc = mm_buf_append(out, val + i, j - i);
            i = j;
            continue;
        }
        char e = val[i + 1];
        i += 2;
        char lit = 0;
        switch (e) {
        case 'b': lit = '\b'; break;
        case 'f': lit = '\f'; break;
        case 'n': lit = '\n'; break;
        case 'r': lit = '\r'; break;
        case 't': lit = '\t'; break;
        case 'u': break;
        default:  lit = e;
        }
        if (e != 'u') {
            rc = mm_buf_append(out, &lit, 1);
            continue;
        }
        unsigned cp = 0;
        for (int k = 0; k < 4; k++)
            cp = cp << 4 | (unsigned)mm_hexval(val[i + (size_t)k]);
        i += 4;
        if (cp >= 0xD800 && cp <= 0xDBFF) {
            unsigned lo = 0;
            for (int k = 0; k < 4; k++)
                lo = lo << 4 | (unsigned)mm_hexval(val[i + 2 + (size_t)k]);
            i += 6;
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
        }
        char u[4];
        size_t ul;
        if (cp < 0x80) {
            u[0] = (char)cp;
            ul = 1;
        } else if (cp < 0x800) {
            u[0] = (char)(0xC0 | cp >> 6);
            u[1] = (char)(0x80 | (cp & 0x3F));
            ul = 2;
        } else if (cp < 0x10000) {
            u[0] = (char)(0xE0 | cp >> 12);
            u[1] = (char)(0x80 | (cp >> 6 & 0x3F));
            u[2] = (char)(0x80 | (cp & 0x3F));
            ul = 3;
        } else {
            u[0] = (char)(0xF0 | cp >> 18);
            u[1] = (char)(0x80 | (cp >> 12 & 0x3F));
            u[2] = (char)(0x80 | (cp >> 6 & 0x3F));
            u[3] = (char)(0x80 | (cp & 0x3F));
            ul = 4;
        }
        rc = mm_buf_append(out, u, ul);
    }
    return rc;
}

/* Compare a member's key with key, decoding escapes when present. */
static int key_eq(const mm_json_member *m, const char *key, size_t klen)
{
    if (!m->key_escaped)
        return m->key_len == klen && memcmp(m->key, key, klen) == 0;
    mm_buf b;
    mm_buf_init(&b, 4096);
    int eq = 0;
    /* m->key lacks its quotes; val-style decoding needs them. */
    if (mm_json_decode_string(m->key - 1, m->key_len + 2, &b) == 0)
        eq = b.len == klen && memcmp(b.data, key, klen) == 0;
    mm_buf_free(&b);
    return eq;
}

const mm_json_member *mm_json_find(const mm_json_member *m, size_t n, const char *key)
{
    size_t kl = strlen(key);
    for (size_t i = 0; i < n; i++)
        if (key_eq(&m[i], key, kl))
            return &m[i];
    return NULL;
}

int mm_json_has_duplicate(const mm_json_member *m, size_t n)
{
    mm_buf a;
    for (size_t i = 0; i < n; i++) {
        const char *k = m[i].key;
        size_t kl = m[i].key_len;
        mm_buf_init(&a, 4096);
        if (m[i].key_escaped) {
            if (mm_json_decode_string(m[i].key - 1, m[i].key_len + 2, &a) != 0) {
                mm_buf_free(&a);
                return 1;
            }
            k = a.data ? a.data : "";
            kl = a.len;
        }
        int dup = 0;
        for (size_t j = i + 1; j < n && !dup; j++)
            dup = key_eq(&m[j], k, kl);
        mm_buf_free(&a);
        if (dup)
            return 1;
    }
    return 0;
}
