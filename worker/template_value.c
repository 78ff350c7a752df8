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

/* Python's str.isprintable(): false for categories Cc Cf Cs Co Cn Zl Zp and
 * Zs but the space.  Ranges from Python 3.11's tables (Unicode 14.0), made
 * with: [c for c in range(0x110000) if not chr(c).isprintable()], merged. */
static const uint32_t nonprintable[][2] = {
        {0x0, 0x1F}, {0x7F, 0xA0}, {0xAD, 0xAD}, {0x378, 0x379}, {0x380, 0x383}, {0x38B, 0x38B},
        {0x38D, 0x38D}, {0x3A2, 0x3A2}, {0x530, 0x530}, {0x557, 0x558}, {0x58B, 0x58C},
        {0x590, 0x590}, {0x5C8, 0x5CF}, {0x5EB, 0x5EE}, {0x5F5, 0x605}, {0x61C, 0x61C},
        {0x6DD, 0x6DD}, {0x70E, 0x70F}, {0x74B, 0x74C}, {0x7B2, 0x7BF}, {0x7FB, 0x7FC},
        {0x82E, 0x82F}, {0x83F, 0x83F}, {0x85C, 0x85D}, {0x85F, 0x85F}, {0x86B, 0x86F},
        {0x88F, 0x897}, {0x8E2, 0x8E2}, {0x984, 0x984}, {0x98D, 0x98E}, {0x991, 0x992},
        {0x9A9, 0x9A9}, {0x9B1, 0x9B1}, {0x9B3, 0x9B5}, {0x9BA, 0x9BB}, {0x9C5, 0x9C6},
        {0x9C9, 0x9CA}, {0x9CF, 0x9D6}, {0x9D8, 0x9DB}, {0x9DE, 0x9DE}, {0x9E4, 0x9E5},
        {0x9FF, 0xA00}, {0xA04, 0xA04}, {0xA0B, 0xA0E}, {0xA11, 0xA12}, {0xA29, 0xA29},
        {0xA31, 0xA31}, {0xA34, 0xA34}, {0xA37, 0xA37}, {0xA3A, 0xA3B}, {0xA3D, 0xA3D},
        {0xA43, 0xA46}, {0xA49, 0xA4A}, {0xA4E, 0xA50}, {0xA52, 0xA58}, {0xA5D, 0xA5D},
        {0xA5F, 0xA65}, {0xA77, 0xA80}, {0xA84, 0xA84}, {0xA8E, 0xA8E}, {0xA92, 0xA92},
        {0xAA9, 0xAA9}, {0xAB1, 0xAB1}, {0xAB4, 0xAB4}, {0xABA, 0xABB}, {0xAC6, 0xAC6},
        {0xACA, 0xACA}, {0xACE, 0xACF}, {0xAD1, 0xADF}, {0xAE4, 0xAE5}, {0xAF2, 0xAF8},
        {0xB00, 0xB00}, {0xB04, 0xB04}, {0xB0D, 0xB0E}, {0xB11, 0xB12}, {0xB29, 0xB29},
        {0xB31, 0xB31}, {0xB34, 0xB34}, {0xB3A, 0xB3B}, {0xB45, 0xB46}, {0xB49, 0xB4A},
        {0xB4E, 0xB54}, {0xB58, 0xB5B}, {0xB5E, 0xB5E}, {0xB64, 0xB65}, {0xB78, 0xB81},
        {0xB84, 0xB84}, {0xB8B, 0xB8D}, {0xB91, 0xB91}, {0xB96, 0xB98}, {0xB9B, 0xB9B},
        {0xB9D, 0xB9D}, {0xBA0, 0xBA2}, {0xBA5, 0xBA7}, {0xBAB, 0xBAD}, {0xBBA, 0xBBD},
        {0xBC3, 0xBC5}, {0xBC9, 0xBC9}, {0xBCE, 0xBCF}, {0xBD1, 0xBD6}, {0xBD8, 0xBE5},
        {0xBFB, 0xBFF}, {0xC0D, 0xC0D}, {0xC11, 0xC11}, {0xC29, 0xC29}, {0xC3A, 0xC3B},
        {0xC45, 0xC45}, {0xC49, 0xC49}, {0xC4E, 0xC54}, {0xC57, 0xC57}, {0xC5B, 0xC5C},
        {0xC5E, 0xC5F}, {0xC64, 0xC65}, {0xC70, 0xC76}, {0xC8D, 0xC8D}, {0xC91, 0xC91},
        {0xCA9, 0xCA9}, {0xCB4, 0xCB4}, {0xCBA, 0xCBB}, {0xCC5, 0xCC5}, {0xCC9, 0xCC9},
        {0xCCE, 0xCD4}, {0xCD7, 0xCDC}, {0xCDF, 0xCDF}, {0xCE4, 0xCE5}, {0xCF0, 0xCF0},
        {0xCF3, 0xCFF}, {0xD0D, 0xD0D}, {0xD11, 0xD11}, {0xD45, 0xD45}, {0xD49, 0xD49},
        {0xD50, 0xD53}, {0xD64, 0xD65}, {0xD80, 0xD80}, {0xD84, 0xD84}, {0xD97, 0xD99},
        {0xDB2, 0xDB2}, {0xDBC, 0xDBC}, {0xDBE, 0xDBF}, {0xDC7, 0xDC9}, {0xDCB, 0xDCE},
        {0xDD5, 0xDD5}, {0xDD7, 0xDD7}, {0xDE0, 0xDE5}, {0xDF0, 0xDF1}, {0xDF5, 0xE00},
        {0xE3B, 0xE3E}, {0xE5C, 0xE80}, {0xE83, 0xE83}, {0xE85, 0xE85}, {0xE8B, 0xE8B},
        {0xEA4, 0xEA4}, {0xEA6, 0xEA6}, {0xEBE, 0xEBF}, {0xEC5, 0xEC5}, {0xEC7, 0xEC7},
        {0xECE, 0xECF}, {0xEDA, 0xEDB}, {0xEE0, 0xEFF}, {0xF48, 0xF48}, {0xF6D, 0xF70},
        {0xF98, 0xF98}, {0xFBD, 0xFBD}, {0xFCD, 0xFCD}, {0xFDB, 0xFFF}, {0x10C6, 0x10C6},
        {0x10C8, 0x10CC}, {0x10CE, 0x10CF}, {0x1249, 0x1249}, {0x124E, 0x124F},
        {0x1257, 0x1257}, {0x1259, 0x1259}, {0x125E, 0x125F}, {0x1289, 0x1289},
        {0x128E, 0x128F}, {0x12B1, 0x12B1}, {0x12B6, 0x12B7}, {0x12BF, 0x12BF},
        {0x12C1, 0x12C1}, {0x12C6, 0x12C7}, {0x12D7, 0x12D7}, {0x1311, 0x1311},
        {0x1316, 0x1317}, {0x135B, 0x135C}, {0x137D, 0x137F}, {0x139A, 0x139F},
        {0x13F6, 0x13F7}, {0x13FE, 0x13FF}, {0x1680, 0x1680}, {0x169D, 0x169F},
        {0x16F9, 0x16FF}, {0x1716, 0x171E}, {0x1737, 0x173F}, {0x1754, 0x175F},
        {0x176D, 0x176D}, {0x1771, 0x1771}, {0x1774, 0x177F}, {0x17DE, 0x17DF},
        {0x17EA, 0x17EF}, {0x17FA, 0x17FF}, {0x180E, 0x180E}, {0x181A, 0x181F},
        {0x1879, 0x187F}, {0x18AB, 0x18AF}, {0x18F6, 0x18FF}, {0x191F, 0x191F},
        {0x192C, 0x192F}, {0x193C, 0x193F}, {0x1941, 0x1943}, {0x196E, 0x196F},
        {0x1975, 0x197F}, {0x19AC, 0x19AF}, {0x19CA, 0x19CF}, {0x19DB, 0x19DD},
        {0x1A1C, 0x1A1D}, {0x1A5F, 0x1A5F}, {0x1A7D, 0x1A7E}, {0x1A8A, 0x1A8F},
        {0x1A9A, 0x1A9F}, {0x1AAE, 0x1AAF}, {0x1ACF, 0x1AFF}, {0x1B4D, 0x1B4F},
        {0x1B7F, 0x1B7F}, {0x1BF4, 0x1BFB}, {0x1C38, 0x1C3A}, {0x1C4A, 0x1C4C},
        {0x1C89, 0x1C8F}, {0x1CBB, 0x1CBC}, {0x1CC8, 0x1CCF}, {0x1CFB, 0x1CFF},
        {0x1F16, 0x1F17}, {0x1F1E, 0x1F1F}, {0x1F46, 0x1F47}, {0x1F4E, 0x1F4F},
        {0x1F58, 0x1F58}, {0x1F5A, 0x1F5A}, {0x1F5C, 0x1F5C}, {0x1F5E, 0x1F5E},
        {0x1F7E, 0x1F7F}, {0x1FB5, 0x1FB5}, {0x1FC5, 0x1FC5}, {0x1FD4, 0x1FD5},
        {0x1FDC, 0x1FDC}, {0x1FF0, 0x1FF1}, {0x1FF5, 0x1FF5}, {0x1FFF, 0x200F},
        {0x2028, 0x202F}, {0x205F, 0x206F}, {0x2072, 0x2073}, {0x208F, 0x208F},
        {0x209D, 0x209F}, {0x20C1, 0x20CF}, {0x20F1, 0x20FF}, {0x218C, 0x218F},
        {0x2427, 0x243F}, {0x244B, 0x245F}, {0x2B74, 0x2B75}, {0x2B96, 0x2B96},
        {0x2CF4, 0x2CF8}, {0x2D26, 0x2D26}, {0x2D28, 0x2D2C}, {0x2D2E, 0x2D2F},
        {0x2D68, 0x2D6E}, {0x2D71, 0x2D7E}, {0x2D97, 0x2D9F}, {0x2DA7, 0x2DA7},
        {0x2DAF, 0x2DAF}, {0x2DB7, 0x2DB7}, {0x2DBF, 0x2DBF}, {0x2DC7, 0x2DC7},
        {0x2DCF, 0x2DCF}, {0x2DD7, 0x2DD7}, {0x2DDF, 0x2DDF}, {0x2E5E, 0x2E7F},
        {0x2E9A, 0x2E9A}, {0x2EF4, 0x2EFF}, {0x2FD6, 0x2FEF}, {0x2FFC, 0x3000},
        {0x3040, 0x3040}, {0x3097, 0x3098}, {0x3100, 0x3104}, {0x3130, 0x3130},
        {0x318F, 0x318F}, {0x31E4, 0x31EF}, {0x321F, 0x321F}, {0xA48D, 0xA48F},
        {0xA4C7, 0xA4CF}, {0xA62C, 0xA63F}, {0xA6F8, 0xA6FF}, {0xA7CB, 0xA7CF},
        {0xA7D2, 0xA7D2}, {0xA7D4, 0xA7D4}, {0xA7DA, 0xA7F1}, {0xA82D, 0xA82F},
        {0xA83A, 0xA83F}, {0xA878, 0xA87F}, {0xA8C6, 0xA8CD}, {0xA8DA, 0xA8DF},
        {0xA954, 0xA95E}, {0xA97D, 0xA97F}, {0xA9CE, 0xA9CE}, {0xA9DA, 0xA9DD},
        {0xA9FF, 0xA9FF}, {0xAA37, 0xAA3F}, {0xAA4E, 0xAA4F}, {0xAA5A, 0xAA5B},
        {0xAAC3, 0xAADA}, {0xAAF7, 0xAB00}, {0xAB07, 0xAB08}, {0xAB0F, 0xAB10},
        {0xAB17, 0xAB1F}, {0xAB27, 0xAB27}, {0xAB2F, 0xAB2F}, {0xAB6C, 0xAB6F},
        {0xABEE, 0xABEF}, {0xABFA, 0xABFF}, {0xD7A4, 0xD7AF}, {0xD7C7, 0xD7CA},
        {0xD7FC, 0xF8FF}, {0xFA6E, 0xFA6F}, {0xFADA, 0xFAFF}, {0xFB07, 0xFB12},
        {0xFB18, 0xFB1C}, {0xFB37, 0xFB37}, {0xFB3D, 0xFB3D}, {0xFB3F, 0xFB3F},
        {0xFB42, 0xFB42}, {0xFB45, 0xFB45}, {0xFBC3, 0xFBD2}, {0xFD90, 0xFD91},
        {0xFDC8, 0xFDCE}, {0xFDD0, 0xFDEF}, {0xFE1A, 0xFE1F}, {0xFE53, 0xFE53},
        {0xFE67, 0xFE67}, {0xFE6C, 0xFE6F}, {0xFE75, 0xFE75}, {0xFEFD, 0xFF00},
        {0xFFBF, 0xFFC1}, {0xFFC8, 0xFFC9}, {0xFFD0, 0xFFD1}, {0xFFD8, 0xFFD9},
        {0xFFDD, 0xFFDF}, {0xFFE7, 0xFFE7}, {0xFFEF, 0xFFFB}, {0xFFFE, 0xFFFF},
        {0x1000C, 0x1000C}, {0x10027, 0x10027}, {0x1003B, 0x1003B}, {0x1003E, 0x1003E},
        {0x1004E, 0x1004F}, {0x1005E, 0x1007F}, {0x100FB, 0x100FF}, {0x10103, 0x10106},
        {0x10134, 0x10136}, {0x1018F, 0x1018F}, {0x1019D, 0x1019F}, {0x101A1, 0x101CF},
        {0x101FE, 0x1027F}, {0x1029D, 0x1029F}, {0x102D1, 0x102DF}, {0x102FC, 0x102FF},
        {0x10324, 0x1032C}, {0x1034B, 0x1034F}, {0x1037B, 0x1037F}, {0x1039E, 0x1039E},
        {0x103C4, 0x103C7}, {0x103D6, 0x103FF}, {0x1049E, 0x1049F}, {0x104AA, 0x104AF},
        {0x104D4, 0x104D7}, {0x104FC, 0x104FF}, {0x10528, 0x1052F}, {0x10564, 0x1056E},
        {0x1057B, 0x1057B}, {0x1058B, 0x1058B}, {0x10593, 0x10593}, {0x10596, 0x10596},
        {0x105A2, 0x105A2}, {0x105B2, 0x105B2}, {0x105BA, 0x105BA}, {0x105BD, 0x105FF},
        {0x10737, 0x1073F}, {0x10756, 0x1075F}, {0x10768, 0x1077F}, {0x10786, 0x10786},
        {0x107B1, 0x107B1}, {0x107BB, 0x107FF}, {0x10806, 0x10807}, {0x10809, 0x10809},
        {0x10836, 0x10836}, {0x10839, 0x1083B}, {0x1083D, 0x1083E}, {0x10856, 0x10856},
        {0x1089F, 0x108A6}, {0x108B0, 0x108DF}, {0x108F3, 0x108F3}, {0x108F6, 0x108FA},
        {0x1091C, 0x1091E}, {0x1093A, 0x1093E}, {0x10940, 0x1097F}, {0x109B8, 0x109BB},
        {0x109D0, 0x109D1}, {0x10A04, 0x10A04}, {0x10A07, 0x10A0B}, {0x10A14, 0x10A14},
        {0x10A18, 0x10A18}, {0x10A36, 0x10A37}, {0x10A3B, 0x10A3E}, {0x10A49, 0x10A4F},
        {0x10A59, 0x10A5F}, {0x10AA0, 0x10ABF}, {0x10AE7, 0x10AEA}, {0x10AF7, 0x10AFF},
        {0x10B36, 0x10B38}, {0x10B56, 0x10B57}, {0x10B73, 0x10B77}, {0x10B92, 0x10B98},
        {0x10B9D, 0x10BA8}, {0x10BB0, 0x10BFF}, {0x10C49, 0x10C7F}, {0x10CB3, 0x10CBF},
        {0x10CF3, 0x10CF9}, {0x10D28, 0x10D2F}, {0x10D3A, 0x10E5F}, {0x10E7F, 0x10E7F},
        {0x10EAA, 0x10EAA}, {0x10EAE, 0x10EAF}, {0x10EB2, 0x10EFF}, {0x10F28, 0x10F2F},
        {0x10F5A, 0x10F6F}, {0x10F8A, 0x10FAF}, {0x10FCC, 0x10FDF}, {0x10FF7, 0x10FFF},
        {0x1104E, 0x11051}, {0x11076, 0x1107E}, {0x110BD, 0x110BD}, {0x110C3, 0x110CF},
        {0x110E9, 0x110EF}, {0x110FA, 0x110FF}, {0x11135, 0x11135}, {0x11148, 0x1114F},
        {0x11177, 0x1117F}, {0x111E0, 0x111E0}, {0x111F5, 0x111FF}, {0x11212, 0x11212},
        {0x1123F, 0x1127F}, {0x11287, 0x11287}, {0x11289, 0x11289}, {0x1128E, 0x1128E},
        {0x1129E, 0x1129E}, {0x112AA, 0x112AF}, {0x112EB, 0x112EF}, {0x112FA, 0x112FF},
        {0x11304, 0x11304}, {0x1130D, 0x1130E}, {0x11311, 0x11312}, {0x11329, 0x11329},
        {0x11331, 0x11331}, {0x11334, 0x11334}, {0x1133A, 0x1133A}, {0x11345, 0x11346},
        {0x11349, 0x1134A}, {0x1134E, 0x1134F}, {0x11351, 0x11356}, {0x11358, 0x1135C},
        {0x11364, 0x11365}, {0x1136D, 0x1136F}, {0x11375, 0x113FF}, {0x1145C, 0x1145C},
        {0x11462, 0x1147F}, {0x114C8, 0x114CF}, {0x114DA, 0x1157F}, {0x115B6, 0x115B7},
        {0x115DE, 0x115FF}, {0x11645, 0x1164F}, {0x1165A, 0x1165F}, {0x1166D, 0x1167F},
        {0x116BA, 0x116BF}, {0x116CA, 0x116FF}, {0x1171B, 0x1171C}, {0x1172C, 0x1172F},
        {0x11747, 0x117FF}, {0x1183C, 0x1189F}, {0x118F3, 0x118FE}, {0x11907, 0x11908},
        {0x1190A, 0x1190B}, {0x11914, 0x11914}, {0x11917, 0x11917}, {0x11936, 0x11936},
        {0x11939, 0x1193A}, {0x11947, 0x1194F}, {0x1195A, 0x1199F}, {0x119A8, 0x119A9},
        {0x119D8, 0x119D9}, {0x119E5, 0x119FF}, {0x11A48, 0x11A4F}, {0x11AA3, 0x11AAF},
        {0x11AF9, 0x11BFF}, {0x11C09, 0x11C09}, {0x11C37, 0x11C37}, {0x11C46, 0x11C4F},
        {0x11C6D, 0x11C6F}, {0x11C90, 0x11C91}, {0x11CA8, 0x11CA8}, {0x11CB7, 0x11CFF},
        {0x11D07, 0x11D07}, {0x11D0A, 0x11D0A}, {0x11D37, 0x11D39}, {0x11D3B, 0x11D3B},
        {0x11D3E, 0x11D3E}, {0x11D48, 0x11D4F}, {0x11D5A, 0x11D5F}, {0x11D66, 0x11D66},
        {0x11D69, 0x11D69}, {0x11D8F, 0x11D8F}, {0x11D92, 0x11D92}, {0x11D99, 0x11D9F},
        {0x11DAA, 0x11EDF}, {0x11EF9, 0x11FAF}, {0x11FB1, 0x11FBF}, {0x11FF2, 0x11FFE},
        {0x1239A, 0x123FF}, {0x1246F, 0x1246F}, {0x12475, 0x1247F}, {0x12544, 0x12F8F},
        {0x12FF3, 0x12FFF}, {0x1342F, 0x143FF}, {0x14647, 0x167FF}, {0x16A39, 0x16A3F},
        {0x16A5F, 0x16A5F}, {0x16A6A, 0x16A6D}, {0x16ABF, 0x16ABF}, {0x16ACA, 0x16ACF},
        {0x16AEE, 0x16AEF}, {0x16AF6, 0x16AFF}, {0x16B46, 0x16B4F}, {0x16B5A, 0x16B5A},
        {0x16B62, 0x16B62}, {0x16B78, 0x16B7C}, {0x16B90, 0x16E3F}, {0x16E9B, 0x16EFF},
        {0x16F4B, 0x16F4E}, {0x16F88, 0x16F8E}, {0x16FA0, 0x16FDF}, {0x16FE5, 0x16FEF},
        {0x16FF2, 0x16FFF}, {0x187F8, 0x187FF}, {0x18CD6, 0x18CFF}, {0x18D09, 0x1AFEF},
        {0x1AFF4, 0x1AFF4}, {0x1AFFC, 0x1AFFC}, {0x1AFFF, 0x1AFFF}, {0x1B123, 0x1B14F},
        {0x1B153, 0x1B163}, {0x1B168, 0x1B16F}, {0x1B2FC, 0x1BBFF}, {0x1BC6B, 0x1BC6F},
        {0x1BC7D, 0x1BC7F}, {0x1BC89, 0x1BC8F}, {0x1BC9A, 0x1BC9B}, {0x1BCA0, 0x1CEFF},
        {0x1CF2E, 0x1CF2F}, {0x1CF47, 0x1CF4F}, {0x1CFC4, 0x1CFFF}, {0x1D0F6, 0x1D0FF},
        {0x1D127, 0x1D128}, {0x1D173, 0x1D17A}, {0x1D1EB, 0x1D1FF}, {0x1D246, 0x1D2DF},
        {0x1D2F4, 0x1D2FF}, {0x1D357, 0x1D35F}, {0x1D379, 0x1D3FF}, {0x1D455, 0x1D455},
        {0x1D49D, 0x1D49D}, {0x1D4A0, 0x1D4A1}, {0x1D4A3, 0x1D4A4}, {0x1D4A7, 0x1D4A8},
        {0x1D4AD, 0x1D4AD}, {0x1D4BA, 0x1D4BA}, {0x1D4BC, 0x1D4BC}, {0x1D4C4, 0x1D4C4},
        {0x1D506, 0x1D506}, {0x1D50B, 0x1D50C}, {0x1D515, 0x1D515}, {0x1D51D, 0x1D51D},
        {0x1D53A, 0x1D53A}, {0x1D53F, 0x1D53F}, {0x1D545, 0x1D545}, {0x1D547, 0x1D549},
        {0x1D551, 0x1D551}, {0x1D6A6, 0x1D6A7}, {0x1D7CC, 0x1D7CD}, {0x1DA8C, 0x1DA9A},
        {0x1DAA0, 0x1DAA0}, {0x1DAB0, 0x1DEFF}, {0x1DF1F, 0x1DFFF}, {0x1E007, 0x1E007},
        {0x1E019, 0x1E01A}, {0x1E022, 0x1E022}, {0x1E025, 0x1E025}, {0x1E02B, 0x1E0FF},
        {0x1E12D, 0x1E12F}, {0x1E13E, 0x1E13F}, {0x1E14A, 0x1E14D}, {0x1E150, 0x1E28F},
        {0x1E2AF, 0x1E2BF}, {0x1E2FA, 0x1E2FE}, {0x1E300, 0x1E7DF}, {0x1E7E7, 0x1E7E7},
        {0x1E7EC, 0x1E7EC}, {0x1E7EF, 0x1E7EF}, {0x1E7FF, 0x1E7FF}, {0x1E8C5, 0x1E8C6},
        {0x1E8D7, 0x1E8FF}, {0x1E94C, 0x1E94F}, {0x1E95A, 0x1E95D}, {0x1E960, 0x1EC70},
        {0x1ECB5, 0x1ED00}, {0x1ED3E, 0x1EDFF}, {0x1EE04, 0x1EE04}, {0x1EE20, 0x1EE20},
        {0x1EE23, 0x1EE23}, {0x1EE25, 0x1EE26}, {0x1EE28, 0x1EE28}, {0x1EE33, 0x1EE33},
        {0x1EE38, 0x1EE38}, {0x1EE3A, 0x1EE3A}, {0x1EE3C, 0x1EE41}, {0x1EE43, 0x1EE46},
        {0x1EE48, 0x1EE48}, {0x1EE4A, 0x1EE4A}, {0x1EE4C, 0x1EE4C}, {0x1EE50, 0x1EE50},
        {0x1EE53, 0x1EE53}, {0x1EE55, 0x1EE56}, {0x1EE58, 0x1EE58}, {0x1EE5A, 0x1EE5A},
        {0x1EE5C, 0x1EE5C}, {0x1EE5E, 0x1EE5E}, {0x1EE60, 0x1EE60}, {0x1EE63, 0x1EE63},
        {0x1EE65, 0x1EE66}, {0x1EE6B, 0x1EE6B}, {0x1EE73, 0x1EE73}, {0x1EE78, 0x1EE78},
        {0x1EE7D, 0x1EE7D}, {0x1EE7F, 0x1EE7F}, {0x1EE8A, 0x1EE8A}, {0x1EE9C, 0x1EEA0},
        {0x1EEA4, 0x1EEA4}, {0x1EEAA, 0x1EEAA}, {0x1EEBC, 0x1EEEF}, {0x1EEF2, 0x1EFFF},
        {0x1F02C, 0x1F02F}, {0x1F094, 0x1F09F}, {0x1F0AF, 0x1F0B0}, {0x1F0C0, 0x1F0C0},
        {0x1F0D0, 0x1F0D0}, {0x1F0F6, 0x1F0FF}, {0x1F1AE, 0x1F1E5}, {0x1F203, 0x1F20F},
        {0x1F23C, 0x1F23F}, {0x1F249, 0x1F24F}, {0x1F252, 0x1F25F}, {0x1F266, 0x1F2FF},
        {0x1F6D8, 0x1F6DC}, {0x1F6ED, 0x1F6EF}, {0x1F6FD, 0x1F6FF}, {0x1F774, 0x1F77F},
        {0x1F7D9, 0x1F7DF}, {0x1F7EC, 0x1F7EF}, {0x1F7F1, 0x1F7FF}, {0x1F80C, 0x1F80F},
        {0x1F848, 0x1F84F}, {0x1F85A, 0x1F85F}, {0x1F888, 0x1F88F}, {0x1F8AE, 0x1F8AF},
        {0x1F8B2, 0x1F8FF}, {0x1FA54, 0x1FA5F}, {0x1FA6E, 0x1FA6F}, {0x1FA75, 0x1FA77},
        {0x1FA7D, 0x1FA7F}, {0x1FA87, 0x1FA8F}, {0x1FAAD, 0x1FAAF}, {0x1FABB, 0x1FABF},
        {0x1FAC6, 0x1FACF}, {0x1FADA, 0x1FADF}, {0x1FAE8, 0x1FAEF}, {0x1FAF7, 0x1FAFF},
        {0x1FB93, 0x1FB93}, {0x1FBCB, 0x1FBEF}, {0x1FBFA, 0x1FFFF}, {0x2A6E0, 0x2A6FF},
        {0x2B739, 0x2B73F}, {0x2B81E, 0x2B81F}, {0x2CEA2, 0x2CEAF}, {0x2EBE1, 0x2F7FF},
        {0x2FA1E, 0x2FFFF}, {0x3134B, 0xE00FF}, {0xE01F0, 0x10FFFF},
};

static int py_isprintable(uint32_t c)
{
    size_t lo = 0, hi = sizeof(nonprintable) / sizeof(nonprintable[0]);
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (c < nonprintable[mid][0])
            hi = mid;
        else if (c > nonprintable[mid][1])
            lo = mid + 1;
        else
            return 0;
    }
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
            /* ensure_ascii escapes all outside ' '..'~', DEL included;
             * above the BMP as a surrogate pair */
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
