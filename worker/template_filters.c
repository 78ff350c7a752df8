/* template_filters.c: Jinja2's builtin filters and tests, with transformers'
 * tojson (json.dumps with ensure_ascii=False, and indent, separators and
 * sort_keys passed through) in place of Jinja's HTML-safe one.
 *
 * Each filter follows the Jinja 3.1 source's behaviour, including how it
 * treats undefined input (most convert it to "" like str() does).  Filters
 * that exist in Jinja but are unsupported here are compile errors. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "template_impl.h"

typedef int (*filter_fn)(mm_tpl_ectx *e, const mm_tpl_val *in, const mm_tpl_args *a,
                         mm_tpl_val *out);
typedef int (*test_fn)(mm_tpl_ectx *e, const mm_tpl_val *in, const mm_tpl_args *a, int *res);

static int oom(mm_tpl_ectx *e)
{
    return mm_tpl_fail(e, -ENOMEM, "out of memory");
}

#define SV(v) json_string_value((v)->u.j)
#define SN(v) json_string_length((v)->u.j)
#define BIND(what, spec)                                                \
    const mm_tpl_val *s[MM_TPL_MAX_PARAMS];                             \
    do {                                                                \
        int brc_ = mm_tpl_bind(e, what, spec, a, s);                    \
        if (brc_)                                                       \
            return brc_;                                                \
    } while (0)

static int truthy_arg(const mm_tpl_val *v) { return v && mm_tpl_truthy(v); }

/* ---- helpers ---- */

/* Jinja's make_attrgetter: "a.b.0" walks item["a"]["b"][0]. */
static int attr_get(mm_tpl_ectx *e, const mm_tpl_val *item, const mm_tpl_val *attribute,
                    mm_tpl_val *out)
{
    if (!attribute || mm_tpl_is_none(attribute)) {
        *out = mm_tpl_ref(item);
        return 0;
    }
    if (mm_tpl_is_int(attribute))
        return mm_tpl_getitem(e, item, attribute, out);
    if (!mm_tpl_is_str(attribute))
        return mm_tpl_fail(e, -EINVAL, "attribute must be a string or an integer");
    const char *p = SV(attribute), *end = p + SN(attribute);
    mm_tpl_val cur = mm_tpl_ref(item);
    while (1) {
        const char *dot = memchr(p, '.', (size_t)(end - p));
        size_t l = dot ? (size_t)(dot - p) : (size_t)(end - p);
        int digits = l > 0;
        for (size_t i = 0; i < l; i++)
            digits &= p[i] >= '0' && p[i] <= '9';
        mm_tpl_val key, next;
        if (digits) {
            long long v = 0;
            for (size_t i = 0; i < l && v < 100000000000LL; i++)
                v = v * 10 + (p[i] - '0');
            key = mm_tpl_int(v);
        } else {
            key = mm_tpl_str_n(p, l);
        }
        if (MM_TPL_OOM(key)) {
            mm_tpl_unref(&cur);
            return oom(e);
        }
        int rc = mm_tpl_getitem(e, &cur, &key, &next);
        mm_tpl_unref(&key);
        mm_tpl_unref(&cur);
        if (rc)
            return rc;
        cur = next;
        if (!dot)
            break;
        p = dot + 1;
    }
    *out = cur;
    return 0;
}

/* Jinja's ignore_case: lower-case strings, leave the rest. */
static int fold(mm_tpl_ectx *e, mm_tpl_val *v)
{
    if (!mm_tpl_is_str(v))
        return 0;
    mm_tpl_val l;
    int rc = mm_tpl_case(e, SV(v), SN(v), MM_CASE_LOWER, &l);
    if (rc)
        return rc;
    mm_tpl_unref(v);
    *v = l;
    return 0;
}

static int new_str(mm_tpl_ectx *e, const char *s, size_t n, mm_tpl_val *out)
{
    *out = mm_tpl_str_n(s, n);
    return MM_TPL_OOM(*out) ? oom(e) : 0;
}

static int buf_to_str(mm_tpl_ectx *e, mm_buf *b, mm_tpl_val *out)
{
    return new_str(e, b->data ? b->data : "", b->len, out);
}

/* Stable merge sort of idx[0..n) by keys (Python's sorted()). */
static int msort(mm_tpl_ectx *e, const mm_tpl_val *keys, size_t *idx, size_t *tmp, size_t n,
                 int reverse)
{
    if (n < 2)
        return 0;
    size_t h = n / 2;
    int rc = msort(e, keys, idx, tmp, h, reverse);
    if (!rc)
        rc = msort(e, keys, idx + h, tmp, n - h, reverse);
    if (rc)
        return rc;
    size_t i = 0, j = h, k = 0;
    while (i < h && j < n) {
        int c;
        /* take from the right only when strictly before: stability */
        if ((rc = mm_tpl_cmp(e, &keys[idx[j]], &keys[idx[i]], &c)))
            return rc;
        if (reverse ? c > 0 : c < 0)
            tmp[k++] = idx[j++];
        else
            tmp[k++] = idx[i++];
    }
    while (i < h)
        tmp[k++] = idx[i++];
    while (j < n)
        tmp[k++] = idx[j++];
    memcpy(idx, tmp, n * sizeof(*idx));
    return 0;
}

/* Items of a sequence, keyed by attribute (optionally case-folded). */
typedef struct keyed {
    json_t *items;
    mm_tpl_val *keys;
    size_t n;
} keyed;

static void keyed_free(keyed *k)
{
    for (size_t i = 0; k->keys && i < k->n; i++)
        mm_tpl_unref(&k->keys[i]);
    free(k->keys);
    json_decref(k->items);
}

static int keyed_make(mm_tpl_ectx *e, const mm_tpl_val *in, const mm_tpl_val *attribute,
                      int casefold, keyed *k)
{
    int rc;
    memset(k, 0, sizeof(*k));
    if ((rc = mm_tpl_iterate(e, in, &k->items)))
        return rc;
    size_t n = json_array_size(k->items);
    k->keys = calloc(n ? n : 1, sizeof(*k->keys));
    if (!k->keys)
        return oom(e);
    for (size_t i = 0; i < n; i++) {
        mm_tpl_val it = mm_tpl_jv(json_incref(json_array_get(k->items, i)));
        rc = attr_get(e, &it, attribute, &k->keys[i]);
        mm_tpl_unref(&it);
        k->n = i + 1;
        if (!rc && casefold)
            rc = fold(e, &k->keys[i]);
        if (rc)
            return rc;
    }
    return 0;
}

/* Jinja's generator filters run nothing until iterated.  map and select
 * start with `if value:`, so a falsy input is an empty generator; any other
 * non-iterable fails when the result is used.  1: *out is that generator. */
static int lazy_input(mm_tpl_ectx *e, const mm_tpl_val *in, int falsy_empty, const char *err_fmt,
                      mm_tpl_val *out, int *rc)
{
    int iterable = in->kind == MM_TV_UNDEF || in->kind == MM_TV_ITER || in->kind == MM_TV_LOOP ||
                   mm_tpl_is_str(in) || mm_tpl_is_list(in) || mm_tpl_is_dict(in);
    int empty = falsy_empty && !mm_tpl_truthy(in);
    const mm_tpl_iter *src = in->kind == MM_TV_ITER ? in->u.it : NULL;
    if (iterable && !empty && !(src && src->err_fmt))
        return 0;
    if (src && src->err_fmt) {
        /* a generator over a failing generator fails the same way, later */
        json_t *none = json_array();
        *rc = none ? mm_tpl_iter_new(e, none, "generator", out) : oom(e);
        if (!*rc) {
            out->u.it->err_fmt = src->err_fmt;
            out->u.it->err_arg = src->err_arg;
        }
        return 1;
    }
    json_t *items = json_array();
    *rc = items ? mm_tpl_iter_new(e, items, "generator", out) : oom(e);
    if (!*rc && !empty) {
        out->u.it->err_fmt = err_fmt ? err_fmt : "'%s' object is not iterable";
        out->u.it->err_arg = mm_tpl_typename(in);
    }
    return 1;
}

/* ---- filters ---- */
static int f_abs(mm_tpl_ectx *e, const mm_tpl_val *in, const mm_tpl_args *a, mm_tpl_val *out)
{
    BIND("abs", "");
    (void)s;
    if (in->kind == MM_TV_UNDEF)
        return mm_tpl_undef_error(e, in);
    if (!mm_tpl_is_num(in))
        return mm_tpl_fail(e, -EINVAL, "bad operand type for abs(): '%s'", mm_tpl_typename(in));
    if (mm_tpl_is_int(in) || mm_tpl_is_bool(in)) {
        long long v = mm_tpl_intval(in);
        if (v == INT64_MIN)
            return mm_tpl_fail(e, -ENOTSUP, "integer arithmetic beyond 64 bits");
        *out = mm_tpl_int(v < 0 ? -v : v);
    } else {
        return mm_tpl_real(e, fabs(mm_tpl_num(in)), out);
    }
    return MM_TPL_OOM(*out) ? oom(e) : 0;
}

static int f_attr(mm_tpl_ectx *e, const mm_tpl_val *in, const mm_tpl_args *a, mm_tpl_val *out)
{
    BIND("attr", "name");
    if (!s[0] || !mm_tpl_is_str(s[0]))
        return mm_tpl_fail(e, -EINVAL, "attr: the name must be a string");
    /* getattr only: a dict's keys are not attributes */
    if (mm_tpl_is_dict(in)) {
        int rc = mm_tpl_method_lookup(in, SV(s[0]), out);
        if (rc == 0)
            return 0;
        if (rc == -ENOMEM)
            return oom(e);
        *out = mm_tpl_undef(SV(s[0]), "dict");
        return 0;
    }
    return mm_tpl_getattr(e, in, SV(s[0]), out);
}

static int case_filter(mm_tpl_ectx *e, const mm_tpl_val *in, const mm_tpl_args *a, int how,
                       mm_tpl_val *out)
{
    BIND("filter", "");
    (void)s;
    mm_tpl_val sv;
    int rc = mm_tpl_to_strval(e, in, &sv);
    if (rc)
        return rc;
    rc = mm_tpl_case(e, SV(&sv), SN(&sv), how, out);
    mm_tpl_unref(&sv);
    return rc;
}

static int f_lower(mm_tpl_ectx *e, const mm_tpl_val *in, const mm_tpl_args *a, mm_tpl_val *out)
{
    return case_filter(e, in, a, MM_CASE_LOWER, out);
}
static int f_upper(mm_tpl_ectx *e, const mm_tpl_val *in, const mm_tpl_args *a, mm_tpl_val *out)
{
    return case_filter(e, in, a, MM_CASE_UPPER, out);
}
static int f_capitalize(mm_tpl_ectx *e, const mm_tpl_val *in, const mm_tpl_args *a,
                        mm_tpl_val *out)
{
    return case_filter(e, in, a, MM_CASE_CAPITALIZE, out);
}
static int f_title(mm_tpl_ectx *e, const mm_tpl_val *in, const mm_tpl_args *a, mm_tpl_val *out)
{
    return case_filter(e, in, a, MM_CASE_JTITLE, out);
}

static int f_length(mm_tpl_ectx *e, const mm_tpl_val *in, const mm_tpl_args *a, mm_tpl_val *out)
{
    BIND("length", "");
    (void)s;
    long long n;
    if (in->kind == MM_TV_UNDEF)
        n = 0;
    else if (in->kind == MM_TV_LOOP)
        n = (long long)json_array_size(in->u.loop->items);
    else if (mm_tpl_is_str(in))
        n = (long long)mm_tpl_u8_len(SV(in), SN(in));
    else if (mm_tpl_is_list(in))
        n = (long long)json_array_size(in->u.j);
    else if (in->kind == MM_TV_ITER)
        return mm_tpl_fail(e, -EINVAL, "object of type '%s' has no len()", mm_tpl_typename(in));
    else if (mm_tpl_is_dict(in))
        n = (long long)json_object_size(in->u.j);
    else
        return mm_tpl_fail(e, -EINVAL, "object of type '%s' has no len()", mm_tpl_typename(in));
    *out = mm_tpl_int(n);
    return MM_TPL_OOM(*out) ? oom(e) : 0;
}

static int f_default(mm_tpl_ectx *e, const mm_tpl_val *in, const mm_tpl_args *a,
                     mm_tpl_val *out)
{
    BIND("default", "default_value,boolean");
    if (in->kind == MM_TV_UNDEF || (truthy_arg(s[1]) && !mm_tpl_truthy(in))) {
        if (s[0])
            *out = mm_tpl_ref(s[0]);
        else
            return new_str(e, "", 0, out);
        return 0;
    }
    *out = mm_tpl_ref(in);
    return 0;
}

static int f_dictsort(mm_tpl_ectx *e, const mm_tpl_val *in, const mm_tpl_args *a,
                      mm_tpl_val *out)
{
    BIND("dictsort", "case_sensitive,by,reverse");
    int pos = 0, rc;
    if (!mm_tpl_is_dict(in))
        return mm_tpl_fail(e, -EINVAL, "dictsort: expected a mapping, got %s",
                           mm_tpl_typename(in));
    if (s[1]) {
        if (mm_tpl_is_str(s[1]) && !strcmp(SV(s[1]), "value"))
            pos = 1;
        else if (!mm_tpl_is_str(s[1]) || strcmp(SV(s[1]), "key"))
            return mm_tpl_fail(e, -EINVAL, "You can only sort by either \"key\" or \"value\"");
    }
    mm_tpl_val items;
    if ((rc = mm_tpl_dict_items(e, in->u.j, &items)))
        return rc;
    mm_tpl_val idx = mm_tpl_int(pos);
    keyed k;
    size_t *order = NULL, *tmp = NULL;
    rc = keyed_make(e, &items, &idx, !truthy_arg(s[0]), &k);
    size_t n = k.n;
    if (!rc) {
        order = malloc((n + 1) * sizeof(*order));
        tmp = malloc((n + 1) * sizeof(*tmp));
        if (!order || !tmp)
            rc = oom(e);
    }
    if (!rc) {
        for (size_t i = 0; i < n; i++)
            order[i] = i;
        rc = msort(e, k.keys, order, tmp, n, truthy_arg(s[2]));
    }
    json_t *r = rc ? NULL : json_array();
    if (!rc && !r)
        rc = oom(e);
    for (size_t i = 0; !rc && i < n; i++)
        if (json_array_append(r, json_array_get(k.items, order[i])))
            rc = oom(e);
    if (!rc)
        *out = mm_tpl_jv(r);
    else
        json_decref(r);
    free(order);
    free(tmp);
    keyed_free(&k);
    mm_tpl_unref(&idx);
    mm_tpl_unref(&items);
    return rc;
}

static int f_escape(mm_tpl_ectx *e, const mm_tpl_val *in, const mm_tpl_args *a, mm_tpl_val *out)
{
    BIND("escape", "");
    (void)s;
    mm_tpl_val sv;
    int rc = mm_tpl_to_strval(e, in, &sv);
    if (rc)
        return rc;
    mm_buf b;
    mm_buf_init(&b, MM_TPL_MAX_OUTPUT);
    for (size_t i = 0; i < SN(&sv) && !rc; i++) {
        char c = SV(&sv)[i];
        const char *r = c == '&' ? "&amp;" : c == '<' ? "&lt;" : c == '>' ? "&gt;"
                      : c == '"' ? "&#34;" : c == '\'' ? "&#39;" : NULL;
        rc = r ? mm_buf_append_str(&b, r) : mm_buf_append(&b, &c, 1);
        if (rc)
            rc = mm_tpl_fail(e, rc, "escape: value too large");
    }
    if (!rc)
        rc = buf_to_str(e, &b, out);
    mm_buf_free(&b);
    mm_tpl_unref(&sv);
    return rc;
}

static int f_first_last(mm_tpl_ectx *e, const mm_tpl_val *in, const mm_tpl_args *a, int last,
                        mm_tpl_val *out)
{
    BIND(last ? "last" : "first", "");
    (void)s;
    json_t *items;
    int rc;
    if (in->kind == MM_TV_ITER) {
        mm_tpl_iter *it = in->u.it;
        if (last)
            return mm_tpl_fail(e, -EINVAL, "'%s' object is not reversible", it->pyname);
        if (it->err_fmt)
            return mm_tpl_fail(e, -EINVAL, it->err_fmt, it->err_arg ? it->err_arg : "");
        if (it->pos < json_array_size(it->items)) {
            /* next(iter(x)) takes one item */
            *out = mm_tpl_jv(json_incref(json_array_get(it->items, it->pos++)));
        } else {
            *out = mm_tpl_undef(NULL, NULL);
            out->uhint = "No first item, sequence was empty.";
        }
        return 0;
    }
    rc = mm_tpl_iterate(e, in, &items);
    if (rc)
        return rc;
    size_t n = json_array_size(items);
    if (n == 0) {
        *out = mm_tpl_undef(NULL, NULL);
        out->uhint = last ? "No last item, sequence was empty." : "No first item, sequence was empty.";
    } else {
        *out = mm_tpl_jv(json_incref(json_array_get(items, last ? n - 1 : 0)));
    }
    json_decref(items);
    return 0;
}

static int f_first(mm_tpl_ectx *e, const mm_tpl_val *in, const mm_tpl_args *a, mm_tpl_val *out)
{
    return f_first_last(e, in, a, 0, out);
}
static int f_last(mm_tpl_ectx *e, const mm_tpl_val *in, const mm_tpl_args *a, mm_tpl_val *out)
{
    return f_first_last(e, in, a, 1, out);
}

/* Python's float(str): whitespace around, underscores between digits. */
static int parse_pyfloat(const char *s, size_t n, double *out)
{
    char buf[128];
    size_t a = 0, b = n, k = 0;
    while (a < b && mm_tpl_py_isspace((unsigned char)s[a]))
        a++;
    while (b > a && mm_tpl_py_isspace((unsigned char)s[b - 1]))
        b--;
    if (a == b || b - a >= sizeof(buf))
        return -1;
    for (size_t i = a; i < b; i++) {
        if (s[i] == '_') {
            if (i == a || i + 1 == b || !(s[i - 1] >= '0' && s[i - 1] <= '9') ||
                !(s[i + 1] >= '0' && s[i + 1] <= '9'))
                return -1;
            continue;
        }
        if (s[i] == 'x' || s[i] == 'X' || s[i] == '(')
            return -1;   /* strtod reads hex floats and nan(...); Python does not */
        buf[k++] = s[i];
    }
    buf[k] = '\0';
    char *end;
    *out = strtod(buf, &end);
    return *end ? -1 : 0;
}

/* Python's int(str, base) for bases 2..36 (and 0). */
static int parse_pyint(const char *s, size_t n, long long base, long long *out)
{
    char buf[128];
    size_t a = 0, b = n, k = 0;
    while (a < b && mm_tpl_py_isspace((unsigned char)s[a]))
        a++;
    while (b > a && mm_tpl_py_isspace((unsigned char)s[b - 1]))
        b--;
    if (a == b || b - a >= sizeof(buf) || base == 1 || base < 0 || base > 36)
        return -1;
    if (s[a] == '+' || s[a] == '-')
        buf[k++] = s[a++];
    if (b - a >= 2 && s[a] == '0') {
        char p = (char)(s[a + 1] | 32);
        int pb = p == 'x' ? 16 : p == 'o' ? 8 : p == 'b' ? 2 : 0;
        if (pb && (base == 0 || base == pb)) {
            base = pb;
            a += 2;
            if (a < b && s[a] == '_')
                a++;
        }
    }
    if (base == 0)
        base = 10;
    if (a == b)
        return -1;
    for (size_t i = a; i < b; i++) {
        if (s[i] == '_' && i > a && i + 1 < b && s[i + 1] != '_')
            continue;
        int d = s[i] >= '0' && s[i] <= '9' ? s[i] - '0'
              : (s[i] | 32) >= 'a' && (s[i] | 32) <= 'z' ? (s[i] | 32) - 'a' + 10 : 99;
        if (d >= base)
            return -1;
        buf[k++] = s[i];
    }
    buf[k] = '\0';
    errno = 0;
    char *end;
    *out = strtoll(buf, &end, (int)base);
    if (errno || *end)
        return errno == ERANGE ? -2 : -1;
    return 0;
}

static int f_float(mm_tpl_ectx *e, const mm_tpl_val *in, const mm_tpl_args *a, mm_tpl_val *out)
{
    BIND("float", "default");
    double d;
    if (in->kind == MM_TV_UNDEF)
        return mm_tpl_undef_error(e, in);
    if (mm_tpl_is_num(in))
        d = mm_tpl_num(in);
    else if (!mm_tpl_is_str(in) || parse_pyfloat(SV(in), SN(in), &d)) {
        if (s[0]) {
            *out = mm_tpl_ref(s[0]);
            return 0;
        }
        return mm_tpl_real(e, 0.0, out);
    }
    return mm_tpl_real(e, d, out);
}

static int f_int(mm_tpl_ectx *e, const mm_tpl_val *in, const mm_tpl_args *a, mm_tpl_val *out)
{
    BIND("int", "default,base");
    long long base = 10, v;
    double d;
    if (s[1]) {
        if (!mm_tpl_is_int(s[1]))
            return mm_tpl_fail(e, -EINVAL, "int: base must be an integer");
        base = json_integer_value(s[1]->u.j);
    }
    if (in->kind == MM_TV_UNDEF)
        return mm_tpl_undef_error(e, in);
    if (mm_tpl_is_int(in) || mm_tpl_is_bool(in)) {
        v = mm_tpl_intval(in);
        goto done;
    }
    if (json_is_real(in->u.j)) {
        d = json_real_value(in->u.j);
        goto from_float;
    }
    if (mm_tpl_is_str(in)) {
        int r = parse_pyint(SV(in), SN(in), base, &v);
        if (r == 0)
            goto done;
        if (r == -2)
            return mm_tpl_fail(e, -ENOTSUP, "integer arithmetic beyond 64 bits");
        if (parse_pyfloat(SV(in), SN(in), &d) == 0)
            goto from_float;
    }
    if (s[0])
        *out = mm_tpl_ref(s[0]);
    else
        *out = mm_tpl_int(0);
    return MM_TPL_OOM(*out) ? oom(e) : 0;
from_float:
    if (!isfinite(d)) {
        *out = s[0] ? mm_tpl_ref(s[0]) : mm_tpl_int(0);
        return MM_TPL_OOM(*out) ? oom(e) : 0;
    }
    if (d >= 9.2e18 || d <= -9.2e18)
        return mm_tpl_fail(e, -ENOTSUP, "integer arithmetic beyond 64 bits");
    v = (long long)trunc(d);
done:
    *out = mm_tpl_int(v);
    return MM_TPL_OOM(*out) ? oom(e) : 0;
}

static int f_indent(mm_tpl_ectx *e, const mm_tpl_val *in, const mm_tpl_args *a,
                    mm_tpl_val *out)
{
    BIND("indent", "width,first,blank");
    char spaces[256];
    const char *ind = spaces;
    size_t il = 4;
    int rc;
    if (s[0] && mm_tpl_is_str(s[0])) {
        ind = SV(s[0]);
        il = SN(s[0]);
    } else if (s[0]) {
        long long w;
        if (!mm_tpl_is_int(s[0]))
            return mm_tpl_fail(e, -EINVAL, "indent: width must be an integer or a string");
        w = json_integer_value(s[0]->u.j);
        if (w > (long long)sizeof(spaces))
            return mm_tpl_fail(e, -ENOTSUP, "indent wider than %zu", sizeof(spaces));
        il = w < 0 ? 0 : (size_t)w;
    }
    memset(spaces, ' ', sizeof(spaces));
    mm_tpl_val sv, lines = {0};
    /* Jinja does s += "\n" on the value itself: only a string works */
    if (in->kind == MM_TV_UNDEF)
        return mm_tpl_undef_error(e, in);
    if (!mm_tpl_is_str(in))
        return mm_tpl_fail(e, -EINVAL, "indent: unsupported operand type(s) for +=: '%s' and 'str'",
                           mm_tpl_typename(in));
    sv = mm_tpl_ref(in);
    /* Jinja appends "\n" then splits lines, so a final newline is dropped */
    mm_buf t, b;
    mm_buf_init(&t, MM_TPL_MAX_OUTPUT);
    mm_buf_init(&b, MM_TPL_MAX_OUTPUT);
    if (mm_buf_append(&t, SV(&sv), SN(&sv)) || mm_buf_append(&t, "\n", 1)) {
        rc = mm_tpl_fail(e, -E2BIG, "indent: value too large");
        goto out;
    }
    if ((rc = mm_tpl_splitlines(e, t.data, t.len, 0, &lines)))
        goto out;
    size_t n = json_array_size(lines.u.j);
    int blank = truthy_arg(s[2]);
    if (truthy_arg(s[1]))
        rc = mm_buf_append(&b, ind, il);
    for (size_t i = 0; i < n && !rc; i++) {
        json_t *ln = json_array_get(lines.u.j, i);
        if (i) {
            rc = mm_buf_append(&b, "\n", 1);
            if (!rc && (blank || json_string_length(ln) > 0))
                rc = mm_buf_append(&b, ind, il);
        }
        if (!rc)
            rc = mm_buf_append(&b, json_string_value(ln), json_string_length(ln));
    }
    if (rc)
        rc = mm_tpl_fail(e, -E2BIG, "indent: value too large");
    else
        rc = buf_to_str(e, &b, out);
out:
    mm_tpl_unref(&lines);
    mm_tpl_unref(&sv);
    mm_buf_free(&t);
    mm_buf_free(&b);
    return rc;
}

static int f_items(mm_tpl_ectx *e, const mm_tpl_val *in, const mm_tpl_args *a, mm_tpl_val *out)
{
    BIND("items", "");
    (void)s;
    mm_tpl_val l;
    int rc;
    if (in->kind == MM_TV_UNDEF) {
        json_t *empty = json_array();
        return empty ? mm_tpl_iter_new(e, empty, "generator", out) : oom(e);
    }
    if (!mm_tpl_is_dict(in)) {
        json_t *empty = json_array();
        if (!empty)
            return oom(e);
        if ((rc = mm_tpl_iter_new(e, empty, "generator", out)))
            return rc;
        out->u.it->err_fmt = "Can only get item pairs from a mapping.%s";
        return 0;
    }
    if ((rc = mm_tpl_dict_items(e, in->u.j, &l)))
        return rc;
    return mm_tpl_iter_new(e, l.u.j, "generator", out);
}

static int f_join(mm_tpl_ectx *e, const mm_tpl_val *in, const mm_tpl_args *a, mm_tpl_val *out)
{
    BIND("join", "d,attribute");
    json_t *items;
    int rc = mm_tpl_iterate(e, in, &items);
    mm_tpl_val sep = {0};
    if (rc)
        return rc;
    if (s[0])
        rc = mm_tpl_to_strval(e, s[0], &sep);
    else
        rc = new_str(e, "", 0, &sep);
    mm_buf b;
    mm_buf_init(&b, MM_TPL_MAX_OUTPUT);
    for (size_t i = 0; !rc && i < json_array_size(items); i++) {
        mm_tpl_val it = mm_tpl_jv(json_incref(json_array_get(items, i))), v;
        rc = attr_get(e, &it, s[1], &v);
        mm_tpl_unref(&it);
        if (rc)
            break;
        if (i && mm_buf_append(&b, SV(&sep), SN(&sep)))
            rc = mm_tpl_fail(e, -E2BIG, "join: value too large");
        if (!rc)
            rc = mm_tpl_str(e, &v, &b);
        mm_tpl_unref(&v);
    }
    if (!rc)
        rc = buf_to_str(e, &b, out);
    mm_buf_free(&b);
    mm_tpl_unref(&sep);
    json_decref(items);
    return rc;
}

static int f_list(mm_tpl_ectx *e, const mm_tpl_val *in, const mm_tpl_args *a, mm_tpl_val *out)
{
    BIND("list", "");
    (void)s;
    json_t *items, *copy;
    int rc = mm_tpl_iterate(e, in, &items);
    if (rc)
        return rc;
    /* a new plain list, never the tuple or view it came from */
    copy = json_array();
    if (!copy || json_array_extend(copy, items)) {
        json_decref(copy);
        json_decref(items);
        return oom(e);
    }
    json_decref(items);
    *out = mm_tpl_jv(copy);
    return 0;
}

/* map(attribute=..., default=...) or map('filter', args...) */
static int f_map(mm_tpl_ectx *e, const mm_tpl_val *in, const mm_tpl_args *a, mm_tpl_val *out)
{
    json_t *items, *r = NULL;
    const mm_tpl_val *attribute = NULL, *dflt = NULL;
    const char *fname = NULL;
    mm_tpl_args rest = {0};
    int rc;
    if (a->npos == 0) {
        for (size_t k = 0; k < a->nkw; k++) {
            if (!strcmp(a->kwn[k], "attribute"))
                attribute = &a->kwv[k];
            else if (!strcmp(a->kwn[k], "default"))
                dflt = &a->kwv[k];
            else
                return mm_tpl_fail(e, -EINVAL, "Unexpected keyword argument '%s'", a->kwn[k]);
        }
        if (!attribute)
            return mm_tpl_fail(e, -EINVAL, "map requires a filter argument");
    } else {
        if (!mm_tpl_is_str(&a->pos[0]))
            return mm_tpl_fail(e, -EINVAL, "map: the filter name must be a string");
        fname = SV(&a->pos[0]);
        if (!mm_tpl_has_filter(fname))
            return mm_tpl_fail(e, mm_tpl_known_filter(fname) ? -ENOTSUP : -EINVAL,
                               "no filter named '%s'", fname);
        rest.npos = a->npos - 1;
        rest.pos = a->pos + 1;
        rest.nkw = a->nkw;
        rest.kwn = a->kwn;
        rest.kwv = a->kwv;
    }
    if (lazy_input(e, in, 1, NULL, out, &rc))
        return rc;
    if ((rc = mm_tpl_iterate(e, in, &items)))
        return rc;
    r = json_array();
    if (!r)
        rc = oom(e);
    for (size_t i = 0; !rc && i < json_array_size(items); i++) {
        mm_tpl_val it = mm_tpl_jv(json_incref(json_array_get(items, i))), v = {0};
        json_t *j;
        if (fname)
            rc = mm_tpl_filter(e, fname, &it, &rest, &v);
        else {
            rc = attr_get(e, &it, attribute, &v);
            if (!rc && v.kind == MM_TV_UNDEF && dflt && !mm_tpl_is_none(dflt)) {
                mm_tpl_unref(&v);
                v = mm_tpl_ref(dflt);
            }
        }
        if (!rc && !(rc = mm_tpl_to_json(e, &v, &j)) && json_array_append_new(r, j))
            rc = oom(e);
        mm_tpl_unref(&it);
        mm_tpl_unref(&v);
    }
    json_decref(items);
    if (rc) {
        json_decref(r);
        return rc;
    }
    return mm_tpl_iter_new(e, r, "generator", out);
}

static int minmax(mm_tpl_ectx *e, const mm_tpl_val *in, const mm_tpl_args *a, int want_max,
                  mm_tpl_val *out)
{
    BIND(want_max ? "max" : "min", "case_sensitive,attribute");
    keyed k;
    int rc = keyed_make(e, in, s[1], !truthy_arg(s[0]), &k);
    if (!rc && k.n == 0) {
        *out = mm_tpl_undef(NULL, NULL);
        out->uhint = "No aggregated item, sequence was empty.";
    } else if (!rc) {
        size_t best = 0;
        for (size_t i = 1; i < k.n && !rc; i++) {
            int c;
            rc = mm_tpl_cmp(e, &k.keys[i], &k.keys[best], &c);
            if (want_max ? c > 0 : c < 0)
                best = i;
        }
        if (!rc)
            *out = mm_tpl_jv(json_incref(json_array_get(k.items, best)));
    }
    keyed_free(&k);
    return rc;
}

static int f_max(mm_tpl_ectx *e, const mm_tpl_val *in, const mm_tpl_args *a, mm_tpl_val *out)
{
    return minmax(e, in, a, 1, out);
}
static int f_min(mm_tpl_ectx *e, const mm_tpl_val *in, const mm_tpl_args *a, mm_tpl_val *out)
{
    return minmax(e, in, a, 0, out);
}

/* select / reject / selectattr / rejectattr */
static int select_common(mm_tpl_ectx *e, const mm_tpl_val *in, const mm_tpl_args *a,
                         int by_attr, int keep_when, mm_tpl_val *out)
{
    const mm_tpl_val *attribute = NULL;
    const char *test = NULL;
    mm_tpl_args rest = *a;
    int rc;
    if (by_attr) {
        if (rest.npos < 1)
            return mm_tpl_fail(e, -EINVAL, "Missing parameter for attribute name");
        attribute = &rest.pos[0];
        rest.pos++;
        rest.npos--;
    }
    if (rest.npos >= 1) {
        if (!mm_tpl_is_str(&rest.pos[0]))
            return mm_tpl_fail(e, -EINVAL, "the test name must be a string");
        test = SV(&rest.pos[0]);
        if (!mm_tpl_has_test(test))
            return mm_tpl_fail(e, mm_tpl_known_test(test) ? -ENOTSUP : -EINVAL,
                               "no test named '%s'", test);
        rest.pos++;
        rest.npos--;
    }
    json_t *items, *r;
    if (lazy_input(e, in, 1, NULL, out, &rc))
        return rc;
    if ((rc = mm_tpl_iterate(e, in, &items)))
        return rc;
    r = json_array();
    if (!r)
        rc = oom(e);
    for (size_t i = 0; !rc && i < json_array_size(items); i++) {
        json_t *x = json_array_get(items, i);
        mm_tpl_val it = mm_tpl_jv(json_incref(x)), v;
        int res = 0;
        rc = attr_get(e, &it, attribute, &v);
        if (!rc) {
            if (test)
                rc = mm_tpl_test(e, test, &v, &rest, &res);
            else
                res = mm_tpl_truthy(&v);
            mm_tpl_unref(&v);
        }
        if (!rc && (!!res == keep_when) && json_array_append(r, x))
            rc = oom(e);
        mm_tpl_unref(&it);
    }
    json_decref(items);
    if (rc) {
        json_decref(r);
        return rc;
    }
    return mm_tpl_iter_new(e, r, "generator", out);
}

static int f_select(mm_tpl_ectx *e, const mm_tpl_val *in, const mm_tpl_args *a, mm_tpl_val *out)
{
    return select_common(e, in, a, 0, 1, out);
}
static int f_reject(mm_tpl_ectx *e, const mm_tpl_val *in, const mm_tpl_args *a, mm_tpl_val *out)
{
    return select_common(e, in, a, 0, 0, out);
}
static int f_selectattr(mm_tpl_ectx *e, const mm_tpl_val *in, const mm_tpl_args *a,
                        mm_tpl_val *out)
{
    return select_common(e, in, a, 1, 1, out);
}
static int f_rejectattr(mm_tpl_ectx *e, const mm_tpl_val *in, const mm_tpl_args *a,
                        mm_tpl_val *out)
{
    return select_common(e, in, a, 1, 0, out);
}

static int f_replace(mm_tpl_ectx *e, const mm_tpl_val *in, const mm_tpl_args *a,
                     mm_tpl_val *out)
{
    BIND("replace", "old,new,count");
    mm_tpl_val sv = {0}, ov = {0}, nv = {0};
    long long count = -1;
    int rc;
    if (!s[0] || !s[1])
        return mm_tpl_fail(e, -EINVAL, "replace needs old and new");
    if (s[2] && !mm_tpl_is_none(s[2])) {
        if (!mm_tpl_is_int(s[2]))
            return mm_tpl_fail(e, -EINVAL, "replace: count must be an integer");
        count = json_integer_value(s[2]->u.j);
    }
    if (!(rc = mm_tpl_to_strval(e, in, &sv)) && !(rc = mm_tpl_to_strval(e, s[0], &ov)) &&
        !(rc = mm_tpl_to_strval(e, s[1], &nv)))
        rc = mm_tpl_replace(e, SV(&sv), SN(&sv), SV(&ov), SN(&ov), SV(&nv), SN(&nv), count, out);
    mm_tpl_unref(&sv);
    mm_tpl_unref(&ov);
    mm_tpl_unref(&nv);
    return rc;
}

/* Jinja: a string reversed; else reversed(value), an iterator; else (a
 * generator) list(value) reversed. */
static int f_reverse(mm_tpl_ectx *e, const mm_tpl_val *in, const mm_tpl_args *a,
                     mm_tpl_val *out)
{
    BIND("reverse", "");
    (void)s;
    json_t *items;
    int rc;
    if (in->kind != MM_TV_JSON && in->kind != MM_TV_UNDEF && in->kind != MM_TV_ITER)
        return mm_tpl_fail(e, -EINVAL, "argument must be iterable");
    if (in->kind == MM_TV_JSON && !json_is_string(in->u.j) && !json_is_array(in->u.j) &&
        !json_is_object(in->u.j))
        return mm_tpl_fail(e, -EINVAL, "argument must be iterable");
    if ((rc = mm_tpl_iterate(e, in, &items)))
        return rc;
    if (mm_tpl_is_str(in)) {
        mm_buf b;
        mm_buf_init(&b, MM_TPL_MAX_OUTPUT);
        for (size_t i = json_array_size(items); !rc && i-- > 0;) {
            json_t *c = json_array_get(items, i);
            rc = mm_buf_append(&b, json_string_value(c), json_string_length(c)) ? oom(e) : 0;
        }
        if (!rc)
            rc = buf_to_str(e, &b, out);
        mm_buf_free(&b);
        json_decref(items);
        return rc;
    }
    json_t *r = json_array();
    for (size_t i = json_array_size(items); r && i-- > 0;)
        if (json_array_append(r, json_array_get(items, i))) {
            json_decref(r);
            r = NULL;
        }
    json_decref(items);
    if (!r)
        return oom(e);
    if (in->kind == MM_TV_ITER) {
        *out = mm_tpl_jv(r);
        return 0;
    }
    return mm_tpl_iter_new(e, r, mm_tpl_is_dict(in) ? "dict_reversekeyiterator"
                                                     : "list_reverseiterator", out);
}

static int f_round(mm_tpl_ectx *e, const mm_tpl_val *in, const mm_tpl_args *a, mm_tpl_val *out)
{
    BIND("round", "precision,method");
    long long prec = 0;
    const char *method = "common";
    if (s[0]) {
        if (!(mm_tpl_is_int(s[0]) || mm_tpl_is_bool(s[0])))
            return mm_tpl_fail(e, -EINVAL, "round: precision must be an integer");
        prec = mm_tpl_intval(s[0]);
    }
    if (s[1]) {
        if (!mm_tpl_is_str(s[1]))
            return mm_tpl_fail(e, -EINVAL, "method must be common, ceil or floor");
        method = SV(s[1]);
    }
    if (strcmp(method, "common") && strcmp(method, "ceil") && strcmp(method, "floor"))
        return mm_tpl_fail(e, -EINVAL, "method must be common, ceil or floor");
    if (in->kind == MM_TV_UNDEF)
        return mm_tpl_undef_error(e, in);
    if (!mm_tpl_is_num(in))
        return mm_tpl_fail(e, -EINVAL, "type %s doesn't define __round__ method",
                           mm_tpl_typename(in));
    if (prec < 0 || prec > 300)
        return mm_tpl_fail(e, -ENOTSUP, "round() with precision %lld", prec);
    double x = mm_tpl_num(in), r;
    if (!strcmp(method, "common")) {
        if (mm_tpl_is_int(in) || mm_tpl_is_bool(in)) {
            *out = mm_tpl_int((long long)x);   /* round(int, n) stays an int */
            return MM_TPL_OOM(*out) ? oom(e) : 0;
        }
        /* Python rounds the exact binary value half-to-even, as printf does */
        char buf[400];
        snprintf(buf, sizeof(buf), "%.*f", (int)prec, x);
        r = strtod(buf, NULL);
    } else {
        double p = pow(10.0, (double)prec);
        r = (method[0] == 'c' ? ceil(x * p) : floor(x * p)) / p;
    }
    return mm_tpl_real(e, r, out);
}

static int f_string(mm_tpl_ectx *e, const mm_tpl_val *in, const mm_tpl_args *a,
                    mm_tpl_val *out)
{
    BIND("string", "");
    (void)s;
    return mm_tpl_to_strval(e, in, out);
}

static int f_sort(mm_tpl_ectx *e, const mm_tpl_val *in, const mm_tpl_args *a, mm_tpl_val *out)
{
    BIND("sort", "reverse,case_sensitive,attribute");
    keyed k;
    /* sorted(reverse=...) wants an int */
    if (s[0] && s[0]->kind == MM_TV_UNDEF)
        return mm_tpl_undef_error(e, s[0]);
    if (s[0] && !mm_tpl_is_num(s[0]))
        return mm_tpl_fail(e, -EINVAL, "'%s' object cannot be interpreted as an integer",
                           mm_tpl_typename(s[0]));
    size_t *order = NULL, *tmp = NULL;
    int rc = keyed_make(e, in, s[2], !truthy_arg(s[1]), &k);
    if (!rc) {
        order = malloc((k.n + 1) * sizeof(*order));
        tmp = malloc((k.n + 1) * sizeof(*tmp));
        if (!order || !tmp)
            rc = oom(e);
    }
    if (!rc) {
        for (size_t i = 0; i < k.n; i++)
            order[i] = i;
        rc = msort(e, k.keys, order, tmp, k.n, truthy_arg(s[0]));
    }
    json_t *r = rc ? NULL : json_array();
    if (!rc && !r)
        rc = oom(e);
    for (size_t i = 0; !rc && i < k.n; i++)
        if (json_array_append(r, json_array_get(k.items, order[i])))
            rc = oom(e);
    if (!rc)
        *out = mm_tpl_jv(r);
    else
        json_decref(r);
    free(order);
    free(tmp);
    keyed_free(&k);
    return rc;
}

static int f_sum(mm_tpl_ectx *e, const mm_tpl_val *in, const mm_tpl_args *a, mm_tpl_val *out)
{
    BIND("sum", "attribute,start");
    keyed k;
    long long isum = 0;
    double fsum = 0;
    int is_float = 0;
    if (s[1]) {
        if (!mm_tpl_is_num(s[1]))
            return mm_tpl_fail(e, -ENOTSUP, "sum() with a non-numeric start");
        if (json_is_real(s[1]->u.j)) {
            is_float = 1;
            fsum = mm_tpl_num(s[1]);
        } else {
            isum = mm_tpl_intval(s[1]);
        }
    }
    int rc = keyed_make(e, in, s[0], 0, &k);
    for (size_t i = 0; !rc && i < k.n; i++) {
        const mm_tpl_val *v = &k.keys[i];
        if (v->kind == MM_TV_UNDEF) {
            rc = mm_tpl_undef_error(e, v);
            break;
        }
        if (!mm_tpl_is_num(v)) {
            rc = mm_tpl_fail(e, -EINVAL, "unsupported operand type(s) for +: '%s' and '%s'",
                             is_float ? "float" : "int", mm_tpl_typename(v));
            break;
        }
        if (!is_float && json_is_real(v->u.j)) {
            is_float = 1;
            fsum = (double)isum;
        }
        if (is_float)
            fsum += mm_tpl_num(v);
        else if (__builtin_add_overflow(isum, mm_tpl_intval(v), &isum))
            rc = mm_tpl_fail(e, -ENOTSUP, "integer arithmetic beyond 64 bits");
    }
    keyed_free(&k);
    if (rc)
        return rc;
    if (is_float)
        return mm_tpl_real(e, fsum, out);
    *out = mm_tpl_int(isum);
    return MM_TPL_OOM(*out) ? oom(e) : 0;
}

/* transformers: json.dumps(x, ensure_ascii=False, indent=None,
 * separators=None, sort_keys=False) */
static int f_tojson(mm_tpl_ectx *e, const mm_tpl_val *in, const mm_tpl_args *a,
                    mm_tpl_val *out)
{
    BIND("tojson", "ensure_ascii,indent,separators,sort_keys");
    mm_tpl_jsonopt o = {0};
    char spaces[64];
    o.ensure_ascii = truthy_arg(s[0]);
    o.sort_keys = truthy_arg(s[3]);
    if (s[1] && !mm_tpl_is_none(s[1])) {
        o.indent_set = 1;
        if (mm_tpl_is_str(s[1])) {
            o.indent = SV(s[1]);
            o.indent_len = SN(s[1]);
        } else if (mm_tpl_is_int(s[1])) {
            long long w = json_integer_value(s[1]->u.j);
            if (w > (long long)sizeof(spaces))
                return mm_tpl_fail(e, -ENOTSUP, "tojson indent over %zu", sizeof(spaces));
            memset(spaces, ' ', sizeof(spaces));
            o.indent = spaces;
            o.indent_len = w < 0 ? 0 : (size_t)w;
        } else {
            return mm_tpl_fail(e, -EINVAL, "tojson: indent must be an integer or a string");
        }
    }
    o.item_sep = o.indent_set ? "," : ", ";
    o.item_sep_len = strlen(o.item_sep);
    o.key_sep = ": ";
    o.key_sep_len = 2;
    if (s[2] && !mm_tpl_is_none(s[2])) {
        json_t *l = mm_tpl_is_list(s[2]) ? s[2]->u.j : NULL;
        if (!l || json_array_size(l) != 2 || !json_is_string(json_array_get(l, 0)) ||
            !json_is_string(json_array_get(l, 1)))
            return mm_tpl_fail(e, -EINVAL, "tojson: separators must be two strings");
        o.item_sep = json_string_value(json_array_get(l, 0));
        o.item_sep_len = json_string_length(json_array_get(l, 0));
        o.key_sep = json_string_value(json_array_get(l, 1));
        o.key_sep_len = json_string_length(json_array_get(l, 1));
    }
    mm_buf b;
    mm_buf_init(&b, MM_TPL_MAX_OUTPUT);
    int rc = mm_tpl_tojson(e, in, &o, &b);
    if (!rc)
        rc = buf_to_str(e, &b, out);
    mm_buf_free(&b);
    return rc;
}

static int f_trim(mm_tpl_ectx *e, const mm_tpl_val *in, const mm_tpl_args *a, mm_tpl_val *out)
{
    BIND("trim", "chars");
    mm_tpl_val sv;
    int rc = mm_tpl_to_strval(e, in, &sv);
    if (rc)
        return rc;
    rc = mm_tpl_strip(e, SV(&sv), SN(&sv), s[0], 1, 1, out);
    mm_tpl_unref(&sv);
    return rc;
}

static int f_unique(mm_tpl_ectx *e, const mm_tpl_val *in, const mm_tpl_args *a,
                    mm_tpl_val *out)
{
    BIND("unique", "case_sensitive,attribute");
    keyed k;
    int rc;
    if (lazy_input(e, in, 0, NULL, out, &rc))
        return rc;
    rc = keyed_make(e, in, s[1], !truthy_arg(s[0]), &k);
    json_t *r = rc ? NULL : json_array();
    if (!rc && !r)
        rc = oom(e);
    size_t *kept = rc ? NULL : malloc((k.n + 1) * sizeof(*kept)), nk = 0;
    if (!rc && !kept)
        rc = oom(e);
    for (size_t i = 0; !rc && i < k.n; i++) {
        if (mm_tpl_is_list(&k.keys[i]) || mm_tpl_is_dict(&k.keys[i])) {
            rc = mm_tpl_fail(e, -EINVAL, "unhashable type: '%s'", mm_tpl_typename(&k.keys[i]));
            break;
        }
        int seen = 0;
        for (size_t j = 0; j < nk && !seen; j++)
            seen = mm_tpl_eq(&k.keys[kept[j]], &k.keys[i]);
        if (seen)
            continue;
        kept[nk++] = i;
        if (json_array_append(r, json_array_get(k.items, i)))
            rc = oom(e);
    }
    free(kept);
    keyed_free(&k);
    if (rc) {
        json_decref(r);
        return rc;
    }
    return mm_tpl_iter_new(e, r, "generator", out);
}

static const struct {
    const char *name;
    filter_fn fn;
} filters[] = {
    {"abs", f_abs}, {"attr", f_attr}, {"capitalize", f_capitalize}, {"count", f_length},
    {"d", f_default}, {"default", f_default}, {"dictsort", f_dictsort}, {"e", f_escape},
    {"escape", f_escape}, {"first", f_first}, {"float", f_float}, {"indent", f_indent},
    {"int", f_int}, {"items", f_items}, {"join", f_join}, {"last", f_last},
    {"length", f_length}, {"list", f_list}, {"lower", f_lower}, {"map", f_map},
    {"max", f_max}, {"min", f_min}, {"reject", f_reject}, {"rejectattr", f_rejectattr},
    {"replace", f_replace}, {"reverse", f_reverse}, {"round", f_round},
    /* safe marks a string as HTML-safe; with autoescape off it only converts */
    {"safe", f_string}, {"select", f_select}, {"selectattr", f_selectattr},
    {"sort", f_sort}, {"string", f_string}, {"sum", f_sum}, {"title", f_title},
    {"tojson", f_tojson}, {"trim", f_trim}, {"unique", f_unique}, {"upper", f_upper},
};

static const char *const other_filters[] = {
    "batch", "center", "filesizeformat", "forceescape", "format", "groupby", "pprint",
    "random", "slice", "striptags", "truncate", "urlencode", "urlize", "wordcount",
    "wordwrap", "xmlattr", NULL,
};

static filter_fn find_filter(const char *name)
{
    for (size_t i = 0; i < sizeof(filters) / sizeof(filters[0]); i++)
        if (!strcmp(filters[i].name, name))
            return filters[i].fn;
    return NULL;
}

int mm_tpl_has_filter(const char *name) { return find_filter(name) != NULL; }

int mm_tpl_known_filter(const char *name)
{
    for (const char *const *p = other_filters; *p; p++)
        if (!strcmp(*p, name))
            return 1;
    return 0;
}

int mm_tpl_filter(mm_tpl_ectx *e, const char *name, const mm_tpl_val *in, const mm_tpl_args *a,
                  mm_tpl_val *out)
{
    filter_fn fn = find_filter(name);
    if (!fn && mm_tpl_known_filter(name))
        return mm_tpl_fail(e, -ENOTSUP, "filter '%s'", name);
    if (!fn)
        return mm_tpl_fail(e, -EINVAL, "No filter named '%s' found.", name);
    return fn(e, in, a, out);
}

/* ---- tests ---- */
static int t_simple(mm_tpl_ectx *e, const char *name, const mm_tpl_val *in, const mm_tpl_args *a,
                    int *res)
{
    BIND(name, "");
    (void)s;
    const mm_tpl_val *v = in;
    int j = v->kind == MM_TV_JSON;
    if (!strcmp(name, "defined"))
        *res = v->kind != MM_TV_UNDEF;
    else if (!strcmp(name, "undefined"))
        *res = v->kind == MM_TV_UNDEF;
    else if (!strcmp(name, "none"))
        *res = mm_tpl_is_none(v);
    else if (!strcmp(name, "boolean"))
        *res = mm_tpl_is_bool(v);
    else if (!strcmp(name, "true"))
        *res = j && json_is_true(v->u.j);
    else if (!strcmp(name, "false"))
        *res = j && json_is_false(v->u.j);
    else if (!strcmp(name, "integer"))
        *res = mm_tpl_is_int(v);
    else if (!strcmp(name, "float"))
        *res = j && json_is_real(v->u.j);
    else if (!strcmp(name, "number"))
        *res = mm_tpl_is_num(v);
    else if (!strcmp(name, "string"))
        *res = mm_tpl_is_str(v);
    else if (!strcmp(name, "mapping"))
        *res = mm_tpl_is_dict(v);
    else if (!strcmp(name, "iterable"))
        /* Python iter() works on these, and on Undefined */
        *res = v->kind == MM_TV_UNDEF || v->kind == MM_TV_LOOP || v->kind == MM_TV_ITER ||
               mm_tpl_is_str(v) || mm_tpl_is_list(v) || mm_tpl_is_dict(v);
    else if (!strcmp(name, "sequence"))
        /* len() and __getitem__: dict views have no __getitem__ */
        *res = v->kind == MM_TV_UNDEF || mm_tpl_is_str(v) || mm_tpl_is_dict(v) ||
               (mm_tpl_is_list(v) && (mm_tpl_shape_of(e, v->u.j, NULL) <= MM_SHAPE_TUPLE ||
                                      mm_tpl_shape_of(e, v->u.j, NULL) == MM_SHAPE_RANGE));
    else if (!strcmp(name, "callable"))
        *res = v->kind == MM_TV_FUNC || v->kind == MM_TV_UNDEF;
    else if (!strcmp(name, "escaped"))
        *res = 0;
    else if (!strcmp(name, "lower") || !strcmp(name, "upper")) {
        mm_tpl_val sv;
        int rc = mm_tpl_to_strval(e, v, &sv);
        if (rc)
            return rc;
        *res = mm_tpl_str_cased(SV(&sv), SN(&sv), name[0] == 'u');
        mm_tpl_unref(&sv);
    } else if (!strcmp(name, "odd") || !strcmp(name, "even")) {
        if (v->kind == MM_TV_UNDEF)
            return mm_tpl_undef_error(e, v);
        if (!mm_tpl_is_num(v))
            return mm_tpl_fail(e, -EINVAL, "unsupported operand type(s) for %%: '%s' and 'int'",
                               mm_tpl_typename(v));
        double x = mm_tpl_num(v), m = fmod(x, 2.0);
        if (m < 0)
            m += 2.0;
        *res = name[0] == 'o' ? m == 1.0 : m == 0.0;
    }
    return 0;
}

static const char *const simple_tests[] = {
    "defined", "undefined", "none", "boolean", "true", "false", "integer", "float", "number",
    "string", "mapping", "iterable", "sequence", "callable", "escaped", "lower", "upper",
    "odd", "even", NULL,
};

static int t_compare(mm_tpl_ectx *e, const char *name, const mm_tpl_val *in,
                     const mm_tpl_args *a, int *res)
{
    BIND(name, "other");
    if (!s[0])
        return mm_tpl_fail(e, -EINVAL, "test '%s' needs an argument", name);
    const mm_tpl_val *o = s[0];
    int c, rc;
    if (!strcmp(name, "eq") || !strcmp(name, "equalto")) {
        *res = mm_tpl_eq(in, o);
        return 0;
    }
    if (!strcmp(name, "ne")) {
        *res = !mm_tpl_eq(in, o);
        return 0;
    }
    if (!strcmp(name, "sameas")) {
        if (in->kind != o->kind)
            *res = 0;
        else if (in->kind == MM_TV_JSON && (json_is_null(in->u.j) || json_is_boolean(in->u.j)))
            *res = json_typeof(in->u.j) == json_typeof(o->u.j);
        else
            *res = in->u.j == o->u.j;
        return 0;
    }
    if (!strcmp(name, "in")) {
        /* same as the `in` operator */
        if (o->kind == MM_TV_UNDEF) {
            *res = 0;
            return 0;
        }
        if (mm_tpl_is_str(o)) {
            if (!mm_tpl_is_str(in))
                return mm_tpl_fail(e, -EINVAL, "'in <string>' requires string as left operand");
            *res = SN(in) == 0 || (SN(in) <= SN(o) && memmem(SV(o), SN(o), SV(in), SN(in)));
            return 0;
        }
        if (mm_tpl_is_list(o)) {
            size_t i;
            json_t *x;
            *res = 0;
            json_array_foreach(o->u.j, i, x)
                if (in->kind == MM_TV_JSON && mm_tpl_json_eq(in->u.j, x))
                    *res = 1;
            return 0;
        }
        if (mm_tpl_is_dict(o)) {
            *res = mm_tpl_is_str(in) && json_object_get(o->u.j, SV(in)) != NULL;
            return 0;
        }
        return mm_tpl_fail(e, -EINVAL, "argument of type '%s' is not iterable",
                           mm_tpl_typename(o));
    }
    if (!strcmp(name, "divisibleby")) {
        if (in->kind == MM_TV_UNDEF)
            return mm_tpl_undef_error(e, in);
        if (!mm_tpl_is_num(in) || !mm_tpl_is_num(o))
            return mm_tpl_fail(e, -EINVAL, "divisibleby needs numbers");
        if (mm_tpl_num(o) == 0)
            return mm_tpl_fail(e, -EINVAL, "integer division or modulo by zero");
        *res = fmod(mm_tpl_num(in), mm_tpl_num(o)) == 0;
        return 0;
    }
    if ((rc = mm_tpl_cmp(e, in, o, &c)))
        return rc;
    if (!strcmp(name, "lt") || !strcmp(name, "lessthan"))
        *res = c < 0;
    else if (!strcmp(name, "le"))
        *res = c <= 0;
    else if (!strcmp(name, "gt") || !strcmp(name, "greaterthan"))
        *res = c > 0;
    else
        *res = c >= 0;
    return 0;
}

static const char *const compare_tests[] = {
    "eq", "equalto", "ne", "sameas", "in", "divisibleby", "lt", "lessthan", "le", "gt",
    "greaterthan", "ge", NULL,
};

static int in_list(const char *const *l, const char *name)
{
    for (; *l; l++)
        if (!strcmp(*l, name))
            return 1;
    return 0;
}

int mm_tpl_has_test(const char *name)
{
    return in_list(simple_tests, name) || in_list(compare_tests, name) ||
           !strcmp(name, "filter") || !strcmp(name, "test");
}

int mm_tpl_known_test(const char *name)
{
    (void)name;
    return 0;   /* every Jinja test is implemented */
}

int mm_tpl_test(mm_tpl_ectx *e, const char *name, const mm_tpl_val *in, const mm_tpl_args *a,
                int *res)
{
    *res = 0;
    if (in_list(simple_tests, name))
        return t_simple(e, name, in, a, res);
    if (in_list(compare_tests, name))
        return t_compare(e, name, in, a, res);
    if (!strcmp(name, "filter") || !strcmp(name, "test")) {
        BIND(name, "");
        (void)s;
        *res = mm_tpl_is_str(in) &&
               (name[0] == 'f' ? mm_tpl_has_filter(SV(in)) : mm_tpl_has_test(SV(in)));
        return 0;
    }
    return mm_tpl_fail(e, -EINVAL, "No test named '%s' found.", name);
}
