/* template_eval.c: walk the AST and write the output.
 *
 * Scoping follows Jinja2: a for-loop body gets a fresh scope each iteration
 * (a {% set %} inside it neither survives to the next iteration nor leaks
 * out, which is why templates use namespace()), {% if %} shares its
 * enclosing scope, and a macro sees the template's top-level variables as
 * they are when it is called.  Names resolve through the scopes, then the
 * render variables, then the globals.  Undefined values follow Jinja's
 * default Undefined: printing, iterating, testing and `default` work on
 * them; attribute access, arithmetic and calls raise an error. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "template_impl.h"

enum { CTL_NONE = 0, CTL_BREAK = 1, CTL_CONTINUE = 2 };

#define FRAME_INLINE 4   /* most scopes bind a loop variable and `loop` */

struct mm_tpl_frame {
    mm_tpl_frame *parent;
    size_t n, cap;
    const char **names;
    mm_tpl_val *vals;
    const char *inl_names[FRAME_INLINE];
    mm_tpl_val inl_vals[FRAME_INLINE];
};

typedef struct evalctx {
    mm_tpl_ectx x;
    const mm_tpl_val *hole;  /* input of a {% filter %} / {% set | f %} chain */
} evalctx;

static int oom(mm_tpl_ectx *e)
{
    return mm_tpl_fail(e, -ENOMEM, "out of memory");
}

/* ---- frames ---- */
static void frame_free(mm_tpl_frame *f)
{
    for (size_t i = 0; i < f->n; i++)
        mm_tpl_unref(&f->vals[i]);
    if (f->names != f->inl_names)
        free(f->names);
    if (f->vals != f->inl_vals)
        free(f->vals);
    f->n = f->cap = 0;
    f->names = NULL;
    f->vals = NULL;
}

/* Bind name in f, taking the reference in *v. */
static int frame_set(mm_tpl_ectx *e, mm_tpl_frame *f, const char *name, mm_tpl_val *v)
{
    for (size_t i = 0; i < f->n; i++)
        if (!strcmp(f->names[i], name)) {
            mm_tpl_unref(&f->vals[i]);
            f->vals[i] = *v;
            v->kind = MM_TV_UNDEF;
            return 0;
        }
    if (f->cap == 0) {
        f->names = f->inl_names;
        f->vals = f->inl_vals;
        f->cap = FRAME_INLINE;
    }
    if (f->n == f->cap) {
        size_t nc = f->cap * 2;
        const char **nn = malloc(nc * sizeof(*nn));
        mm_tpl_val *nv = malloc(nc * sizeof(*nv));
        if (!nn || !nv) {
            free(nn);
            free(nv);
            goto fail;
        }
        memcpy(nn, f->names, f->n * sizeof(*nn));
        memcpy(nv, f->vals, f->n * sizeof(*nv));
        if (f->names != f->inl_names)
            free(f->names);
        if (f->vals != f->inl_vals)
            free(f->vals);
        f->names = nn;
        f->vals = nv;
        f->cap = nc;
    }
    f->names[f->n] = name;
    f->vals[f->n] = *v;
    f->n++;
    v->kind = MM_TV_UNDEF;
    return 0;
fail:
    mm_tpl_unref(v);
    return oom(e);
}

/* Entering the scope of `body`: names Jinja starts there as undefined. */
static int enter_scope(mm_tpl_ectx *e, mm_tpl_frame *f, const mm_tpl_node *body)
{
    for (size_t i = 0; body && i < body->nundef; i++) {
        mm_tpl_val u = mm_tpl_undef(body->undef[i], NULL);
        int rc = frame_set(e, f, body->undef[i], &u);
        if (rc)
            return rc;
    }
    return 0;
}

static int lookup(mm_tpl_ectx *e, mm_tpl_frame *f, const char *name, mm_tpl_val *out)
{
    for (; f; f = f->parent)
        for (size_t i = 0; i < f->n; i++)
            if (!strcmp(f->names[i], name)) {
                *out = mm_tpl_ref(&f->vals[i]);
                return 0;
            }
    json_t *j = e->ctx ? json_object_get(e->ctx, name) : NULL;
    if (j) {
        *out = mm_tpl_jv(json_incref(j));
        return 0;
    }
    int rc = mm_tpl_global_lookup(name, out);
    if (rc == -ENOMEM)
        return oom(e);
    if (rc == 0)
        return 0;
    *out = mm_tpl_undef(name, NULL);
    return 0;
}

/* ---- attribute and item access ---- */
static int loop_attr(mm_tpl_ectx *e, const mm_tpl_val *lv, const char *name, mm_tpl_val *out)
{
    const mm_tpl_loop *l = lv->u.loop;
    size_t len = json_array_size(l->items), i = l->index0;
    long long v;
    if (!strcmp(name, "index"))
        v = (long long)i + 1;
    else if (!strcmp(name, "index0"))
        v = (long long)i;
    else if (!strcmp(name, "revindex"))
        v = (long long)(len - i);
    else if (!strcmp(name, "revindex0"))
        v = (long long)(len - i - 1);
    else if (!strcmp(name, "length"))
        v = (long long)len;
    else if (!strcmp(name, "depth"))
        v = 1;
    else if (!strcmp(name, "depth0"))
        v = 0;
    else if (!strcmp(name, "first")) {
        *out = mm_tpl_bool(i == 0);
        return 0;
    } else if (!strcmp(name, "last")) {
        *out = mm_tpl_bool(i + 1 == len);
        return 0;
    } else if (!strcmp(name, "previtem") || !strcmp(name, "nextitem")) {
        int prev = name[0] == 'p';
        if (prev ? i == 0 : i + 1 >= len) {
            *out = mm_tpl_undef(NULL, NULL);
            out->uhint = prev ? "there is no previous item" : "there is no next item";
            return 0;
        }
        *out = mm_tpl_jv(json_incref(json_array_get(l->items, prev ? i - 1 : i + 1)));
        return 0;
    } else {
        int rc = mm_tpl_method_lookup(lv, name, out);
        if (rc == -ENOMEM)
            return oom(e);
        if (rc == 0)
            return 0;
        *out = mm_tpl_undef(name, "LoopContext");
        return 0;
    }
    *out = mm_tpl_int(v);
    return MM_TPL_OOM(*out) ? oom(e) : 0;
}

int mm_tpl_getattr(mm_tpl_ectx *e, const mm_tpl_val *obj, const char *name, mm_tpl_val *out)
{
    int rc;
    switch (obj->kind) {
    case MM_TV_UNDEF:
        return mm_tpl_undef_error(e, obj);
    case MM_TV_NS:
        for (size_t i = 0; i < obj->u.ns->n; i++)
            if (!strcmp(obj->u.ns->names[i], name)) {
                *out = mm_tpl_ref(&obj->u.ns->vals[i]);
                return 0;
            }
        *out = mm_tpl_undef(name, "Namespace");
        return 0;
    case MM_TV_LOOP:
        return loop_attr(e, obj, name, out);
    case MM_TV_FUNC:
    case MM_TV_ITER:
        *out = mm_tpl_undef(name, mm_tpl_typename(obj));
        return 0;
    default:
        break;
    }
    /* Python's getattr first (methods), then the item, as Jinja does */
    rc = mm_tpl_method_lookup(obj, name, out);
    if (rc == 0)
        return 0;
    if (rc == -ENOMEM)
        return oom(e);
    if (rc == -EPERM)
        return mm_tpl_fail(e, -EINVAL, "access to attribute '%s' of '%s' object is unsafe",
                           name, mm_tpl_typename(obj));
    if (json_is_object(obj->u.j)) {
        json_t *v = json_object_get(obj->u.j, name);
        if (v) {
            *out = mm_tpl_jv(json_incref(v));
            return 0;
        }
    }
    *out = mm_tpl_undef(name, mm_tpl_typename(obj));
    return 0;
}

int mm_tpl_getitem(mm_tpl_ectx *e, const mm_tpl_val *obj, const mm_tpl_val *key, mm_tpl_val *out)
{
    if (obj->kind == MM_TV_UNDEF)
        return mm_tpl_undef_error(e, obj);
    if (obj->kind == MM_TV_JSON) {
        json_t *o = obj->u.j;
        if (json_is_object(o) && mm_tpl_is_str(key)) {
            json_t *v = json_object_get(o, json_string_value(key->u.j));
            /* a key with a NUL byte cannot be in a JSON object from jansson */
            if (v && strlen(json_string_value(key->u.j)) == json_string_length(key->u.j)) {
                *out = mm_tpl_jv(json_incref(v));
                return 0;
            }
        }
        int intkey = key->kind == MM_TV_JSON && (json_is_integer(key->u.j) ||
                                                  json_is_boolean(key->u.j));
        if (json_is_array(o) && mm_tpl_shape_of(e, o, NULL) >= MM_SHAPE_ITEMS &&
            mm_tpl_shape_of(e, o, NULL) != MM_SHAPE_RANGE) {
            /* dict views are not subscriptable: Jinja gives undefined */
            *out = mm_tpl_undef(NULL, mm_tpl_shape_name(mm_tpl_shape_of(e, o, NULL)));
            return 0;
        }
        if ((json_is_array(o) || json_is_string(o)) && intkey) {
            long long i = mm_tpl_intval(key);
            size_t len = json_is_array(o) ? json_array_size(o)
                       : mm_tpl_u8_len(json_string_value(o), json_string_length(o));
            if (i < 0)
                i += (long long)len;
            if (i < 0 || (size_t)i >= len) {
                *out = mm_tpl_undef(NULL, mm_tpl_typename(obj));
                return 0;
            }
            if (json_is_array(o)) {
                *out = mm_tpl_jv(json_incref(json_array_get(o, (size_t)i)));
                return 0;
            }
            const char *s = json_string_value(o);
            size_t n = json_string_length(o), b = mm_tpl_u8_off(s, n, (size_t)i);
            uint32_t cp;
            *out = mm_tpl_str_n(s + b, mm_tpl_u8_dec(s, n, b, &cp));
            return MM_TPL_OOM(*out) ? oom(e) : 0;
        }
    }
    /* then getattr when the key is a string (obj['items'] is the method) */
    if (mm_tpl_is_str(key)) {
        if (obj->kind != MM_TV_JSON || !json_is_object(obj->u.j))
            return mm_tpl_getattr(e, obj, json_string_value(key->u.j), out);
        int rc = mm_tpl_method_lookup(obj, json_string_value(key->u.j), out);
        if (rc == 0)
            return 0;
        if (rc == -ENOMEM)
            return oom(e);
        if (rc == -EPERM)
            return mm_tpl_fail(e, -EINVAL, "access to attribute '%s' of 'dict' object is unsafe",
                               json_string_value(key->u.j));
        *out = mm_tpl_undef(json_string_value(key->u.j), "dict");
        return 0;
    }
    *out = mm_tpl_undef(NULL, mm_tpl_typename(obj));
    return 0;
}

/* Python's slice index normalisation (PySlice_AdjustIndices). */
static int slice_index(mm_tpl_ectx *e, const mm_tpl_val *v, long long *out, int *given)
{
    *given = 0;
    if (!v || mm_tpl_is_none(v))
        return 0;
    if (v->kind == MM_TV_UNDEF)
        return mm_tpl_undef_error(e, v);
    if (!(mm_tpl_is_int(v) || mm_tpl_is_bool(v)))
        return mm_tpl_fail(e, -EINVAL, "slice indices must be integers or None");
    *out = mm_tpl_intval(v);
    *given = 1;
    return 0;
}

static int do_slice(mm_tpl_ectx *e, const mm_tpl_val *obj, const mm_tpl_val *vs,
                    const mm_tpl_val *ve, const mm_tpl_val *vst, mm_tpl_val *out)
{
    long long start = 0, stop = 0, step = 1;
    int gs, ge, gst, rc;
    if (obj->kind == MM_TV_UNDEF)
        return mm_tpl_undef_error(e, obj);
    if ((rc = slice_index(e, vs, &start, &gs)) || (rc = slice_index(e, ve, &stop, &ge)) ||
        (rc = slice_index(e, vst, &step, &gst)))
        return rc;
    if (step == 0)
        return mm_tpl_fail(e, -EINVAL, "slice step cannot be zero");
    int is_list = mm_tpl_is_list(obj), shape = MM_SHAPE_LIST;
    /* Jinja compiles a slice to a plain Python subscript: no undefined here */
    if (mm_tpl_is_dict(obj))
        return mm_tpl_fail(e, -EINVAL, "unhashable type: 'slice'");
    if (!is_list && !mm_tpl_is_str(obj))
        return mm_tpl_fail(e, -EINVAL, "'%s' object is not subscriptable", mm_tpl_typename(obj));
    if (is_list) {
        shape = mm_tpl_shape_of(e, obj->u.j, NULL);
        if (shape == MM_SHAPE_RANGE)
            return mm_tpl_fail(e, -ENOTSUP, "slicing a range");
        if (shape != MM_SHAPE_LIST && shape != MM_SHAPE_TUPLE)
            return mm_tpl_fail(e, -EINVAL, "'%s' object is not subscriptable",
                               mm_tpl_shape_name(shape));
    }
    const char *s = is_list ? NULL : json_string_value(obj->u.j);
    size_t sn = is_list ? 0 : json_string_length(obj->u.j);
    long long len = is_list ? (long long)json_array_size(obj->u.j) : (long long)mm_tpl_u8_len(s, sn);
    if (step > 0) {
        if (!gs)
            start = 0;
        else if (start < 0 && (start += len) < 0)
            start = 0;
        else if (start > len)
            start = len;
        if (!ge)
            stop = len;
        else if (stop < 0 && (stop += len) < 0)
            stop = 0;
        else if (stop > len)
            stop = len;
    } else {
        if (!gs)
            start = len - 1;
        else if (start < 0 && (start += len) < 0)
            start = -1;
        else if (start >= len)
            start = len - 1;
        if (!ge)
            stop = -1;
        else if (stop < 0 && (stop += len) < 0)
            stop = -1;
        else if (stop >= len)
            stop = len - 1;
    }
    if (is_list) {
        json_t *r = json_array();
        if (!r)
            return oom(e);
        for (long long i = start; step > 0 ? i < stop : i > stop; i += step)
            if (json_array_append(r, json_array_get(obj->u.j, (size_t)i))) {
                json_decref(r);
                return oom(e);
            }
        if (shape == MM_SHAPE_TUPLE && mm_tpl_mark(e, r, MM_SHAPE_TUPLE, NULL)) {
            json_decref(r);
            return -ENOMEM;
        }
        *out = mm_tpl_jv(r);
        return 0;
    }
    /* strings: by code point */
    size_t *offs = malloc(((size_t)len + 1) * sizeof(*offs));
    mm_buf b;
    mm_buf_init(&b, MM_TPL_MAX_OUTPUT);
    if (!offs)
        return oom(e);
    size_t k = 0;
    for (size_t i = 0; i < sn;) {
        uint32_t cp;
        offs[k++] = i;
        i += mm_tpl_u8_dec(s, sn, i, &cp);
    }
    offs[k] = sn;
    rc = 0;
    if (step == 1 && start < stop) {
        rc = mm_buf_append(&b, s + offs[start], offs[stop] - offs[start]);
    } else {
        for (long long i = start; !rc && (step > 0 ? i < stop : i > stop); i += step)
            rc = mm_buf_append(&b, s + offs[i], offs[i + 1] - offs[i]);
    }
    if (rc)
        rc = oom(e);
    else {
        *out = mm_tpl_str_n(b.data ? b.data : "", b.len);
        if (MM_TPL_OOM(*out))
            rc = oom(e);
    }
    free(offs);
    mm_buf_free(&b);
    return rc;
}

/* ---- operators ---- */
static int type_error2(mm_tpl_ectx *e, const char *op, const mm_tpl_val *a, const mm_tpl_val *b)
{
    if (a->kind == MM_TV_UNDEF)
        return mm_tpl_undef_error(e, a);
    if (b->kind == MM_TV_UNDEF)
        return mm_tpl_undef_error(e, b);
    if (!strcmp(op, "+") && mm_tpl_is_str(a))
        return mm_tpl_fail(e, -EINVAL, "can only concatenate str (not \"%s\") to str",
                           mm_tpl_typename(b));
    if (!strcmp(op, "+") && mm_tpl_is_list(a))
        return mm_tpl_fail(e, -EINVAL, "can only concatenate list (not \"%s\") to list",
                           mm_tpl_typename(b));
    return mm_tpl_fail(e, -EINVAL, "unsupported operand type(s) for %s: '%s' and '%s'", op,
                       mm_tpl_typename(a), mm_tpl_typename(b));
}

static int intlike(const mm_tpl_val *v)
{
    return mm_tpl_is_int(v) || mm_tpl_is_bool(v);
}

static int overflow(mm_tpl_ectx *e)
{
    return mm_tpl_fail(e, -ENOTSUP, "integer arithmetic beyond 64 bits");
}

static int num_result_int(mm_tpl_ectx *e, long long v, mm_tpl_val *out)
{
    *out = mm_tpl_int(v);
    return MM_TPL_OOM(*out) ? oom(e) : 0;
}

static int num_result_real(mm_tpl_ectx *e, double v, mm_tpl_val *out)
{
    return mm_tpl_real(e, v, out);
}

/* CPython's float floor division and modulo. */
static void py_fdivmod(double vx, double wx, double *floordiv, double *modp)
{
    double mod = fmod(vx, wx), div = (vx - mod) / wx;
    if (mod) {
        if ((wx < 0) != (mod < 0)) {
            mod += wx;
            div -= 1.0;
        }
    } else {
        mod = copysign(0.0, wx);
    }
    double fd;
    if (div) {
        fd = floor(div);
        if (div - fd > 0.5)
            fd += 1.0;
    } else {
        fd = copysign(0.0, vx / wx);
    }
    *floordiv = fd;
    *modp = mod;
}

static int concat_str(mm_tpl_ectx *e, const char *a, size_t an, const char *b, size_t bn,
                      mm_tpl_val *out)
{
    if (an + bn > MM_TPL_MAX_OUTPUT)
        return mm_tpl_fail(e, -E2BIG, "a string grew past %u bytes", MM_TPL_MAX_OUTPUT);
    char *p = malloc(an + bn + 1);
    if (!p)
        return oom(e);
    memcpy(p, a, an);
    memcpy(p + an, b, bn);
    *out = mm_tpl_str_n(p, an + bn);
    free(p);
    return MM_TPL_OOM(*out) ? oom(e) : 0;
}

/* "fmt" % args with %s %d %i %r %%; anything else is unsupported. */
static int str_format_percent(mm_tpl_ectx *e, const mm_tpl_val *fmt, const mm_tpl_val *args,
                              int args_is_tuple, mm_tpl_val *out)
{
    const char *s = json_string_value(fmt->u.j);
    size_t n = json_string_length(fmt->u.j), used = 0;
    size_t nargs = args_is_tuple ? json_array_size(args->u.j) : 1;
    /* %-formatting reads a tuple's items; anything else is one argument */
    mm_buf b;
    int rc = 0;
    mm_buf_init(&b, MM_TPL_MAX_OUTPUT);
    for (size_t i = 0; i < n && !rc; i++) {
        if (s[i] != '%') {
            rc = mm_buf_append(&b, s + i, 1) ? oom(e) : 0;
            continue;
        }
        char c = i + 1 < n ? s[i + 1] : 0;
        i++;
        if (c == '%') {
            rc = mm_buf_append(&b, "%", 1) ? oom(e) : 0;
            continue;
        }
        if (c != 's' && c != 'd' && c != 'i' && c != 'r') {
            rc = mm_tpl_fail(e, -ENOTSUP, "'%%%c' in string %% formatting", c ? c : ' ');
            break;
        }
        if (used >= nargs) {
            rc = mm_tpl_fail(e, -EINVAL, "not enough arguments for format string");
            break;
        }
        mm_tpl_val a = args_is_tuple ? mm_tpl_jv(json_incref(json_array_get(args->u.j, used)))
                                     : mm_tpl_ref(args);
        used++;
        if (c == 's')
            rc = mm_tpl_str(e, &a, &b);
        else if (c == 'r')
            rc = mm_tpl_repr(e, &a, &b);
        else if (mm_tpl_is_num(&a)) {
            double d = mm_tpl_num(&a);
            if (!intlike(&a) && !(d > -9.2e18 && d < 9.2e18))
                rc = overflow(e);
            else
                rc = mm_buf_printf(&b, "%lld", intlike(&a) ? mm_tpl_intval(&a)
                                                           : (long long)trunc(d)) ? oom(e) : 0;
        } else {
            rc = mm_tpl_fail(e, -EINVAL, "%%d format: a real number is required, not %s",
                             mm_tpl_typename(&a));
        }
        mm_tpl_unref(&a);
    }
    /* Python: a mapping-like single argument (list, dict) may go unused */
    if (!rc && used < nargs && (args_is_tuple || !(mm_tpl_is_list(args) || mm_tpl_is_dict(args) ||
                                                   args->kind == MM_TV_UNDEF)))
        rc = mm_tpl_fail(e, -EINVAL, "not all arguments converted during string formatting");
    if (!rc) {
        *out = mm_tpl_str_n(b.data ? b.data : "", b.len);
        if (MM_TPL_OOM(*out))
            rc = oom(e);
    }
    mm_buf_free(&b);
    return rc;
}

static int repeat(mm_tpl_ectx *e, const mm_tpl_val *seq, long long times, int tuple,
                  mm_tpl_val *out)
{
    if (times < 0)
        times = 0;
    if (mm_tpl_is_str(seq)) {
        size_t n = json_string_length(seq->u.j);
        if (n && (unsigned long long)times > MM_TPL_MAX_OUTPUT / n)
            return mm_tpl_fail(e, -E2BIG, "a string grew past %u bytes", MM_TPL_MAX_OUTPUT);
        mm_buf b;
        mm_buf_init(&b, MM_TPL_MAX_OUTPUT);
        int rc = 0;
        for (long long i = 0; i < times && !rc; i++)
            rc = mm_buf_append(&b, json_string_value(seq->u.j), n) ? oom(e) : 0;
        if (!rc) {
            *out = mm_tpl_str_n(b.data ? b.data : "", b.len);
            if (MM_TPL_OOM(*out))
                rc = oom(e);
        }
        mm_buf_free(&b);
        return rc;
    }
    size_t n = json_array_size(seq->u.j);
    if (n && (unsigned long long)times > MM_TPL_MAX_OUTPUT / 8 / n)
        return mm_tpl_fail(e, -E2BIG, "a list grew too long");
    json_t *r = json_array();
    if (!r)
        return oom(e);
    for (long long i = 0; i < times; i++)
        if (json_array_extend(r, seq->u.j)) {
            json_decref(r);
            return oom(e);
        }
    if (tuple && mm_tpl_mark(e, r, MM_SHAPE_TUPLE, NULL)) {
        json_decref(r);
        return -ENOMEM;
    }
    *out = mm_tpl_jv(r);
    return 0;
}

static int binop(mm_tpl_ectx *e, int op, const mm_tpl_val *a, const mm_tpl_val *b,
                 int b_is_tuple, mm_tpl_val *out)
{
    static const char *names[] = {"+", "-", "*", "/", "//", "%", "**"};
    const char *opname = op == '+' ? names[0] : op == '-' ? names[1] : op == '*' ? names[2]
                       : op == '/' ? names[3] : op == MM_OP_FLOORDIV ? names[4]
                       : op == '%' ? names[5] : names[6];
    if (op == MM_OP_CONCAT) {
        mm_tpl_val x, y;
        int rc = mm_tpl_to_strval(e, a, &x);
        if (rc)
            return rc;
        if ((rc = mm_tpl_to_strval(e, b, &y))) {
            mm_tpl_unref(&x);
            return rc;
        }
        rc = concat_str(e, json_string_value(x.u.j), json_string_length(x.u.j),
                        json_string_value(y.u.j), json_string_length(y.u.j), out);
        mm_tpl_unref(&x);
        mm_tpl_unref(&y);
        return rc;
    }
    if (mm_tpl_is_num(a) && mm_tpl_is_num(b)) {
        if (intlike(a) && intlike(b)) {
            long long x = mm_tpl_intval(a), y = mm_tpl_intval(b), r;
            switch (op) {
            case '+':
                if (__builtin_add_overflow(x, y, &r))
                    return overflow(e);
                return num_result_int(e, r, out);
            case '-':
                if (__builtin_sub_overflow(x, y, &r))
                    return overflow(e);
                return num_result_int(e, r, out);
            case '*':
                if (__builtin_mul_overflow(x, y, &r))
                    return overflow(e);
                return num_result_int(e, r, out);
            case '/':
                if (y == 0)
                    return mm_tpl_fail(e, -EINVAL, "division by zero");
                return num_result_real(e, (double)x / (double)y, out);
            case MM_OP_FLOORDIV:
            case '%': {
                if (y == 0)
                    return mm_tpl_fail(e, -EINVAL, "integer division or modulo by zero");
                if (x == INT64_MIN && y == -1)
                    return overflow(e);
                long long q = x / y, m = x % y;
                if (m != 0 && ((m < 0) != (y < 0))) {
                    q--;
                    m += y;
                }
                return num_result_int(e, op == '%' ? m : q, out);
            }
            default: /* ** by squaring, refusing to overflow */
                if (y < 0)
                    return num_result_real(e, pow((double)x, (double)y), out);
                r = 1;
                for (long long base = x, k = y; k > 0; k >>= 1) {
                    if ((k & 1) && __builtin_mul_overflow(r, base, &r))
                        return overflow(e);
                    if (k > 1 && __builtin_mul_overflow(base, base, &base))
                        return overflow(e);
                }
                return num_result_int(e, r, out);
            }
        }
        double x = mm_tpl_num(a), y = mm_tpl_num(b), fd, md;
        switch (op) {
        case '+': return num_result_real(e, x + y, out);
        case '-': return num_result_real(e, x - y, out);
        case '*': return num_result_real(e, x * y, out);
        case '/':
            if (y == 0)
                return mm_tpl_fail(e, -EINVAL, "float division by zero");
            return num_result_real(e, x / y, out);
        case MM_OP_FLOORDIV:
        case '%':
            if (y == 0)
                return mm_tpl_fail(e, -EINVAL, "float modulo or division by zero");
            py_fdivmod(x, y, &fd, &md);
            return num_result_real(e, op == '%' ? md : fd, out);
        default:
            return num_result_real(e, pow(x, y), out);
        }
    }
    if (op == '+' && mm_tpl_is_str(a) && mm_tpl_is_str(b))
        return concat_str(e, json_string_value(a->u.j), json_string_length(a->u.j),
                          json_string_value(b->u.j), json_string_length(b->u.j), out);
    int sa = mm_tpl_is_list(a) ? mm_tpl_shape_of(e, a->u.j, NULL) : -1;
    int sb = mm_tpl_is_list(b) ? mm_tpl_shape_of(e, b->u.j, NULL) : -1;
    if ((sa > MM_SHAPE_TUPLE || sb > MM_SHAPE_TUPLE) && (op == '+' || op == '*'))
        return mm_tpl_fail(e, -EINVAL, "unsupported operand type(s) for %s: '%s' and '%s'",
                           opname, sa >= 0 ? mm_tpl_shape_name(sa) : mm_tpl_typename(a),
                           sb >= 0 ? mm_tpl_shape_name(sb) : mm_tpl_typename(b));
    if (op == '+' && sa >= 0 && sb >= 0) {
        if (sa != sb)
            return mm_tpl_fail(e, -EINVAL, "can only concatenate %s (not \"%s\") to %s",
                               mm_tpl_shape_name(sa), mm_tpl_shape_name(sb),
                               mm_tpl_shape_name(sa));
        json_t *r = json_array();
        if (!r || json_array_extend(r, a->u.j) || json_array_extend(r, b->u.j) ||
            (sa == MM_SHAPE_TUPLE && mm_tpl_mark(e, r, MM_SHAPE_TUPLE, NULL))) {
            json_decref(r);
            return oom(e);
        }
        *out = mm_tpl_jv(r);
        return 0;
    }
    if (op == '*' && (mm_tpl_is_str(a) || sa >= 0) && intlike(b))
        return repeat(e, a, mm_tpl_intval(b), sa == MM_SHAPE_TUPLE, out);
    if (op == '*' && (mm_tpl_is_str(b) || sb >= 0) && intlike(a))
        return repeat(e, b, mm_tpl_intval(a), sb == MM_SHAPE_TUPLE, out);
    if (op == '%' && mm_tpl_is_str(a) && (b->kind == MM_TV_JSON || b->kind == MM_TV_UNDEF))
        return str_format_percent(e, a, b, b_is_tuple && mm_tpl_is_list(b), out);
    return type_error2(e, opname, a, b);
}

/* Python's `needle in hay`. */
static int contains(mm_tpl_ectx *e, const mm_tpl_val *needle, const mm_tpl_val *hay, int *res)
{
    *res = 0;
    if (hay->kind == MM_TV_UNDEF)
        return 0;   /* iterating Undefined yields nothing */
    if (hay->kind == MM_TV_ITER) {
        /* consumes the iterator up to the match, as Python does */
        mm_tpl_iter *it = hay->u.it;
        if (it->err_fmt)
            return mm_tpl_fail(e, -EINVAL, it->err_fmt, it->err_arg ? it->err_arg : "");
        while (it->pos < json_array_size(it->items)) {
            json_t *v = json_array_get(it->items, it->pos++);
            if (needle->kind == MM_TV_JSON && mm_tpl_json_eq(needle->u.j, v)) {
                *res = 1;
                break;
            }
        }
        return 0;
    }
    if (hay->kind != MM_TV_JSON)
        return mm_tpl_fail(e, -EINVAL, "argument of type '%s' is not iterable",
                           mm_tpl_typename(hay));
    json_t *h = hay->u.j;
    if (json_is_string(h)) {
        if (!mm_tpl_is_str(needle))
            return mm_tpl_fail(e, -EINVAL, "'in <string>' requires string as left operand, not %s",
                               mm_tpl_typename(needle));
        size_t nn = json_string_length(needle->u.j), hn = json_string_length(h);
        *res = nn == 0 || (nn <= hn && memmem(json_string_value(h), hn,
                                              json_string_value(needle->u.j), nn) != NULL);
        return 0;
    }
    if (json_is_array(h)) {
        size_t i;
        json_t *v;
        if (needle->kind != MM_TV_JSON)
            return 0;
        json_array_foreach(h, i, v)
            if (mm_tpl_json_eq(needle->u.j, v)) {
                *res = 1;
                return 0;
            }
        return 0;
    }
    if (json_is_object(h)) {
        if (mm_tpl_is_list(needle) || mm_tpl_is_dict(needle))
            return mm_tpl_fail(e, -EINVAL, "unhashable type: '%s'", mm_tpl_typename(needle));
        if (mm_tpl_is_str(needle))
            *res = json_object_get(h, json_string_value(needle->u.j)) != NULL;
        return 0;
    }
    return mm_tpl_fail(e, -EINVAL, "argument of type '%s' is not iterable", mm_tpl_typename(hay));
}

/* ---- expressions ---- */
static int eval(evalctx *E, mm_tpl_frame *f, const mm_tpl_node *n, mm_tpl_val *out);
static int exec_body(evalctx *E, mm_tpl_frame *f, const mm_tpl_node *n);

typedef struct argvals {
    mm_tpl_args a;
    mm_tpl_val small[6];
    const char *kwsmall[6];
    mm_tpl_val *vals;
    const char **names;
    size_t n;
} argvals;

static void args_free(argvals *av)
{
    for (size_t i = 0; i < av->n; i++)
        mm_tpl_unref(&av->vals[i]);
    if (av->vals != av->small)
        free(av->vals);
    if (av->names != av->kwsmall)
        free((void *)av->names);
}

/* Evaluate call arguments: positional first, then keywords (the parser
 * rejects a positional after a keyword). */
static int eval_args(evalctx *E, mm_tpl_frame *f, const mm_tpl_node *n, argvals *av)
{
    memset(av, 0, sizeof(*av));
    av->vals = av->small;
    av->names = av->kwsmall;
    if (n->nkids > 6) {
        av->vals = calloc(n->nkids, sizeof(*av->vals));
        av->names = calloc(n->nkids, sizeof(*av->names));
        if (!av->vals || !av->names) {
            if (av->vals != av->small)
                free(av->vals);
            if (av->names != av->kwsmall)
                free((void *)av->names);
            av->vals = av->small;
            av->names = av->kwsmall;
            return oom(&E->x);
        }
    }
    size_t npos = 0;
    for (size_t i = 0; i < n->nkids; i++) {
        int rc = eval(E, f, n->kids[i], &av->vals[i]);
        if (rc)
            return rc;
        av->n = i + 1;
        av->names[i] = n->kwnames ? n->kwnames[i] : NULL;
        if (!av->names[i])
            npos = i + 1;
    }
    av->a.npos = npos;
    av->a.pos = av->vals;
    av->a.nkw = n->nkids - npos;
    av->a.kwn = av->names + npos;
    av->a.kwv = av->vals + npos;
    return 0;
}

static int call_macro(evalctx *E, const mm_tpl_func *fn, const mm_tpl_args *a, mm_tpl_val *out)
{
    mm_tpl_ectx *e = &E->x;
    const mm_tpl_node *m = fn->macro;
    mm_tpl_frame fr = {.parent = e->root};
    mm_buf buf, *saved = e->out;
    int rc = 0, line = e->line;
    if (e->calls >= MM_TPL_MAX_CALLS)
        return mm_tpl_fail(e, -E2BIG, "macro calls nested more than %d deep", MM_TPL_MAX_CALLS);
    if (++e->iters > MM_TPL_MAX_ITERS)
        return mm_tpl_fail(e, -E2BIG, "more than %d loop iterations and calls", MM_TPL_MAX_ITERS);
    if (a->npos > m->nkids)
        return mm_tpl_fail(e, -EINVAL, "macro '%s' takes not more than %zu argument(s)",
                           m->name, m->nkids);
    for (size_t k = 0; k < a->nkw; k++) {
        size_t p;
        for (p = 0; p < m->nkids && strcmp(m->kids[p]->name, a->kwn[k]); p++)
            ;
        if (p == m->nkids)
            return mm_tpl_fail(e, -EINVAL, "macro '%s' has no argument named '%s'", m->name,
                               a->kwn[k]);
        if (p < a->npos)
            return mm_tpl_fail(e, -EINVAL, "macro '%s' got multiple values for argument '%s'",
                               m->name, a->kwn[k]);
    }
    for (size_t p = 0; p < m->nkids && !rc; p++) {
        const mm_tpl_node *par = m->kids[p];
        mm_tpl_val v = {0};
        int have = 0;
        if (p < a->npos) {
            v = mm_tpl_ref(&a->pos[p]);
            have = 1;
        }
        for (size_t k = 0; !have && k < a->nkw; k++)
            if (!strcmp(par->name, a->kwn[k])) {
                v = mm_tpl_ref(&a->kwv[k]);
                have = 1;
            }
        if (!have) {
            if (par->a) {
                if ((rc = eval(E, &fr, par->a, &v)))
                    break;
            } else {
                v = mm_tpl_undef(par->name, NULL);
                v.uhint = "a macro parameter was not provided";
            }
        }
        rc = frame_set(e, &fr, par->name, &v);
    }
    if (!rc)
        rc = enter_scope(e, &fr, m->b);
    if (rc)
        goto out;
    mm_buf_init(&buf, e->out_max);
    e->out = &buf;
    e->calls++;
    rc = exec_body(E, &fr, m->b);
    e->calls--;
    e->out = saved;
    e->line = line;
    if (rc >= 0) {
        rc = 0;
        *out = mm_tpl_str_n(buf.data ? buf.data : "", buf.len);
        if (MM_TPL_OOM(*out))
            rc = oom(e);
    }
    mm_buf_free(&buf);
out:
    frame_free(&fr);
    return rc;
}

int mm_tpl_call(mm_tpl_ectx *e, const mm_tpl_val *fn, size_t npos, mm_tpl_val *pos,
                size_t nkw, const char **kwn, mm_tpl_val *kwv, mm_tpl_val *out)
{
    mm_tpl_args a = {npos, pos, nkw, kwn, kwv};
    if (fn->kind == MM_TV_UNDEF)
        return mm_tpl_undef_error(e, fn);
    if (fn->kind != MM_TV_FUNC)
        return mm_tpl_fail(e, -EINVAL, "'%s' object is not callable", mm_tpl_typename(fn));
    switch (fn->u.fn->fkind) {
    case MM_FN_GLOBAL: return mm_tpl_call_global(e, fn->u.fn, &a, out);
    case MM_FN_METHOD: return mm_tpl_call_method(e, fn->u.fn, &a, out);
    /* every mm_tpl_ectx is the first member of an evalctx (see
     * mm_tpl_eval_render), and a macro body needs the evaluator's state */
    default: return call_macro((evalctx *)e, fn->u.fn, &a, out);
    }
}

static int eval_list(evalctx *E, mm_tpl_frame *f, const mm_tpl_node *n, mm_tpl_val *out)
{
    json_t *r = n->kind == MM_E_DICT ? json_object() : json_array();
    int rc = 0;
    if (!r)
        return oom(&E->x);
    for (size_t i = 0; i < n->nkids && !rc; i++) {
        mm_tpl_val v;
        json_t *j = NULL;
        if ((rc = eval(E, f, n->kids[i], &v)))
            break;
        rc = mm_tpl_to_json(&E->x, &v, &j);
        mm_tpl_unref(&v);
        if (rc)
            break;
        if (n->kind == MM_E_DICT) {
            if (!json_is_string(j)) {
                rc = mm_tpl_fail(&E->x, -ENOTSUP, "a dict key that is not a string");
                json_decref(j);
                break;
            }
            mm_tpl_val w;
            json_t *wj = NULL;
            i++;
            if (!(rc = eval(E, f, n->kids[i], &w))) {
                rc = mm_tpl_to_json(&E->x, &w, &wj);
                mm_tpl_unref(&w);
            }
            if (!rc && json_object_set_new(r, json_string_value(j), wj))
                rc = oom(&E->x);
            json_decref(j);
        } else if (json_array_append_new(r, j)) {
            rc = oom(&E->x);
        }
    }
    if (!rc && n->kind == MM_E_TUPLE)
        rc = mm_tpl_mark(&E->x, r, MM_SHAPE_TUPLE, NULL);
    if (rc) {
        json_decref(r);
        return rc;
    }
    *out = mm_tpl_jv(r);
    return 0;
}

static int eval_cmp(evalctx *E, mm_tpl_frame *f, const mm_tpl_node *n, mm_tpl_val *out)
{
    mm_tpl_val left, right;
    int rc, res = 1;
    if ((rc = eval(E, f, n->a, &left)))
        return rc;
    for (size_t i = 0; i < n->nkids && res; i++) {
        if ((rc = eval(E, f, n->kids[i], &right)))
            break;
        int c, op = n->ops[i];
        E->x.line = n->line;
        switch (op) {
        case MM_OP_EQ: res = mm_tpl_eq(&left, &right); break;
        case MM_OP_NE: res = !mm_tpl_eq(&left, &right); break;
        case MM_OP_IN:
        case MM_OP_NOTIN:
            rc = contains(&E->x, &left, &right, &res);
            if (op == MM_OP_NOTIN)
                res = !res;
            break;
        default:
            rc = mm_tpl_cmp(&E->x, &left, &right, &c);
            res = op == MM_OP_LT ? c < 0 : op == MM_OP_LE ? c <= 0 : op == MM_OP_GT ? c > 0 : c >= 0;
            break;
        }
        mm_tpl_unref(&left);
        left = right;
        if (rc)
            break;
    }
    mm_tpl_unref(&left);
    if (rc)
        return rc;
    *out = mm_tpl_bool(res);
    return 0;
}

static int eval(evalctx *E, mm_tpl_frame *f, const mm_tpl_node *n, mm_tpl_val *out)
{
    mm_tpl_ectx *e = &E->x;
    mm_tpl_val a = {0}, b = {0}, c = {0}, d = {0};
    argvals av;
    int rc = 0;
    out->kind = MM_TV_UNDEF;
    e->line = n->line;
    switch (n->kind) {
    case MM_E_CONST:
        if (!n->value) {
            *out = E->hole ? mm_tpl_ref(E->hole) : mm_tpl_undef(NULL, NULL);
            return 0;
        }
        *out = mm_tpl_jv(json_incref(n->value));
        return 0;
    case MM_E_NAME:
        return lookup(e, f, n->name, out);
    case MM_E_LIST:
    case MM_E_TUPLE:
    case MM_E_DICT:
        return eval_list(E, f, n, out);
    case MM_E_ATTR:
        if ((rc = eval(E, f, n->a, &a)))
            return rc;
        e->line = n->line;
        rc = mm_tpl_getattr(e, &a, n->name, out);
        break;
    case MM_E_ITEM:
        if ((rc = eval(E, f, n->a, &a)) || (rc = eval(E, f, n->b, &b)))
            break;
        e->line = n->line;
        rc = mm_tpl_getitem(e, &a, &b, out);
        break;
    case MM_E_SLICE:
        if ((rc = eval(E, f, n->a, &a)) || (n->b && (rc = eval(E, f, n->b, &b))) ||
            (n->c && (rc = eval(E, f, n->c, &c))) || (n->d && (rc = eval(E, f, n->d, &d))))
            break;
        e->line = n->line;
        rc = do_slice(e, &a, n->b ? &b : NULL, n->c ? &c : NULL, n->d ? &d : NULL, out);
        break;
    case MM_E_CALL:
        if ((rc = eval(E, f, n->a, &a)))
            break;
        if ((rc = eval_args(E, f, n, &av)) == 0) {
            e->line = n->line;
            rc = mm_tpl_call(e, &a, av.a.npos, av.a.pos, av.a.nkw, av.a.kwn, av.a.kwv, out);
        }
        args_free(&av);
        break;
    case MM_E_FILTER:
        if ((rc = eval(E, f, n->a, &a)))
            break;
        if ((rc = eval_args(E, f, n, &av)) == 0) {
            e->line = n->line;
            rc = mm_tpl_filter(e, n->name, &a, &av.a, out);
        }
        args_free(&av);
        break;
    case MM_E_TEST: {
        int res = 0;
        if ((rc = eval(E, f, n->a, &a)))
            break;
        if ((rc = eval_args(E, f, n, &av)) == 0) {
            e->line = n->line;
            rc = mm_tpl_test(e, n->name, &a, &av.a, &res);
        }
        args_free(&av);
        if (!rc)
            *out = mm_tpl_bool(n->op ? !res : res);
        break;
    }
    case MM_E_NOT:
        if ((rc = eval(E, f, n->a, &a)))
            break;
        *out = mm_tpl_bool(!mm_tpl_truthy(&a));
        break;
    case MM_E_NEG:
    case MM_E_POS:
        if ((rc = eval(E, f, n->a, &a)))
            break;
        e->line = n->line;
        if (a.kind == MM_TV_UNDEF) {
            rc = mm_tpl_undef_error(e, &a);
        } else if (!mm_tpl_is_num(&a)) {
            rc = mm_tpl_fail(e, -EINVAL, "bad operand type for unary %c: '%s'",
                             n->kind == MM_E_NEG ? '-' : '+', mm_tpl_typename(&a));
        } else if (intlike(&a)) {
            long long v = mm_tpl_intval(&a);
            if (n->kind == MM_E_NEG && v == INT64_MIN)
                rc = overflow(e);
            else
                rc = num_result_int(e, n->kind == MM_E_NEG ? -v : v, out);
        } else {
            rc = num_result_real(e, n->kind == MM_E_NEG ? -mm_tpl_num(&a) : mm_tpl_num(&a), out);
        }
        break;
    case MM_E_BIN:
        if ((rc = eval(E, f, n->a, &a)))
            break;
        if (n->op == MM_OP_AND || n->op == MM_OP_OR) {
            /* Python returns the deciding operand, not a bool */
            int t = mm_tpl_truthy(&a);
            if ((n->op == MM_OP_AND) != t) {
                *out = a;
                return 0;
            }
            mm_tpl_unref(&a);
            return eval(E, f, n->b, out);
        }
        if ((rc = eval(E, f, n->b, &b)))
            break;
        e->line = n->line;
        rc = binop(e, n->op, &a, &b, n->b->kind == MM_E_TUPLE, out);
        break;
    case MM_E_CMP:
        return eval_cmp(E, f, n, out);
    case MM_E_COND:
        if ((rc = eval(E, f, n->a, &a)))
            break;
        if (mm_tpl_truthy(&a))
            rc = eval(E, f, n->b, out);
        else if (n->c)
            rc = eval(E, f, n->c, out);
        else {
            *out = mm_tpl_undef(NULL, NULL);
            out->uhint = "the inline if-expression evaluated to false and no else section "
                         "was defined";
        }
        break;
    default:
        rc = mm_tpl_fail(e, -ENOTSUP, "expression kind %d", n->kind);
        break;
    }
    mm_tpl_unref(&a);
    mm_tpl_unref(&b);
    mm_tpl_unref(&c);
    mm_tpl_unref(&d);
    return rc;
}

/* ---- statements ---- */
static int emit(mm_tpl_ectx *e, const char *s, size_t n)
{
    int rc = mm_buf_append(e->out, s, n);
    if (rc == -E2BIG)
        return mm_tpl_fail(e, -E2BIG, "output grew past %zu bytes", e->out_max);
    return rc ? oom(e) : 0;
}

static int assign(evalctx *E, mm_tpl_frame *f, const mm_tpl_node *target, mm_tpl_val *v)
{
    mm_tpl_ectx *e = &E->x;
    int rc = 0;
    if (target->kind == MM_E_NAME)
        return frame_set(e, f, target->name, v);
    if (target->kind == MM_E_NSREF) {
        mm_tpl_val ns;
        if ((rc = lookup(e, f, target->name, &ns))) {
            mm_tpl_unref(v);
            return rc;
        }
        if (ns.kind != MM_TV_NS) {
            mm_tpl_unref(&ns);
            mm_tpl_unref(v);
            return mm_tpl_fail(e, -EINVAL, "cannot assign attribute on non-namespace object");
        }
        mm_tpl_ns *o = ns.u.ns;
        size_t i;
        for (i = 0; i < o->n && strcmp(o->names[i], target->name2); i++)
            ;
        if (i < o->n) {
            mm_tpl_unref(&o->vals[i]);
            o->vals[i] = *v;
        } else {
            if (o->n == o->cap) {
                size_t nc = o->cap ? o->cap * 2 : 8;
                char **nn = realloc(o->names, nc * sizeof(*nn));
                mm_tpl_val *nv = nn ? realloc(o->vals, nc * sizeof(*nv)) : NULL;
                if (nn)
                    o->names = nn;
                if (nv)
                    o->vals = nv;
                if (!nn || !nv) {
                    rc = oom(e);
                    goto ns_out;
                }
                o->cap = nc;
            }
            o->names[o->n] = strdup(target->name2);
            if (!o->names[o->n]) {
                rc = oom(e);
                goto ns_out;
            }
            o->vals[o->n++] = *v;
        }
        v->kind = MM_TV_UNDEF;
    ns_out:
        mm_tpl_unref(v);
        mm_tpl_unref(&ns);
        return rc;
    }
    /* tuple unpacking */
    json_t *items = NULL;
    if (v->kind == MM_TV_JSON && (json_is_array(v->u.j) || json_is_string(v->u.j) ||
                                  json_is_object(v->u.j)))
        rc = mm_tpl_iterate(e, v, &items);
    else
        rc = mm_tpl_fail(e, -EINVAL, "cannot unpack non-iterable %s object", mm_tpl_typename(v));
    mm_tpl_unref(v);
    if (rc)
        return rc;
    if (json_array_size(items) != target->nkids) {
        rc = mm_tpl_fail(e, -EINVAL, "cannot unpack %zu values into %zu names",
                         json_array_size(items), target->nkids);
    } else {
        for (size_t i = 0; i < target->nkids && !rc; i++) {
            mm_tpl_val x = mm_tpl_jv(json_incref(json_array_get(items, i)));
            rc = frame_set(e, f, target->kids[i]->name, &x);
        }
    }
    json_decref(items);
    return rc;
}

/* Run body with output captured into a new string value. */
static int capture(evalctx *E, mm_tpl_frame *f, const mm_tpl_node *body, mm_tpl_val *out)
{
    mm_tpl_ectx *e = &E->x;
    mm_buf buf, *saved = e->out;
    mm_tpl_frame cf = {.parent = f};   /* a block body is a scope of its own */
    mm_buf_init(&buf, e->out_max);
    e->out = &buf;
    int rc = enter_scope(e, &cf, body);
    if (!rc)
        rc = exec_body(E, &cf, body);
    frame_free(&cf);
    e->out = saved;
    if (rc >= 0) {
        rc = 0;
        *out = mm_tpl_str_n(buf.data ? buf.data : "", buf.len);
        if (MM_TPL_OOM(*out))
            rc = oom(e);
    }
    mm_buf_free(&buf);
    return rc;
}

static int apply_chain(evalctx *E, mm_tpl_frame *f, const mm_tpl_node *chain, mm_tpl_val *in,
                       mm_tpl_val *out)
{
    const mm_tpl_val *saved = E->hole;
    E->hole = in;
    int rc = eval(E, f, chain, out);
    E->hole = saved;
    return rc;
}

static int exec_for(evalctx *E, mm_tpl_frame *f, const mm_tpl_node *n)
{
    mm_tpl_ectx *e = &E->x;
    mm_tpl_val it;
    json_t *items = NULL;
    int rc;
    if ((rc = eval(E, f, n->b, &it)))
        return rc;
    e->line = n->line;
    rc = mm_tpl_iterate(e, &it, &items);
    mm_tpl_unref(&it);
    if (rc)
        return rc;
    if (n->e) {
        /* {% for x in xs if cond %}: filter first, so loop.length counts
         * only what passes */
        json_t *kept = json_array();
        size_t i;
        json_t *x;
        if (!kept) {
            rc = oom(e);
            goto out;
        }
        json_array_foreach(items, i, x) {
            mm_tpl_frame tf = {.parent = f};
            mm_tpl_val xv = mm_tpl_jv(json_incref(x)), cv = {0};
            if (++e->iters > MM_TPL_MAX_ITERS)
                rc = mm_tpl_fail(e, -E2BIG, "more than %d loop iterations", MM_TPL_MAX_ITERS);
            if (!rc)
                rc = assign(E, &tf, n->a, &xv);
            else
                mm_tpl_unref(&xv);
            if (!rc)
                rc = eval(E, &tf, n->e, &cv);
            if (!rc && mm_tpl_truthy(&cv) && json_array_append(kept, x))
                rc = oom(e);
            mm_tpl_unref(&cv);
            frame_free(&tf);
            if (rc)
                break;
        }
        json_decref(items);
        items = kept;
        if (rc)
            goto out;
    }
    size_t len = json_array_size(items);
    if (len == 0) {
        if (n->d) {
            mm_tpl_frame ef = {.parent = f};
            rc = enter_scope(e, &ef, n->d);
            if (!rc)
                rc = exec_body(E, &ef, n->d);
            frame_free(&ef);
        }
        goto out;
    }
    mm_tpl_loop *lp = calloc(1, sizeof(*lp));
    if (!lp) {
        rc = oom(e);
        goto out;
    }
    lp->refs = 1;
    lp->items = json_incref(items);
    mm_tpl_val loopv = {.kind = MM_TV_LOOP};
    loopv.u.loop = lp;
    for (size_t i = 0; i < len; i++) {
        mm_tpl_frame it_f = {.parent = f};
        if (++e->iters > MM_TPL_MAX_ITERS) {
            e->line = n->line;
            rc = mm_tpl_fail(e, -E2BIG, "more than %d loop iterations", MM_TPL_MAX_ITERS);
            break;
        }
        lp->index0 = i;
        mm_tpl_val xv = mm_tpl_jv(json_incref(json_array_get(items, i)));
        mm_tpl_val lv = mm_tpl_ref(&loopv);
        rc = frame_set(e, &it_f, "loop", &lv);
        if (!rc)
            rc = assign(E, &it_f, n->a, &xv);
        else
            mm_tpl_unref(&xv);
        if (!rc)
            rc = enter_scope(e, &it_f, n->c);
        if (!rc)
            rc = exec_body(E, &it_f, n->c);
        frame_free(&it_f);
        if (rc == CTL_BREAK) {
            rc = 0;
            break;
        }
        if (rc == CTL_CONTINUE)
            rc = 0;
        if (rc)
            break;
    }
    mm_tpl_unref(&loopv);
out:
    json_decref(items);
    return rc;
}

static int exec_stmt(evalctx *E, mm_tpl_frame *f, const mm_tpl_node *n)
{
    mm_tpl_ectx *e = &E->x;
    mm_tpl_val v = {0}, w = {0};
    int rc = 0;
    e->line = n->line;
    switch (n->kind) {
    case MM_N_BODY:
        return exec_body(E, f, n);
    case MM_N_TEXT:
        return emit(e, n->text, n->text_len);
    case MM_N_OUTPUT:
        if ((rc = eval(E, f, n->a, &v)))
            return rc;
        e->line = n->line;
        if (mm_tpl_is_str(&v))
            rc = emit(e, json_string_value(v.u.j), json_string_length(v.u.j));
        else {
            rc = mm_tpl_str(e, &v, e->out);
            if (rc == -E2BIG)
                rc = mm_tpl_fail(e, -E2BIG, "output grew past %zu bytes", e->out_max);
        }
        break;
    case MM_N_IF:
        if ((rc = eval(E, f, n->a, &v)))
            return rc;
        if (mm_tpl_truthy(&v))
            rc = exec_body(E, f, n->b);
        else if (n->c)
            rc = exec_body(E, f, n->c);
        break;
    case MM_N_FOR:
        return exec_for(E, f, n);
    case MM_N_SET:
        if ((rc = eval(E, f, n->b, &v)))
            return rc;
        e->line = n->line;
        return assign(E, f, n->a, &v);
    case MM_N_SETBLOCK:
        if ((rc = capture(E, f, n->b, &v)))
            return rc;
        if (n->c) {
            rc = apply_chain(E, f, n->c, &v, &w);
            mm_tpl_unref(&v);
            if (rc)
                return rc;
            v = w;
            w.kind = MM_TV_UNDEF;
        }
        e->line = n->line;
        return assign(E, f, n->a, &v);
    case MM_N_MACRO: {
        mm_tpl_func *fn = calloc(1, sizeof(*fn));
        if (!fn)
            return oom(e);
        fn->refs = 1;
        fn->fkind = MM_FN_MACRO;
        fn->name = n->name;
        fn->macro = n;
        v.kind = MM_TV_FUNC;
        v.u.fn = fn;
        return frame_set(e, f, n->name, &v);
    }
    case MM_N_BREAK:
        return CTL_BREAK;
    case MM_N_CONTINUE:
        return CTL_CONTINUE;
    case MM_N_FILTERBLOCK:
        if ((rc = capture(E, f, n->b, &v)) || (rc = apply_chain(E, f, n->a, &v, &w)))
            break;
        e->line = n->line;
        rc = mm_tpl_str(e, &w, e->out);
        break;
    case MM_N_WITH: {
        mm_tpl_frame wf = {.parent = f};
        rc = enter_scope(e, &wf, n->b);
        for (size_t i = 0; i < n->nkids && !rc; i++) {
            mm_tpl_val x;
            if (!(rc = eval(E, f, n->kids[i]->b, &x)))
                rc = assign(E, &wf, n->kids[i]->a, &x);
        }
        if (!rc)
            rc = exec_body(E, &wf, n->b);
        frame_free(&wf);
        return rc;
    }
    default:
        /* the parser only puts statements in bodies */
        return mm_tpl_fail(e, -ENOTSUP, "statement kind %d", n->kind);
    }
    mm_tpl_unref(&v);
    mm_tpl_unref(&w);
    return rc;
}

static int exec_body(evalctx *E, mm_tpl_frame *f, const mm_tpl_node *n)
{
    if (!n)
        return 0;
    if (n->kind != MM_N_BODY)
        return exec_stmt(E, f, n);
    for (size_t i = 0; i < n->nkids; i++) {
        int rc = exec_stmt(E, f, n->kids[i]);
        if (rc)
            return rc;   /* error, or break/continue for the enclosing loop */
    }
    return 0;
}

int mm_tpl_eval_render(const mm_template *t, const json_t *ctx, mm_buf *out, char *err,
                       size_t errlen)
{
    evalctx E;
    mm_tpl_frame root = {0};
    mm_buf buf;
    memset(&E, 0, sizeof(E));
    mm_buf_init(&buf, MM_TPL_MAX_OUTPUT);
    E.x.ctx = ctx;
    E.x.out = &buf;
    E.x.out_max = MM_TPL_MAX_OUTPUT;
    E.x.err = err;
    E.x.errlen = errlen;
    E.x.root = &root;
    E.x.line = 1;
    int rc = enter_scope(&E.x, &root, t->root);
    if (!rc)
        rc = exec_body(&E, &root, t->root);
    if (rc > 0)
        rc = 0;   /* the parser keeps break/continue inside loops */
    if (!rc && buf.len) {
        rc = mm_buf_append(out, buf.data, buf.len);
        if (rc == -E2BIG)
            snprintf(err, errlen, "rendered prompt (%zu bytes) does not fit the output buffer",
                     buf.len);
        else if (rc)
            snprintf(err, errlen, "out of memory");
    }
    frame_free(&root);
    mm_tpl_free_shapes(&E.x);
    mm_buf_free(&buf);
    return rc;
}
