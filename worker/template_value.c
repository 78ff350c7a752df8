/* template_value.c: template values and their Python semantics.
 *
 * Jinja runs on Python objects, so what a template prints is Python's str()
 * and repr(), what it compares is Python's == and <, and transformers' tojson
 * is json.dumps(ensure_ascii=False).  Data values are jansson values (None,
 * bool, int, float, str, list and dict map one to one); the few non-data
 * values (undefined, namespace, loop, callables) are other kinds of
 * mm_tpl_val.  Strings are UTF-8 and indexed by code point as Python does. */
#include <errno.h>
#include <locale.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <wctype.h>

#include "template_impl.h"

/* ---- errors ---- */
int mm_tpl_fail(mm_tpl_ectx *e, int rc, const char *fmt, ...)
{
    if (e->have_err)
        return rc;
    e->have_err = 1;
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (rc == -ENOTSUP)
        snprintf(e->err, e->errlen, "template uses an unsupported construct (line %d): %s",
                 e->line, msg);
    else
        snprintf(e->err, e->errlen, "template error (line %d): %s", e->line, msg);
    return rc;
}

int mm_tpl_undef_error(mm_tpl_ectx *e, const mm_tpl_val *v)
{
    if (v->uhint)
        return mm_tpl_fail(e, -EINVAL, "%s", v->uhint);
    if (!v->uowner)
        return mm_tpl_fail(e, -EINVAL, "'%s' is undefined", v->uname ? v->uname : "value");
    if (!v->uname)
        return mm_tpl_fail(e, -EINVAL, "'%s object' has no such element", v->uowner);
    return mm_tpl_fail(e, -EINVAL, "'%s object' has no attribute '%s'", v->uowner, v->uname);
}

static int oom(mm_tpl_ectx *e)
{
    return mm_tpl_fail(e, -ENOMEM, "out of memory");
}

/* An append failed: say why. */
static int buf_err(mm_tpl_ectx *e, int rc)
{
    if (rc == -E2BIG)
        return mm_tpl_fail(e, -E2BIG, "output or a value grew past %u bytes", MM_TPL_MAX_OUTPUT);
    return oom(e);
}

static int put(mm_tpl_ectx *e, mm_buf *b, const char *s, size_t n)
{
    int rc = mm_buf_append(b, s, n);
    return rc ? buf_err(e, rc) : 0;
}

/* ---- constructors and references ---- */
mm_tpl_val mm_tpl_undef(const char *name, const char *owner)
{
    mm_tpl_val v = {.kind = MM_TV_UNDEF, .uname = name, .uowner = owner};
    return v;
}

mm_tpl_val mm_tpl_jv(json_t *j)
{
    mm_tpl_val v = {.kind = j ? MM_TV_JSON : MM_TV_UNDEF};
    v.u.j = j;
    return v;
}

mm_tpl_val mm_tpl_str_n(const char *s, size_t n)
{
    return mm_tpl_jv(json_stringn_nocheck(s, n));
}

mm_tpl_val mm_tpl_int(long long i) { return mm_tpl_jv(json_integer(i)); }
mm_tpl_val mm_tpl_bool(int b) { return mm_tpl_jv(json_boolean(b)); }
mm_tpl_val mm_tpl_none(void) { return mm_tpl_jv(json_null()); }

int mm_tpl_real(mm_tpl_ectx *e, double d, mm_tpl_val *out)
{
    if (!isfinite(d))
        return mm_tpl_fail(e, -ENOTSUP, "a float that is inf or nan");
    *out = mm_tpl_jv(json_real(d));
    return MM_TPL_OOM(*out) ? oom(e) : 0;
}

mm_tpl_val mm_tpl_ref(const mm_tpl_val *v)
{
    mm_tpl_val r = *v;
    switch (v->kind) {
    case MM_TV_JSON: json_incref(v->u.j); break;
    case MM_TV_NS: v->u.ns->refs++; break;
    case MM_TV_LOOP: v->u.loop->refs++; break;
    case MM_TV_FUNC: v->u.fn->refs++; break;
    case MM_TV_ITER: v->u.it->refs++; break;
    default: break;
    }
    return r;
}

void mm_tpl_unref(mm_tpl_val *v)
{
    switch (v->kind) {
    case MM_TV_JSON:
        json_decref(v->u.j);
        break;
    case MM_TV_NS:
        if (--v->u.ns->refs == 0) {
            mm_tpl_ns *ns = v->u.ns;
            for (size_t i = 0; i < ns->n; i++) {
                free(ns->names[i]);
                mm_tpl_unref(&ns->vals[i]);
            }
            free(ns->names);
            free(ns->vals);
            free(ns);
        }
        break;
    case MM_TV_LOOP:
        if (--v->u.loop->refs == 0) {
            json_decref(v->u.loop->items);
            json_decref(v->u.loop->changed_last);
            free(v->u.loop);
        }
        break;
    case MM_TV_FUNC:
        if (--v->u.fn->refs == 0) {
            mm_tpl_unref(&v->u.fn->self);
            free(v->u.fn);
        }
        break;
    case MM_TV_ITER:
        if (--v->u.it->refs == 0) {
            json_decref(v->u.it->items);
            free(v->u.it);
        }
        break;
    default:
        break;
    }
    v->kind = MM_TV_UNDEF;
    v->u.j = NULL;
    v->uname = v->uowner = v->uhint = NULL;
}

/* ---- type tests ---- */
int mm_tpl_is_str(const mm_tpl_val *v) { return v->kind == MM_TV_JSON && json_is_string(v->u.j); }
int mm_tpl_is_list(const mm_tpl_val *v) { return v->kind == MM_TV_JSON && json_is_array(v->u.j); }
int mm_tpl_is_dict(const mm_tpl_val *v) { return v->kind == MM_TV_JSON && json_is_object(v->u.j); }
int mm_tpl_is_none(const mm_tpl_val *v) { return v->kind == MM_TV_JSON && json_is_null(v->u.j); }
int mm_tpl_is_bool(const mm_tpl_val *v) { return v->kind == MM_TV_JSON && json_is_boolean(v->u.j); }
int mm_tpl_is_int(const mm_tpl_val *v) { return v->kind == MM_TV_JSON && json_is_integer(v->u.j); }

int mm_tpl_is_num(const mm_tpl_val *v)
{
    return v->kind == MM_TV_JSON && (json_is_number(v->u.j) || json_is_boolean(v->u.j));
}

double mm_tpl_num(const mm_tpl_val *v)
{
    if (json_is_boolean(v->u.j))
        return json_is_true(v->u.j);
    return json_number_value(v->u.j);
}

long long mm_tpl_intval(const mm_tpl_val *v)
{
    if (json_is_boolean(v->u.j))
        return json_is_true(v->u.j);
    return json_integer_value(v->u.j);
}

/* ---- shapes: lists that are tuples, dict views or ranges in Python ---- */
static size_t ptr_hash(const void *p)
{
    uint64_t x = (uint64_t)(uintptr_t)p;
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    return (size_t)x;
}

static int shape_rehash(mm_tpl_ectx *e, size_t cap)
{
    size_t *h = calloc(cap, sizeof(*h));
    if (!h)
        return -ENOMEM;
    for (size_t i = 0; i < e->nshapes; i++) {
        size_t k = ptr_hash(e->shapes[i].l) & (cap - 1);
        while (h[k])
            k = (k + 1) & (cap - 1);
        h[k] = i + 1;
    }
    free(e->shape_hash);
    e->shape_hash = h;
    e->shape_hashcap = cap;
    return 0;
}

static mm_tpl_shape *shape_find(const mm_tpl_ectx *e, const json_t *l)
{
    if (!e->shape_hashcap)
        return NULL;
    size_t k = ptr_hash(l) & (e->shape_hashcap - 1);
    while (e->shape_hash[k]) {
        mm_tpl_shape *s = &e->shapes[e->shape_hash[k] - 1];
        if (s->l == l)
            return s;
        k = (k + 1) & (e->shape_hashcap - 1);
    }
    return NULL;
}

int mm_tpl_mark(mm_tpl_ectx *e, json_t *l, int kind, const long long *range)
{
    mm_tpl_shape *s = shape_find(e, l);
    if (!s) {
        if (e->nshapes == e->capshapes) {
            size_t nc = e->capshapes ? e->capshapes * 2 : 16;
            mm_tpl_shape *v = realloc(e->shapes, nc * sizeof(*v));
            if (!v)
                return oom(e);
            e->shapes = v;
            e->capshapes = nc;
        }
        if ((e->nshapes + 1) * 2 > e->shape_hashcap &&
            shape_rehash(e, e->shape_hashcap ? e->shape_hashcap * 2 : 64))
            return oom(e);
        s = &e->shapes[e->nshapes++];
        s->l = json_incref(l);
        size_t k = ptr_hash(l) & (e->shape_hashcap - 1);
        while (e->shape_hash[k])
            k = (k + 1) & (e->shape_hashcap - 1);
        e->shape_hash[k] = e->nshapes;
    }
    s->kind = kind;
    if (range)
        memcpy(s->range, range, sizeof(s->range));
    return 0;
}

int mm_tpl_shape_of(const mm_tpl_ectx *e, const json_t *l, const long long **range)
{
    mm_tpl_shape *s = shape_find(e, l);
    if (range)
        *range = s ? s->range : NULL;
    return s ? s->kind : MM_SHAPE_LIST;
}

const char *mm_tpl_shape_name(int kind)
{
    switch (kind) {
    case MM_SHAPE_TUPLE: return "tuple";
    case MM_SHAPE_ITEMS: return "dict_items";
    case MM_SHAPE_KEYS: return "dict_keys";
    case MM_SHAPE_VALUES: return "dict_values";
    case MM_SHAPE_RANGE: return "range";
    default: return "list";
    }
}

void mm_tpl_free_shapes(mm_tpl_ectx *e)
{
    for (size_t i = 0; i < e->nshapes; i++)
        json_decref(e->shapes[i].l);
    free(e->shapes);
    free(e->shape_hash);
    e->shapes = NULL;
    e->shape_hash = NULL;
    e->nshapes = e->capshapes = e->shape_hashcap = 0;
}

int mm_tpl_iter_new(mm_tpl_ectx *e, json_t *items, const char *pyname, mm_tpl_val *out)
{
    mm_tpl_iter *it = calloc(1, sizeof(*it));
    if (!it) {
        json_decref(items);
        return oom(e);
    }
    it->refs = 1;
    it->items = items;
    it->pyname = pyname;
    memset(out, 0, sizeof(*out));
    out->kind = MM_TV_ITER;
    out->u.it = it;
    return 0;
}

static const char *json_typename(const json_t *j)
{
    switch (json_typeof(j)) {
    case JSON_OBJECT: return "dict";
    case JSON_ARRAY: return "list";
    case JSON_STRING: return "str";
    case JSON_INTEGER: return "int";
    case JSON_REAL: return "float";
    case JSON_TRUE:
    case JSON_FALSE: return "bool";
    default: return "NoneType";
    }
}

const char *mm_tpl_typename(const mm_tpl_val *v)
{
    switch (v->kind) {
    case MM_TV_JSON: return json_typename(v->u.j);
    case MM_TV_NS: return "Namespace";
    case MM_TV_LOOP: return "LoopContext";
    case MM_TV_FUNC: return v->u.fn->fkind == MM_FN_MACRO ? "Macro" : "function";
    case MM_TV_ITER: return v->u.it->pyname;
    default: return "Undefined";
    }
}

static int json_truthy(const json_t *j)
{
    switch (json_typeof(j)) {
    case JSON_OBJECT: return json_object_size(j) > 0;
    case JSON_ARRAY: return json_array_size(j) > 0;
    case JSON_STRING: return json_string_length(j) > 0;
    case JSON_INTEGER: return json_integer_value(j) != 0;
    case JSON_REAL: return json_real_value(j) != 0.0;
    case JSON_TRUE: return 1;
    default: return 0;
    }
}

int mm_tpl_truthy(const mm_tpl_val *v)
{
    switch (v->kind) {
    case MM_TV_JSON: return json_truthy(v->u.j);
    case MM_TV_UNDEF: return 0;
    default: return 1;
    }
}

/* ---- UTF-8 ---- */
size_t mm_tpl_u8_dec(const char *s, size_t n, size_t i, uint32_t *cp)
{
    const unsigned char *u = (const unsigned char *)s;
    unsigned c = u[i];
    size_t k = c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
    if (c < 0xC0 || i + k > n) {
        /* only reachable on invalid input; take the byte as is */
        *cp = c;
        return 1;
    }
    uint32_t v = k == 2 ? (c & 0x1F) : k == 3 ? (c & 0x0F) : (c & 0x07);
    for (size_t j = 1; j < k; j++)
        v = (v << 6) | (u[i + j] & 0x3F);
    *cp = v;
    return k;
}

size_t mm_tpl_u8_enc(uint32_t cp, char *o)
{
    if (cp < 0x80) {
        o[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        o[0] = (char)(0xC0 | (cp >> 6));
        o[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (char)(0xE0 | (cp >> 12));
        o[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        o[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    o[0] = (char)(0xF0 | (cp >> 18));
    o[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    o[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    o[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

size_t mm_tpl_u8_len(const char *s, size_t n)
{
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        k += ((unsigned char)s[i] & 0xC0) != 0x80;
    return k;
}

size_t mm_tpl_u8_off(const char *s, size_t n, size_t idx)
{
    size_t i = 0;
    while (i < n && idx > 0) {
        i++;
        while (i < n && ((unsigned char)s[i] & 0xC0) == 0x80)
            i++;
        idx--;
    }
    return i;
}

int mm_tpl_u8_valid(const char *s, size_t n)
{
    const unsigned char *u = (const unsigned char *)s;
    for (size_t i = 0; i < n;) {
        unsigned c = u[i];
        size_t k;
        uint32_t min;
        if (c < 0x80) {
            i++;
            continue;
        } else if (c >= 0xC2 && c < 0xE0) {
            k = 2;
            min = 0x80;
        } else if (c >= 0xE0 && c < 0xF0) {
            k = 3;
            min = 0x800;
        } else if (c >= 0xF0 && c < 0xF5) {
            k = 4;
            min = 0x10000;
        } else {
            return 0;
        }
        if (i + k > n)
            return 0;
        for (size_t j = 1; j < k; j++)
            if ((u[i + j] & 0xC0) != 0x80)
                return 0;
        uint32_t cp;
        mm_tpl_u8_dec(s, n, i, &cp);
        if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
            return 0;
        i += k;
    }
    return 1;
}

/* ---- Python character classes ---- */
int mm_tpl_py_isspace(uint32_t c)
{
    return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 ||
           c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 ||
           c == 0x202F || c == 0x205F || c == 0x3000;
}

/* str.isprintable() is false for categories Cc Cf Cs Co Zl Zp and Zs but
 * the space (Python 3.11 tables; unassigned code points count as printable
 * here). */
static int py_isprintable(uint32_t c)
{
    static const uint32_t np[][2] = {
        {0x0, 0x1F}, {0x7F, 0xA0}, {0xAD, 0xAD}, {0x600, 0x605}, {0x61C, 0x61C},
        {0x6DD, 0x6DD}, {0x70F, 0x70F}, {0x890, 0x891}, {0x8E2, 0x8E2}, {0x1680, 0x1680},
        {0x180E, 0x180E}, {0x2000, 0x200F}, {0x2028, 0x202F}, {0x205F, 0x2064},
        {0x2066, 0x206F}, {0x3000, 0x3000}, {0xD800, 0xF8FF}, {0xFEFF, 0xFEFF},
        {0xFFF9, 0xFFFB}, {0x110BD, 0x110BD}, {0x110CD, 0x110CD}, {0x13430, 0x13438},
        {0x1BCA0, 0x1BCA3}, {0x1D173, 0x1D17A}, {0xE0001, 0xE0001}, {0xE0020, 0xE007F},
        {0xF0000, 0xFFFFD}, {0x100000, 0x10FFFD},
    };
    for (size_t i = 0; i < sizeof(np) / sizeof(np[0]); i++)
        if (c >= np[i][0] && c <= np[i][1])
            return 0;
    return 1;
}

/* Case mapping from the C.UTF-8 locale's tables (simple mappings). */
static pthread_once_t loc_once = PTHREAD_ONCE_INIT;
static locale_t utf8_loc;

static void loc_init(void)
{
    utf8_loc = newlocale(LC_CTYPE_MASK, "C.UTF-8", (locale_t)0);
}

uint32_t mm_tpl_py_lower(uint32_t c)
{
    if (c < 0x80)
        return (c >= 'A' && c <= 'Z') ? c + 32 : c;
    pthread_once(&loc_once, loc_init);
    return utf8_loc ? (uint32_t)towlower_l((wint_t)c, utf8_loc) : c;
}

uint32_t mm_tpl_py_upper(uint32_t c)
{
    if (c < 0x80)
        return (c >= 'a' && c <= 'z') ? c - 32 : c;
    pthread_once(&loc_once, loc_init);
    return utf8_loc ? (uint32_t)towupper_l((wint_t)c, utf8_loc) : c;
}

int mm_tpl_py_isalpha(uint32_t c)
{
    if (c < 0x80)
        return ((c | 32) >= 'a' && (c | 32) <= 'z');
    pthread_once(&loc_once, loc_init);
    return utf8_loc ? iswalpha_l((wint_t)c, utf8_loc) != 0 : 0;
}

int mm_tpl_py_isalnum(uint32_t c)
{
    if (c < 0x80)
        return ((c | 32) >= 'a' && (c | 32) <= 'z') || (c >= '0' && c <= '9');
    pthread_once(&loc_once, loc_init);
    return utf8_loc ? iswalnum_l((wint_t)c, utf8_loc) != 0 : 0;
}

int mm_tpl_py_cased(uint32_t c)
{
    return mm_tpl_py_lower(c) != c || mm_tpl_py_upper(c) != c || c == 0xDF;
}

/* ---- float repr ---- */
void mm_tpl_fmt_float(double d, char *buf, size_t n)
{
    if (isnan(d)) {
        snprintf(buf, n, "nan");
        return;
    }
    if (isinf(d)) {
        snprintf(buf, n, d < 0 ? "-inf" : "inf");
        return;
    }
    if (d == 0) {
        snprintf(buf, n, signbit(d) ? "-0.0" : "0.0");
        return;
    }
    /* the shortest digits that read back as d, like Python's repr */
    char tmp[48];
    int p;
    for (p = 1; p < 17; p++) {
        snprintf(tmp, sizeof(tmp), "%.*e", p - 1, d);
        if (strtod(tmp, NULL) == d)
            break;
    }
    if (p == 17)
        snprintf(tmp, sizeof(tmp), "%.16e", d);
    char digits[32];
    size_t nd = 0;
    const char *q = tmp;
    int neg = 0;
    if (*q == '-') {
        neg = 1;
        q++;
    }
    for (; *q && *q != 'e'; q++)
        if (*q >= '0' && *q <= '9' && nd + 1 < sizeof(digits))
            digits[nd++] = *q;
    int exp = *q == 'e' ? (int)strtol(q + 1, NULL, 10) : 0;
    while (nd > 1 && digits[nd - 1] == '0')
        nd--;
    digits[nd] = '\0';
    char out[64];
    size_t o = 0;
    if (neg)
        out[o++] = '-';
    if (exp >= -5 + 1 && exp < 16) {
        int decpt = exp + 1;
        if (decpt <= 0) {
            out[o++] = '0';
            out[o++] = '.';
            for (int i = 0; i < -decpt; i++)
                out[o++] = '0';
            memcpy(out + o, digits, nd);
            o += nd;
        } else if ((size_t)decpt >= nd) {
            memcpy(out + o, digits, nd);
            o += nd;
            for (size_t i = nd; i < (size_t)decpt; i++)
                out[o++] = '0';
            out[o++] = '.';
            out[o++] = '0';
        } else {
            memcpy(out + o, digits, (size_t)decpt);
            o += (size_t)decpt;
            out[o++] = '.';
            memcpy(out + o, digits + decpt, nd - (size_t)decpt);
            o += nd - (size_t)decpt;
        }
        out[o] = '\0';
    } else {
        out[o++] = digits[0];
        if (nd > 1) {
            out[o++] = '.';
            memcpy(out + o, digits + 1, nd - 1);
            o += nd - 1;
        }
        snprintf(out + o, sizeof(out) - o, "e%c%02d", exp < 0 ? '-' : '+', exp < 0 ? -exp : exp);
    }
    snprintf(buf, n, "%s", out);
}

/* ---- str() and repr() ---- */
static int repr_string(mm_tpl_ectx *e, const char *s, size_t n, mm_buf *b)
{
    /* Python picks ' unless the text has ' and no " */
    int has_sq = memchr(s, '\'', n) != NULL, has_dq = memchr(s, '"', n) != NULL;
    char q = (has_sq && !has_dq) ? '"' : '\'';
    int rc;
    if ((rc = put(e, b, &q, 1)))
        return rc;
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        size_t k = mm_tpl_u8_dec(s, n, i, &cp);
        char esc[16];
        const char *out = s + i;
        size_t on = k;
        if (cp == (uint32_t)q || cp == '\\') {
            esc[0] = '\\';
            esc[1] = (char)cp;
            out = esc;
            on = 2;
        } else if (cp == '\n' || cp == '\r' || cp == '\t') {
            esc[0] = '\\';
            esc[1] = cp == '\n' ? 'n' : cp == '\r' ? 'r' : 't';
            out = esc;
            on = 2;
        } else if (!py_isprintable(cp)) {
            int w = cp < 0x100 ? snprintf(esc, sizeof(esc), "\\x%02x", cp)
                  : cp < 0x10000 ? snprintf(esc, sizeof(esc), "\\u%04x", cp)
                  : snprintf(esc, sizeof(esc), "\\U%08x", cp);
            out = esc;
            on = (size_t)w;
        }
        if ((rc = put(e, b, out, on)))
            return rc;
        i += k;
    }
    return put(e, b, &q, 1);
}

static int json_pystr(mm_tpl_ectx *e, const json_t *j, mm_buf *b, int repr, int depth);

static int json_pyrepr_container(mm_tpl_ectx *e, const json_t *j, mm_buf *b, int depth)
{
    int rc;
    if (depth > MM_TPL_MAX_NEST)
        return mm_tpl_fail(e, -E2BIG, "value nested more than %d deep", MM_TPL_MAX_NEST);
    if (json_is_array(j)) {
        size_t i;
        json_t *v;
        const long long *r;
        int shape = mm_tpl_shape_of(e, j, &r), tup = shape == MM_SHAPE_TUPLE;
        if (shape == MM_SHAPE_RANGE) {
            char tmp[96];
            if (r[2] == 1)
                snprintf(tmp, sizeof(tmp), "range(%lld, %lld)", r[0], r[1]);
            else
                snprintf(tmp, sizeof(tmp), "range(%lld, %lld, %lld)", r[0], r[1], r[2]);
            return put(e, b, tmp, strlen(tmp));
        }
        if (shape >= MM_SHAPE_ITEMS) {
            const char *nm = mm_tpl_shape_name(shape);
            if ((rc = put(e, b, nm, strlen(nm))) || (rc = put(e, b, "(", 1)))
                return rc;
        }
        if ((rc = put(e, b, tup ? "(" : "[", 1)))
            return rc;
        json_array_foreach(j, i, v) {
            if (i && (rc = put(e, b, ", ", 2)))
                return rc;
            if ((rc = json_pystr(e, v, b, 1, depth + 1)))
                return rc;
        }
        if (tup && json_array_size(j) == 1 && (rc = put(e, b, ",", 1)))
            return rc;
        if ((rc = put(e, b, tup ? ")" : "]", 1)))
            return rc;
        return shape >= MM_SHAPE_ITEMS ? put(e, b, ")", 1) : 0;
    }
    const char *k;
    json_t *v;
    int first = 1;
    if ((rc = put(e, b, "{", 1)))
        return rc;
    json_object_foreach((json_t *)j, k, v) {
        if (!first && (rc = put(e, b, ", ", 2)))
            return rc;
        first = 0;
        if ((rc = repr_string(e, k, strlen(k), b)) || (rc = put(e, b, ": ", 2)) ||
            (rc = json_pystr(e, v, b, 1, depth + 1)))
            return rc;
    }
    return put(e, b, "}", 1);
}

static int json_pystr(mm_tpl_ectx *e, const json_t *j, mm_buf *b, int repr, int depth)
{
    char num[64];
    switch (json_typeof(j)) {
    case JSON_STRING:
        if (repr)
            return repr_string(e, json_string_value(j), json_string_length(j), b);
        return put(e, b, json_string_value(j), json_string_length(j));
    case JSON_INTEGER:
        snprintf(num, sizeof(num), "%" JSON_INTEGER_FORMAT, json_integer_value(j));
        return put(e, b, num, strlen(num));
    case JSON_REAL:
        mm_tpl_fmt_float(json_real_value(j), num, sizeof(num));
        return put(e, b, num, strlen(num));
    case JSON_TRUE: return put(e, b, "True", 4);
    case JSON_FALSE: return put(e, b, "False", 5);
    case JSON_NULL: return put(e, b, "None", 4);
    default: return json_pyrepr_container(e, j, b, depth);
    }
}

static int val_pystr(mm_tpl_ectx *e, const mm_tpl_val *v, mm_buf *b, int repr)
{
    int rc;
    char tmp[64];
    switch (v->kind) {
    case MM_TV_JSON:
        return json_pystr(e, v->u.j, b, repr, 0);
    case MM_TV_UNDEF:
        return repr ? put(e, b, "Undefined", 9) : 0;
    case MM_TV_NS:
        if ((rc = put(e, b, "<Namespace {", 12)))
            return rc;
        for (size_t i = 0; i < v->u.ns->n; i++) {
            if (i && (rc = put(e, b, ", ", 2)))
                return rc;
            if ((rc = repr_string(e, v->u.ns->names[i], strlen(v->u.ns->names[i]), b)) ||
                (rc = put(e, b, ": ", 2)) || (rc = val_pystr(e, &v->u.ns->vals[i], b, 1)))
                return rc;
        }
        return put(e, b, "}>", 2);
    case MM_TV_LOOP:
        snprintf(tmp, sizeof(tmp), "<LoopContext %zu/%zu>", v->u.loop->index0 + 1,
                 json_array_size(v->u.loop->items));
        return put(e, b, tmp, strlen(tmp));
    case MM_TV_FUNC:
        if (v->u.fn->fkind == MM_FN_MACRO) {
            if ((rc = put(e, b, "<Macro ", 7)) ||
                (rc = repr_string(e, v->u.fn->name, strlen(v->u.fn->name), b)))
                return rc;
            return put(e, b, ">", 1);
        }
        /* Python would print an object address */
        return mm_tpl_fail(e, -ENOTSUP, "printing the function '%s'", v->u.fn->name);
    case MM_TV_ITER:
        return mm_tpl_fail(e, -ENOTSUP, "printing a %s (Python prints its address; "
                           "the template probably lacks |list)", v->u.it->pyname);
    default:
        return 0;
    }
}

int mm_tpl_str(mm_tpl_ectx *e, const mm_tpl_val *v, mm_buf *b) { return val_pystr(e, v, b, 0); }
int mm_tpl_repr(mm_tpl_ectx *e, const mm_tpl_val *v, mm_buf *b) { return val_pystr(e, v, b, 1); }

int mm_tpl_to_strval(mm_tpl_ectx *e, const mm_tpl_val *v, mm_tpl_val *out)
{
    if (mm_tpl_is_str(v)) {
        *out = mm_tpl_ref(v);
        return 0;
    }
    mm_buf b;
    mm_buf_init(&b, MM_TPL_MAX_OUTPUT);
    int rc = mm_tpl_str(e, v, &b);
    if (!rc) {
        *out = mm_tpl_str_n(b.data ? b.data : "", b.len);
        if (MM_TPL_OOM(*out))
            rc = oom(e);
    }
    mm_buf_free(&b);
    return rc;
}

/* ---- json.dumps ---- */
static int dump_string(mm_tpl_ectx *e, const char *s, size_t n, int ascii, mm_buf *b)
{
    int rc;
    if ((rc = put(e, b, "\"", 1)))
        return rc;
    size_t run = 0;   /* bytes copied verbatim, batched */
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        size_t k = mm_tpl_u8_dec(s, n, i, &cp);
        char esc[16];
        size_t en = 0;
        if (cp == '"' || cp == '\\') {
            esc[0] = '\\';
            esc[1] = (char)cp;
            en = 2;
        } else if (cp < 0x20) {
            const char *named = cp == '\n' ? "\\n" : cp == '\r' ? "\\r" : cp == '\t' ? "\\t"
                              : cp == '\b' ? "\\b" : cp == '\f' ? "\\f" : NULL;
            en = named ? (size_t)snprintf(esc, sizeof(esc), "%s", named)
                       : (size_t)snprintf(esc, sizeof(esc), "\\u%04x", cp);
        } else if (ascii && cp >= 0x7F) {
            /* everything past ASCII (DEL stays); surrogate pairs above
             * the BMP, as json.dumps writes them */
            if (cp == 0x7F) {
                i += k;
                run += k;
                continue;
            }
            if (cp < 0x10000) {
                en = (size_t)snprintf(esc, sizeof(esc), "\\u%04x", cp);
            } else {
                uint32_t v = cp - 0x10000;
                en = (size_t)snprintf(esc, sizeof(esc), "\\u%04x\\u%04x", 0xD800 + (v >> 10),
                                      0xDC00 + (v & 0x3FF));
            }
        }
        if (en) {
            if (run && (rc = put(e, b, s + i - run, run)))
                return rc;
            run = 0;
            if ((rc = put(e, b, esc, en)))
                return rc;
        } else {
            run += k;
        }
        i += k;
    }
    if (run && (rc = put(e, b, s + n - run, run)))
        return rc;
    return put(e, b, "\"", 1);
}

static int dump_newline(mm_tpl_ectx *e, const mm_tpl_jsonopt *o, int level, mm_buf *b)
{
    int rc = put(e, b, "\n", 1);
    for (int i = 0; !rc && i < level; i++)
        rc = put(e, b, o->indent, o->indent_len);
    return rc;
}

static int key_cmp(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

static int dump_json(mm_tpl_ectx *e, const json_t *j, const mm_tpl_jsonopt *o, int level,
                     mm_buf *b)
{
    int rc = 0;
    char num[64];
    if (level > MM_TPL_MAX_NEST)
        return mm_tpl_fail(e, -E2BIG, "value nested more than %d deep", MM_TPL_MAX_NEST);
    switch (json_typeof(j)) {
    case JSON_STRING:
        return dump_string(e, json_string_value(j), json_string_length(j), o->ensure_ascii, b);
    case JSON_INTEGER:
        snprintf(num, sizeof(num), "%" JSON_INTEGER_FORMAT, json_integer_value(j));
        return put(e, b, num, strlen(num));
    case JSON_REAL:
        mm_tpl_fmt_float(json_real_value(j), num, sizeof(num));
        return put(e, b, num, strlen(num));
    case JSON_TRUE: return put(e, b, "true", 4);
    case JSON_FALSE: return put(e, b, "false", 5);
    case JSON_NULL: return put(e, b, "null", 4);
    case JSON_ARRAY: {
        size_t n = json_array_size(j);
        int shape = mm_tpl_shape_of(e, j, NULL);
        if (shape >= MM_SHAPE_ITEMS)
            return mm_tpl_fail(e, -EINVAL, "Object of type %s is not JSON serializable",
                               mm_tpl_shape_name(shape));
        if (n == 0)
            return put(e, b, "[]", 2);
        if ((rc = put(e, b, "[", 1)))
            return rc;
        for (size_t i = 0; i < n; i++) {
            if (i && (rc = put(e, b, o->item_sep, o->item_sep_len)))
                return rc;
            if (o->indent_set && (rc = dump_newline(e, o, level + 1, b)))
                return rc;
            if ((rc = dump_json(e, json_array_get(j, i), o, level + 1, b)))
                return rc;
        }
        if (o->indent_set && (rc = dump_newline(e, o, level, b)))
            return rc;
        return put(e, b, "]", 1);
    }
    case JSON_OBJECT: {
        size_t n = json_object_size(j), i = 0;
        if (n == 0)
            return put(e, b, "{}", 2);
        const char **keys = malloc(n * sizeof(*keys));
        if (!keys)
            return oom(e);
        const char *k;
        json_t *v;
        json_object_foreach((json_t *)j, k, v)
            keys[i++] = k;
        if (o->sort_keys)
            qsort(keys, n, sizeof(*keys), key_cmp);
        if ((rc = put(e, b, "{", 1)))
            goto obj_out;
        for (i = 0; i < n; i++) {
            if (i && (rc = put(e, b, o->item_sep, o->item_sep_len)))
                goto obj_out;
            if (o->indent_set && (rc = dump_newline(e, o, level + 1, b)))
                goto obj_out;
            if ((rc = dump_string(e, keys[i], strlen(keys[i]), o->ensure_ascii, b)) ||
                (rc = put(e, b, o->key_sep, o->key_sep_len)) ||
                (rc = dump_json(e, json_object_get(j, keys[i]), o, level + 1, b)))
                goto obj_out;
        }
        if (o->indent_set && (rc = dump_newline(e, o, level, b)))
            goto obj_out;
        rc = put(e, b, "}", 1);
    obj_out:
        free(keys);
        return rc;
    }
    default:
        return mm_tpl_fail(e, -EINVAL, "value is not JSON serializable");
    }
}

int mm_tpl_tojson(mm_tpl_ectx *e, const mm_tpl_val *v, const mm_tpl_jsonopt *o, mm_buf *b)
{
    if (v->kind != MM_TV_JSON)
        return mm_tpl_fail(e, -EINVAL, "Object of type %s is not JSON serializable",
                           mm_tpl_typename(v));
    return dump_json(e, v->u.j, o, 0, b);
}

/* ---- comparison ---- */
static int json_isnum(const json_t *j)
{
    return json_is_number(j) || json_is_boolean(j);
}

static long long json_intish(const json_t *j)
{
    return json_is_boolean(j) ? json_is_true(j) : json_integer_value(j);
}

int mm_tpl_json_eq(const json_t *a, const json_t *b)
{
    if (a == b)
        return 1;
    if (json_isnum(a) && json_isnum(b)) {
        if (!json_is_real(a) && !json_is_real(b))
            return json_intish(a) == json_intish(b);
        double x = json_is_real(a) ? json_real_value(a) : (double)json_intish(a);
        double y = json_is_real(b) ? json_real_value(b) : (double)json_intish(b);
        return x == y;
    }
    if (json_typeof(a) != json_typeof(b))
        return 0;
    switch (json_typeof(a)) {
    case JSON_NULL: return 1;
    case JSON_STRING:
        return json_string_length(a) == json_string_length(b) &&
               !memcmp(json_string_value(a), json_string_value(b), json_string_length(a));
    case JSON_ARRAY: {
        size_t n = json_array_size(a);
        if (n != json_array_size(b))
            return 0;
        for (size_t i = 0; i < n; i++)
            if (!mm_tpl_json_eq(json_array_get(a, i), json_array_get(b, i)))
                return 0;
        return 1;
    }
    case JSON_OBJECT: {
        if (json_object_size(a) != json_object_size(b))
            return 0;
        const char *k;
        json_t *v;
        json_object_foreach((json_t *)a, k, v) {
            json_t *w = json_object_get(b, k);
            if (!w || !mm_tpl_json_eq(v, w))
                return 0;
        }
        return 1;
    }
    default:
        return 0;
    }
}

int mm_tpl_eq(const mm_tpl_val *a, const mm_tpl_val *b)
{
    if (a->kind != b->kind)
        return 0;
    switch (a->kind) {
    case MM_TV_UNDEF: return 1;  /* Undefined == Undefined */
    case MM_TV_JSON: return mm_tpl_json_eq(a->u.j, b->u.j);
    default: return a->u.ns == b->u.ns;  /* identity */
    }
}

int mm_tpl_json_cmp(mm_tpl_ectx *e, const json_t *a, const json_t *b, int *res)
{
    if (json_isnum(a) && json_isnum(b)) {
        if (!json_is_real(a) && !json_is_real(b)) {
            long long x = json_intish(a), y = json_intish(b);
            *res = (x > y) - (x < y);
        } else {
            double x = json_is_real(a) ? json_real_value(a) : (double)json_intish(a);
            double y = json_is_real(b) ? json_real_value(b) : (double)json_intish(b);
            *res = (x > y) - (x < y);
        }
        return 0;
    }
    if (json_is_string(a) && json_is_string(b)) {
        /* UTF-8 byte order is code point order */
        size_t la = json_string_length(a), lb = json_string_length(b);
        int c = memcmp(json_string_value(a), json_string_value(b), la < lb ? la : lb);
        *res = c ? (c > 0) - (c < 0) : (la > lb) - (la < lb);
        return 0;
    }
    if (json_is_array(a) && json_is_array(b)) {
        size_t la = json_array_size(a), lb = json_array_size(b);
        for (size_t i = 0; i < la && i < lb; i++) {
            json_t *x = json_array_get(a, i), *y = json_array_get(b, i);
            if (!mm_tpl_json_eq(x, y))
                return mm_tpl_json_cmp(e, x, y, res);
        }
        *res = (la > lb) - (la < lb);
        return 0;
    }
    return mm_tpl_fail(e, -EINVAL, "'<' not supported between instances of '%s' and '%s'",
                       json_typename(a), json_typename(b));
}

int mm_tpl_cmp(mm_tpl_ectx *e, const mm_tpl_val *a, const mm_tpl_val *b, int *res)
{
    if (a->kind == MM_TV_UNDEF)
        return mm_tpl_undef_error(e, a);
    if (b->kind == MM_TV_UNDEF)
        return mm_tpl_undef_error(e, b);
    if (a->kind != MM_TV_JSON || b->kind != MM_TV_JSON)
        return mm_tpl_fail(e, -EINVAL, "'<' not supported between instances of '%s' and '%s'",
                           mm_tpl_typename(a), mm_tpl_typename(b));
    return mm_tpl_json_cmp(e, a->u.j, b->u.j, res);
}

/* ---- conversions ---- */
int mm_tpl_to_json(mm_tpl_ectx *e, const mm_tpl_val *v, json_t **out)
{
    if (v->kind == MM_TV_JSON) {
        *out = json_incref(v->u.j);
        return 0;
    }
    if (v->kind == MM_TV_UNDEF) {
        if (v->uname && !v->uowner)
            return mm_tpl_fail(e, -ENOTSUP, "an undefined value ('%s') inside a list or dict",
                               v->uname);
        return mm_tpl_fail(e, -ENOTSUP, "an undefined value inside a list or dict");
    }
    return mm_tpl_fail(e, -ENOTSUP, "a %s inside a list or dict", mm_tpl_typename(v));
}

int mm_tpl_iter_take(mm_tpl_ectx *e, mm_tpl_iter *it, json_t **out)
{
    if (it->err_fmt)
        return mm_tpl_fail(e, -EINVAL, it->err_fmt, it->err_arg ? it->err_arg : "");
    json_t *a = json_array();
    if (!a)
        return oom(e);
    for (size_t i = it->pos; i < json_array_size(it->items); i++)
        if (json_array_append(a, json_array_get(it->items, i))) {
            json_decref(a);
            return oom(e);
        }
    it->pos = json_array_size(it->items);
    *out = a;
    return 0;
}

int mm_tpl_iterate(mm_tpl_ectx *e, const mm_tpl_val *v, json_t **out)
{
    if (v->kind == MM_TV_UNDEF) {
        *out = json_array();
        return *out ? 0 : oom(e);
    }
    if (v->kind == MM_TV_JSON && json_is_array(v->u.j)) {
        *out = json_incref(v->u.j);
        return 0;
    }
    if (v->kind == MM_TV_ITER)
        return mm_tpl_iter_take(e, v->u.it, out);
    if (v->kind == MM_TV_JSON && json_is_object(v->u.j)) {
        json_t *a = json_array();
        const char *k;
        json_t *x;
        if (!a)
            return oom(e);
        json_object_foreach(v->u.j, k, x) {
            if (json_array_append_new(a, json_string_nocheck(k))) {
                json_decref(a);
                return oom(e);
            }
        }
        *out = a;
        return 0;
    }
    if (v->kind == MM_TV_JSON && json_is_string(v->u.j)) {
        const char *s = json_string_value(v->u.j);
        size_t n = json_string_length(v->u.j);
        json_t *a = json_array();
        if (!a)
            return oom(e);
        for (size_t i = 0; i < n;) {
            uint32_t cp;
            size_t k = mm_tpl_u8_dec(s, n, i, &cp);
            if (json_array_append_new(a, json_stringn_nocheck(s + i, k))) {
                json_decref(a);
                return oom(e);
            }
            i += k;
        }
        *out = a;
        return 0;
    }
    return mm_tpl_fail(e, -EINVAL, "'%s' object is not iterable", mm_tpl_typename(v));
}

/* ---- Python str methods shared by filters and methods ---- */

/* Decode s into code points and their byte offsets (offs[n] = byte length). */
static int decode_all(mm_tpl_ectx *e, const char *s, size_t n, uint32_t **cps, size_t **offs,
                      size_t *count)
{
    size_t m = mm_tpl_u8_len(s, n);
    *cps = malloc((m + 1) * sizeof(**cps));
    *offs = malloc((m + 1) * sizeof(**offs));
    if (!*cps || !*offs) {
        free(*cps);
        free(*offs);
        *cps = NULL;
        *offs = NULL;
        return oom(e);
    }
    size_t i = 0, k = 0;
    while (i < n) {
        (*offs)[k] = i;
        i += mm_tpl_u8_dec(s, n, i, &(*cps)[k]);
        k++;
    }
    (*offs)[k] = n;
    *count = k;
    return 0;
}

static int in_set(uint32_t c, const uint32_t *set, size_t n)
{
    if (!set)
        return mm_tpl_py_isspace(c);
    for (size_t i = 0; i < n; i++)
        if (set[i] == c)
            return 1;
    return 0;
}

int mm_tpl_strip(mm_tpl_ectx *e, const char *s, size_t n, const mm_tpl_val *chars, int left,
                 int right, mm_tpl_val *out)
{
    uint32_t *set = NULL, *cps = NULL;
    size_t *soffs = NULL, *offs = NULL, nset = 0, m;
    int rc;
    if (chars && !mm_tpl_is_none(chars) && chars->kind != MM_TV_UNDEF) {
        if (!mm_tpl_is_str(chars))
            return mm_tpl_fail(e, -EINVAL, "strip arg must be None or str");
        rc = decode_all(e, json_string_value(chars->u.j), json_string_length(chars->u.j), &set,
                        &soffs, &nset);
        if (rc)
            return rc;
    }
    if ((rc = decode_all(e, s, n, &cps, &offs, &m)))
        goto out;
    size_t a = 0, b = m;
    if (left)
        while (a < b && in_set(cps[a], set, nset))
            a++;
    if (right)
        while (b > a && in_set(cps[b - 1], set, nset))
            b--;
    *out = mm_tpl_str_n(s + offs[a], offs[b] - offs[a]);
    if (MM_TPL_OOM(*out))
        rc = oom(e);
out:
    free(set);
    free(soffs);
    free(cps);
    free(offs);
    return rc;
}

static int list_add(mm_tpl_ectx *e, json_t *l, const char *s, size_t n)
{
    return json_array_append_new(l, json_stringn_nocheck(s, n)) ? oom(e) : 0;
}

static int reverse_list(mm_tpl_ectx *e, json_t **l)
{
    json_t *r = json_array();
    if (!r)
        return oom(e);
    for (size_t i = json_array_size(*l); i-- > 0;)
        if (json_array_append(r, json_array_get(*l, i))) {
            json_decref(r);
            return oom(e);
        }
    json_decref(*l);
    *l = r;
    return 0;
}

int mm_tpl_split(mm_tpl_ectx *e, const char *s, size_t n, const mm_tpl_val *sep,
                 long long maxsplit, int from_right, mm_tpl_val *out)
{
    int rc = 0;
    json_t *l = json_array();
    uint32_t *cps = NULL;
    size_t *offs = NULL, m;
    if (!l)
        return oom(e);
    if (maxsplit < 0)
        maxsplit = (long long)(n + 1);
    if (!sep || mm_tpl_is_none(sep) || sep->kind == MM_TV_UNDEF) {
        /* CPython's split_whitespace / rsplit_whitespace, on code points */
        if ((rc = decode_all(e, s, n, &cps, &offs, &m)))
            goto out;
        if (!from_right) {
            size_t i = 0, j;
            while (maxsplit-- > 0) {
                while (i < m && mm_tpl_py_isspace(cps[i]))
                    i++;
                if (i == m)
                    break;
                j = i++;
                while (i < m && !mm_tpl_py_isspace(cps[i]))
                    i++;
                if ((rc = list_add(e, l, s + offs[j], offs[i] - offs[j])))
                    goto out;
            }
            if (i < m) {
                while (i < m && mm_tpl_py_isspace(cps[i]))
                    i++;
                if (i != m && (rc = list_add(e, l, s + offs[i], n - offs[i])))
                    goto out;
            }
        } else {
            long long i = (long long)m - 1, j;
            while (maxsplit-- > 0) {
                while (i >= 0 && mm_tpl_py_isspace(cps[i]))
                    i--;
                if (i < 0)
                    break;
                j = i--;
                while (i >= 0 && !mm_tpl_py_isspace(cps[i]))
                    i--;
                if ((rc = list_add(e, l, s + offs[i + 1], offs[j + 1] - offs[i + 1])))
                    goto out;
            }
            if (i >= 0) {
                while (i >= 0 && mm_tpl_py_isspace(cps[i]))
                    i--;
                if (i >= 0 && (rc = list_add(e, l, s, offs[i + 1])))
                    goto out;
            }
            if ((rc = reverse_list(e, &l)))
                goto out;
        }
    } else {
        if (!mm_tpl_is_str(sep)) {
            rc = mm_tpl_fail(e, -EINVAL, "must be str or None, not %s", mm_tpl_typename(sep));
            goto out;
        }
        const char *p = json_string_value(sep->u.j);
        size_t pn = json_string_length(sep->u.j);
        if (pn == 0) {
            rc = mm_tpl_fail(e, -EINVAL, "empty separator");
            goto out;
        }
        if (!from_right) {
            size_t i = 0;
            while (maxsplit > 0) {
                const char *hit = pn <= n - i ? memmem(s + i, n - i, p, pn) : NULL;
                if (!hit)
                    break;
                size_t h = (size_t)(hit - s);
                if ((rc = list_add(e, l, s + i, h - i)))
                    goto out;
                i = h + pn;
                maxsplit--;
            }
            if ((rc = list_add(e, l, s + i, n - i)))
                goto out;
        } else {
            size_t end = n;
            while (maxsplit > 0 && end >= pn) {
                size_t h = end - pn;
                int found = 0;
                for (;;) {
                    if (!memcmp(s + h, p, pn)) {
                        found = 1;
                        break;
                    }
                    if (h == 0)
                        break;
                    h--;
                }
                if (!found)
                    break;
                if ((rc = list_add(e, l, s + h + pn, end - h - pn)))
                    goto out;
                end = h;
                maxsplit--;
            }
            if ((rc = list_add(e, l, s, end)) || (rc = reverse_list(e, &l)))
                goto out;
        }
    }
    *out = mm_tpl_jv(l);
    l = NULL;
out:
    json_decref(l);
    free(cps);
    free(offs);
    return rc;
}

int mm_tpl_replace(mm_tpl_ectx *e, const char *s, size_t n, const char *old, size_t on,
                   const char *nw, size_t nn, long long count, mm_tpl_val *out)
{
    mm_buf b;
    int rc = 0;
    mm_buf_init(&b, MM_TPL_MAX_OUTPUT);
    if (count < 0)
        count = (long long)n + 2;
    size_t i = 0;
    if (on == 0) {
        /* Python inserts `new` before every character and at the end */
        while (i <= n && count > 0) {
            if ((rc = put(e, &b, nw, nn)))
                goto out;
            count--;
            if (i == n) {
                i++;
                break;
            }
            uint32_t cp;
            size_t k = mm_tpl_u8_dec(s, n, i, &cp);
            if ((rc = put(e, &b, s + i, k)))
                goto out;
            i += k;
        }
        if (i < n && (rc = put(e, &b, s + i, n - i)))
            goto out;
    } else {
        while (count > 0) {
            const char *hit = on <= n - i ? memmem(s + i, n - i, old, on) : NULL;
            if (!hit)
                break;
            size_t h = (size_t)(hit - s);
            if ((rc = put(e, &b, s + i, h - i)) || (rc = put(e, &b, nw, nn)))
                goto out;
            i = h + on;
            count--;
        }
        if ((rc = put(e, &b, s + i, n - i)))
            goto out;
    }
    *out = mm_tpl_str_n(b.data ? b.data : "", b.len);
    if (MM_TPL_OOM(*out))
        rc = oom(e);
out:
    mm_buf_free(&b);
    return rc;
}

/* Jinja's title filter splits words at runs of these. */
static int jtitle_sep(uint32_t c)
{
    return c == '-' || c == '(' || c == '{' || c == '[' || c == '<' || mm_tpl_py_isspace(c);
}

static int put_cp(mm_tpl_ectx *e, mm_buf *b, uint32_t c, int upper)
{
    char u[8];
    /* the two full mappings that change length and that text commonly has */
    if (upper && c == 0xDF)
        return put(e, b, "SS", 2);
    if (!upper && c == 0x130)
        return put(e, b, "i\xcc\x87", 3);
    uint32_t m = upper ? mm_tpl_py_upper(c) : mm_tpl_py_lower(c);
    return put(e, b, u, mm_tpl_u8_enc(m, u));
}

int mm_tpl_case(mm_tpl_ectx *e, const char *s, size_t n, int how, mm_tpl_val *out)
{
    mm_buf b;
    int rc = 0, prev_cased = 0, prev_sep = -1;
    mm_buf_init(&b, MM_TPL_MAX_OUTPUT);
    for (size_t i = 0; i < n;) {
        uint32_t c;
        size_t k = mm_tpl_u8_dec(s, n, i, &c);
        int up = 0;
        switch (how) {
        case MM_CASE_UPPER: up = 1; break;
        case MM_CASE_LOWER: up = 0; break;
        case MM_CASE_CAPITALIZE: up = i == 0; break;
        case MM_CASE_TITLE:
            up = !prev_cased;
            prev_cased = mm_tpl_py_cased(c);
            break;
        default: {  /* MM_CASE_JTITLE: first of each piece upper, rest lower */
            int sep = jtitle_sep(c);
            up = sep != prev_sep;
            prev_sep = sep;
            break;
        }
        }
        if ((rc = put_cp(e, &b, c, up)))
            goto out;
        i += k;
    }
    *out = mm_tpl_str_n(b.data ? b.data : "", b.len);
    if (MM_TPL_OOM(*out))
        rc = oom(e);
out:
    mm_buf_free(&b);
    return rc;
}
