/* template_methods.c: Python methods of str, dict and list values, the loop
 * object's methods, and the global functions a chat template can call.
 *
 * transformers' sandbox (ImmutableSandboxedEnvironment) refuses methods that
 * mutate a list or dict; those are errors here too.  A Python method this
 * engine does not implement is -ENOTSUP rather than "undefined", so the
 * difference shows as an unsupported construct instead of a wrong prompt. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "template_impl.h"

static int oom(mm_tpl_ectx *e)
{
    return mm_tpl_fail(e, -ENOMEM, "out of memory");
}

/* ---- argument binding ---- */
int mm_tpl_bind(mm_tpl_ectx *e, const char *what, const char *spec, const mm_tpl_args *a,
                const mm_tpl_val **slot)
{
    char names[MM_TPL_MAX_PARAMS][24];
    size_t np = 0;
    for (const char *p = spec; *p && np < MM_TPL_MAX_PARAMS;) {
        const char *c = strchr(p, ',');
        size_t l = c ? (size_t)(c - p) : strlen(p);
        if (l >= sizeof(names[0]))
            l = sizeof(names[0]) - 1;
        memcpy(names[np], p, l);
        names[np][l] = '\0';
        np++;
        p += l + (c ? 1 : 0);
        if (!c)
            break;
    }
    for (size_t i = 0; i < MM_TPL_MAX_PARAMS; i++)
        slot[i] = NULL;
    if (a->npos > np)
        return mm_tpl_fail(e, -EINVAL, "%s takes at most %zu argument(s) (%zu given)", what, np,
                           a->npos);
    for (size_t i = 0; i < a->npos; i++)
        slot[i] = &a->pos[i];
    for (size_t k = 0; k < a->nkw; k++) {
        size_t i;
        for (i = 0; i < np && strcmp(names[i], a->kwn[k]); i++)
            ;
        if (i == np)
            return mm_tpl_fail(e, -EINVAL, "%s got an unexpected keyword argument '%s'", what,
                               a->kwn[k]);
        if (slot[i])
            return mm_tpl_fail(e, -EINVAL, "%s got multiple values for argument '%s'", what,
                               a->kwn[k]);
        slot[i] = &a->kwv[k];
    }
    return 0;
}

/* ---- method tables ---- */
enum {
    /* str */
    M_CAPITALIZE, M_COUNT, M_ENDSWITH, M_FIND, M_FORMAT, M_ISALNUM, M_ISALPHA, M_ISDIGIT,
    M_ISLOWER, M_ISSPACE, M_ISUPPER, M_JOIN, M_LOWER, M_LSTRIP, M_REMOVEPREFIX,
    M_REMOVESUFFIX, M_REPLACE, M_RFIND, M_RSPLIT, M_RSTRIP, M_SPLIT, M_SPLITLINES,
    M_STARTSWITH, M_STRIP, M_TITLE, M_UPPER,
    /* dict */
    M_ITEMS, M_KEYS, M_VALUES, M_GET, M_DCOPY,
    /* list */
    M_LCOUNT, M_INDEX, M_LCOPY,
    /* loop */
    M_CYCLE, M_CHANGED,
    /* unsupported but real */
    M_UNSUPPORTED
};

typedef struct mdef {
    const char *name;
    int id;
} mdef;

static const mdef str_methods[] = {
    {"capitalize", M_CAPITALIZE}, {"count", M_COUNT}, {"endswith", M_ENDSWITH},
    {"find", M_FIND}, {"format", M_FORMAT}, {"isalnum", M_ISALNUM}, {"isalpha", M_ISALPHA},
    {"isdigit", M_ISDIGIT}, {"islower", M_ISLOWER}, {"isspace", M_ISSPACE},
    {"isupper", M_ISUPPER}, {"join", M_JOIN}, {"lower", M_LOWER}, {"lstrip", M_LSTRIP},
    {"removeprefix", M_REMOVEPREFIX}, {"removesuffix", M_REMOVESUFFIX},
    {"replace", M_REPLACE}, {"rfind", M_RFIND}, {"rsplit", M_RSPLIT}, {"rstrip", M_RSTRIP},
    {"split", M_SPLIT}, {"splitlines", M_SPLITLINES}, {"startswith", M_STARTSWITH},
    {"strip", M_STRIP}, {"title", M_TITLE}, {"upper", M_UPPER},
    {"casefold", M_UNSUPPORTED}, {"center", M_UNSUPPORTED}, {"encode", M_UNSUPPORTED},
    {"expandtabs", M_UNSUPPORTED}, {"format_map", M_UNSUPPORTED}, {"index", M_UNSUPPORTED},
    {"isascii", M_UNSUPPORTED}, {"isdecimal", M_UNSUPPORTED}, {"isidentifier", M_UNSUPPORTED},
    {"isnumeric", M_UNSUPPORTED}, {"isprintable", M_UNSUPPORTED}, {"istitle", M_UNSUPPORTED},
    {"ljust", M_UNSUPPORTED}, {"maketrans", M_UNSUPPORTED}, {"partition", M_UNSUPPORTED},
    {"rindex", M_UNSUPPORTED}, {"rjust", M_UNSUPPORTED}, {"rpartition", M_UNSUPPORTED},
    {"swapcase", M_UNSUPPORTED}, {"translate", M_UNSUPPORTED}, {"zfill", M_UNSUPPORTED},
    {NULL, 0},
};
static const mdef dict_methods[] = {
    {"items", M_ITEMS}, {"keys", M_KEYS}, {"values", M_VALUES}, {"get", M_GET},
    {"copy", M_DCOPY}, {"fromkeys", M_UNSUPPORTED}, {NULL, 0},
};
static const char *const dict_unsafe[] = {"clear", "pop", "popitem", "setdefault", "update", NULL};
static const mdef list_methods[] = {
    {"count", M_LCOUNT}, {"index", M_INDEX}, {"copy", M_LCOPY}, {NULL, 0},
};
static const char *const list_unsafe[] = {"append", "clear", "extend", "insert", "pop",
                                          "remove", "reverse", "sort", NULL};
static const mdef loop_methods[] = {{"cycle", M_CYCLE}, {"changed", M_CHANGED}, {NULL, 0}};

static int bound(const mm_tpl_val *self, const mdef *m, mm_tpl_val *out)
{
    mm_tpl_func *f = calloc(1, sizeof(*f));
    if (!f)
        return -ENOMEM;
    f->refs = 1;
    f->fkind = MM_FN_METHOD;
    f->id = m->id;
    f->name = m->name;
    f->self = mm_tpl_ref(self);
    memset(out, 0, sizeof(*out));
    out->kind = MM_TV_FUNC;
    out->u.fn = f;
    return 0;
}

int mm_tpl_method_lookup(const mm_tpl_val *self, const char *name, mm_tpl_val *out)
{
    const mdef *tab = NULL;
    const char *const *unsafe = NULL;
    if (self->kind == MM_TV_LOOP)
        tab = loop_methods;
    else if (mm_tpl_is_str(self))
        tab = str_methods;
    else if (mm_tpl_is_dict(self)) {
        tab = dict_methods;
        unsafe = dict_unsafe;
    } else if (mm_tpl_is_list(self)) {
        tab = list_methods;
        unsafe = list_unsafe;
    }
    for (; tab && tab->name; tab++)
        if (!strcmp(tab->name, name))
            return bound(self, tab, out);
    for (; unsafe && *unsafe; unsafe++)
        if (!strcmp(*unsafe, name))
            return -EPERM;
    return -ENOENT;
}

/* ---- str methods ---- */
static int need_str(mm_tpl_ectx *e, const char *what, const mm_tpl_val *v)
{
    if (v->kind == MM_TV_UNDEF)
        return mm_tpl_undef_error(e, v);
    if (!mm_tpl_is_str(v))
        return mm_tpl_fail(e, -EINVAL, "%s: expected a string, got %s", what, mm_tpl_typename(v));
    return 0;
}

static int need_int(mm_tpl_ectx *e, const char *what, const mm_tpl_val *v, long long *out)
{
    if (v->kind == MM_TV_UNDEF)
        return mm_tpl_undef_error(e, v);
    if (!(mm_tpl_is_int(v) || mm_tpl_is_bool(v)))
        return mm_tpl_fail(e, -EINVAL, "%s: expected an integer, got %s", what,
                           mm_tpl_typename(v));
    *out = mm_tpl_intval(v);
    return 0;
}

#define SV(v) json_string_value((v)->u.j)
#define SN(v) json_string_length((v)->u.j)

/* startswith/endswith: a str or a tuple (list) of them. */
static int affix(mm_tpl_ectx *e, const mm_tpl_val *self, const mm_tpl_val *arg, int end,
                 mm_tpl_val *out)
{
    const char *s = SV(self);
    size_t n = SN(self);
    int hit = 0;
    json_t *alts = NULL;
    if (mm_tpl_is_list(arg))
        alts = arg->u.j;
    else {
        int rc = need_str(e, end ? "endswith" : "startswith", arg);
        if (rc)
            return rc;
    }
    size_t cnt = alts ? json_array_size(alts) : 1;
    for (size_t i = 0; i < cnt && !hit; i++) {
        json_t *p = alts ? json_array_get(alts, i) : arg->u.j;
        if (!json_is_string(p))
            return mm_tpl_fail(e, -EINVAL, "%s: tuple items must be str",
                               end ? "endswith" : "startswith");
        size_t pn = json_string_length(p);
        hit = pn <= n && !memcmp(end ? s + n - pn : s, json_string_value(p), pn);
    }
    *out = mm_tpl_bool(hit);
    return 0;
}

static int str_find(mm_tpl_ectx *e, const mm_tpl_val *self, const mm_tpl_val *sub, int right,
                    mm_tpl_val *out)
{
    int rc = need_str(e, right ? "rfind" : "find", sub);
    if (rc)
        return rc;
    const char *s = SV(self), *p = SV(sub);
    size_t n = SN(self), pn = SN(sub);
    long long at = -1;
    if (pn <= n) {
        if (!right) {
            const char *h = memmem(s, n, p, pn);
            if (h)
                at = (long long)mm_tpl_u8_len(s, (size_t)(h - s));
        } else {
            for (size_t i = n - pn + 1; i-- > 0;)
                if (!memcmp(s + i, p, pn)) {
                    at = (long long)mm_tpl_u8_len(s, i);
                    break;
                }
        }
    }
    *out = mm_tpl_int(at);
    return 0;
}

static int str_count(mm_tpl_ectx *e, const mm_tpl_val *self, const mm_tpl_val *sub,
                     mm_tpl_val *out)
{
    int rc = need_str(e, "count", sub);
    if (rc)
        return rc;
    const char *s = SV(self), *p = SV(sub);
    size_t n = SN(self), pn = SN(sub);
    long long k = 0;
    if (pn == 0)
        k = (long long)mm_tpl_u8_len(s, n) + 1;
    else
        for (size_t i = 0; i + pn <= n;) {
            const char *h = memmem(s + i, n - i, p, pn);
            if (!h)
                break;
            k++;
            i = (size_t)(h - s) + pn;
        }
    *out = mm_tpl_int(k);
    return 0;
}

/* str.join(iterable): every item must be a str, as in Python. */
static int str_join(mm_tpl_ectx *e, const mm_tpl_val *self, const mm_tpl_val *it,
                    mm_tpl_val *out)
{
    json_t *items;
    int rc = mm_tpl_iterate(e, it, &items);
    if (rc)
        return rc;
    mm_buf b;
    mm_buf_init(&b, MM_TPL_MAX_OUTPUT);
    size_t i;
    json_t *v;
    json_array_foreach(items, i, v) {
        if (!json_is_string(v)) {
            rc = mm_tpl_fail(e, -EINVAL, "sequence item %zu: expected str instance, %s found",
                             i, json_is_integer(v) ? "int" : "non-string");
            break;
        }
        if ((i && mm_buf_append(&b, SV(self), SN(self))) ||
            mm_buf_append(&b, json_string_value(v), json_string_length(v))) {
            rc = mm_tpl_fail(e, -E2BIG, "a string grew past %u bytes", MM_TPL_MAX_OUTPUT);
            break;
        }
    }
    if (!rc) {
        *out = mm_tpl_str_n(b.data ? b.data : "", b.len);
        if (MM_TPL_OOM(*out))
            rc = oom(e);
    }
    mm_buf_free(&b);
    json_decref(items);
    return rc;
}

/* str.splitlines(keepends=False), Python's line boundaries. */
int mm_tpl_splitlines(mm_tpl_ectx *e, const char *s, size_t n, int keepends, mm_tpl_val *out)
{
    json_t *l = json_array();
    if (!l)
        return oom(e);
    size_t start = 0, i = 0;
    while (i < n) {
        uint32_t c;
        size_t k = mm_tpl_u8_dec(s, n, i, &c);
        int brk = c == '\n' || c == '\r' || c == 0x0B || c == 0x0C || c == 0x1C || c == 0x1D ||
                  c == 0x1E || c == 0x85 || c == 0x2028 || c == 0x2029;
        if (!brk) {
            i += k;
            continue;
        }
        size_t eol = i;
        i += k;
        if (c == '\r' && i < n && s[i] == '\n')
            i++;
        if (json_array_append_new(l, json_stringn_nocheck(s + start, (keepends ? i : eol) - start))) {
            json_decref(l);
            return oom(e);
        }
        start = i;
    }
    if (start < n && json_array_append_new(l, json_stringn_nocheck(s + start, n - start))) {
        json_decref(l);
        return oom(e);
    }
    *out = mm_tpl_jv(l);
    return 0;
}

/* str.format with plain fields: {} {0} {name}, and {{ }}.  A format spec,
 * conversion or attribute in a field is unsupported. */
static int str_format(mm_tpl_ectx *e, const mm_tpl_val *self, const mm_tpl_args *a,
                      mm_tpl_val *out)
{
    const char *s = SV(self);
    size_t n = SN(self), auto_idx = 0;
    mm_buf b;
    int rc = 0;
    mm_buf_init(&b, MM_TPL_MAX_OUTPUT);
    for (size_t i = 0; i < n && !rc; i++) {
        if (s[i] == '{' && i + 1 < n && s[i + 1] == '{') {
            rc = mm_buf_append(&b, "{", 1) ? oom(e) : 0;
            i++;
            continue;
        }
        if (s[i] == '}' && i + 1 < n && s[i + 1] == '}') {
            rc = mm_buf_append(&b, "}", 1) ? oom(e) : 0;
            i++;
            continue;
        }
        if (s[i] == '}') {
            rc = mm_tpl_fail(e, -EINVAL, "Single '}' encountered in format string");
            break;
        }
        if (s[i] != '{') {
            rc = mm_buf_append(&b, s + i, 1) ? oom(e) : 0;
            continue;
        }
        const char *close = memchr(s + i, '}', n - i);
        if (!close) {
            rc = mm_tpl_fail(e, -EINVAL, "Single '{' encountered in format string");
            break;
        }
        size_t fl = (size_t)(close - (s + i + 1));
        const char *field = s + i + 1;
        const mm_tpl_val *v = NULL;
        if (memchr(field, ':', fl) || memchr(field, '!', fl) || memchr(field, '.', fl) ||
            memchr(field, '[', fl)) {
            rc = mm_tpl_fail(e, -ENOTSUP, "str.format field '{%.*s}'", (int)fl, field);
            break;
        }
        if (fl == 0) {
            if (auto_idx < a->npos)
                v = &a->pos[auto_idx++];
        } else if (field[0] >= '0' && field[0] <= '9') {
            size_t idx = 0;
            for (size_t k = 0; k < fl; k++)
                idx = idx * 10 + (size_t)(field[k] - '0');
            if (idx < a->npos)
                v = &a->pos[idx];
        } else {
            for (size_t k = 0; k < a->nkw; k++)
                if (strlen(a->kwn[k]) == fl && !memcmp(a->kwn[k], field, fl))
                    v = &a->kwv[k];
        }
        if (!v) {
            rc = mm_tpl_fail(e, -EINVAL, "str.format: no argument for '{%.*s}'", (int)fl, field);
            break;
        }
        rc = mm_tpl_str(e, v, &b);
        i += fl + 1;
    }
    if (!rc) {
        *out = mm_tpl_str_n(b.data ? b.data : "", b.len);
        if (MM_TPL_OOM(*out))
            rc = oom(e);
    }
    mm_buf_free(&b);
    return rc;
}

/* isalpha & co.: at least one character, all of the class. */
static int str_is(const char *s, size_t n, int id)
{
    int any = 0, cased = 0;
    for (size_t i = 0; i < n;) {
        uint32_t c;
        i += mm_tpl_u8_dec(s, n, i, &c);
        any = 1;
        int lo = mm_tpl_py_upper(c) != c, up = mm_tpl_py_lower(c) != c;
        int digit = c >= '0' && c <= '9';
        switch (id) {
        case M_ISSPACE:
            if (!mm_tpl_py_isspace(c))
                return 0;
            break;
        case M_ISDIGIT:
            if (!digit)
                return 0;
            break;
        case M_ISALPHA:
            if (!mm_tpl_py_isalpha(c))
                return 0;
            break;
        case M_ISALNUM:
            if (!digit && !mm_tpl_py_isalpha(c))
                return 0;
            break;
        case M_ISLOWER:
            if (up)
                return 0;
            cased |= lo;
            break;
        case M_ISUPPER:
            if (lo)
                return 0;
            cased |= up;
            break;
        default:
            break;
        }
    }
    if (id == M_ISLOWER || id == M_ISUPPER)
        return cased;
    return any;
}

static int str_method(mm_tpl_ectx *e, const mm_tpl_func *f, const mm_tpl_args *a,
                      mm_tpl_val *out)
{
    const mm_tpl_val *self = &f->self, *s[MM_TPL_MAX_PARAMS];
    const char *p = SV(self);
    size_t n = SN(self);
    long long num = -1;
    char what[48];
    int rc;
    snprintf(what, sizeof(what), "str.%s()", f->name);
    switch (f->id) {
    case M_FORMAT:
        return str_format(e, self, a, out);
    case M_STRIP:
    case M_LSTRIP:
    case M_RSTRIP:
        if ((rc = mm_tpl_bind(e, what, "chars", a, s)))
            return rc;
        return mm_tpl_strip(e, p, n, s[0], f->id != M_RSTRIP, f->id != M_LSTRIP, out);
    case M_SPLIT:
    case M_RSPLIT:
        if ((rc = mm_tpl_bind(e, what, "sep,maxsplit", a, s)))
            return rc;
        if (s[1] && (rc = need_int(e, what, s[1], &num)))
            return rc;
        return mm_tpl_split(e, p, n, s[0], num, f->id == M_RSPLIT, out);
    case M_SPLITLINES:
        if ((rc = mm_tpl_bind(e, what, "keepends", a, s)))
            return rc;
        return mm_tpl_splitlines(e, p, n, s[0] && mm_tpl_truthy(s[0]), out);
    case M_STARTSWITH:
    case M_ENDSWITH:
        if ((rc = mm_tpl_bind(e, what, "prefix", a, s)))
            return rc;
        if (!s[0])
            return mm_tpl_fail(e, -EINVAL, "%s takes exactly one argument", what);
        return affix(e, self, s[0], f->id == M_ENDSWITH, out);
    case M_FIND:
    case M_RFIND:
        if ((rc = mm_tpl_bind(e, what, "sub", a, s)))
            return rc;
        if (!s[0])
            return mm_tpl_fail(e, -EINVAL, "%s takes at least 1 argument", what);
        return str_find(e, self, s[0], f->id == M_RFIND, out);
    case M_COUNT:
        if ((rc = mm_tpl_bind(e, what, "sub", a, s)))
            return rc;
        if (!s[0])
            return mm_tpl_fail(e, -EINVAL, "%s takes at least 1 argument", what);
        return str_count(e, self, s[0], out);
    case M_REPLACE:
        if ((rc = mm_tpl_bind(e, what, "old,new,count", a, s)))
            return rc;
        if (!s[0] || !s[1])
            return mm_tpl_fail(e, -EINVAL, "%s takes at least 2 arguments", what);
        if ((rc = need_str(e, what, s[0])) || (rc = need_str(e, what, s[1])))
            return rc;
        if (s[2] && (rc = need_int(e, what, s[2], &num)))
            return rc;
        return mm_tpl_replace(e, p, n, SV(s[0]), SN(s[0]), SV(s[1]), SN(s[1]), num, out);
    case M_REMOVEPREFIX:
    case M_REMOVESUFFIX: {
        if ((rc = mm_tpl_bind(e, what, "affix", a, s)))
            return rc;
        if (!s[0])
            return mm_tpl_fail(e, -EINVAL, "%s takes exactly one argument", what);
        if ((rc = need_str(e, what, s[0])))
            return rc;
        size_t an = SN(s[0]);
        int pre = f->id == M_REMOVEPREFIX;
        if (an <= n && !memcmp(pre ? p : p + n - an, SV(s[0]), an))
            *out = mm_tpl_str_n(pre ? p + an : p, n - an);
        else
            *out = mm_tpl_ref(self);
        return MM_TPL_OOM(*out) ? oom(e) : 0;
    }
    case M_JOIN:
        if ((rc = mm_tpl_bind(e, what, "iterable", a, s)))
            return rc;
        if (!s[0])
            return mm_tpl_fail(e, -EINVAL, "%s takes exactly one argument", what);
        return str_join(e, self, s[0], out);
    case M_LOWER:
    case M_UPPER:
    case M_TITLE:
    case M_CAPITALIZE:
        if ((rc = mm_tpl_bind(e, what, "", a, s)))
            return rc;
        return mm_tpl_case(e, p, n, f->id == M_LOWER ? MM_CASE_LOWER : f->id == M_UPPER
                           ? MM_CASE_UPPER : f->id == M_TITLE ? MM_CASE_TITLE
                           : MM_CASE_CAPITALIZE, out);
    case M_ISALNUM:
    case M_ISALPHA:
    case M_ISDIGIT:
    case M_ISLOWER:
    case M_ISSPACE:
    case M_ISUPPER:
        if ((rc = mm_tpl_bind(e, what, "", a, s)))
            return rc;
        *out = mm_tpl_bool(str_is(p, n, f->id));
        return 0;
    default:
        return mm_tpl_fail(e, -ENOTSUP, "the string method '%s'", f->name);
    }
}

/* ---- dict, list and loop methods ---- */
static int dict_items(mm_tpl_ectx *e, const json_t *d, int what, mm_tpl_val *out)
{
    json_t *l = json_array();
    const char *k;
    json_t *v;
    if (!l)
        return oom(e);
    json_object_foreach((json_t *)d, k, v) {
        json_t *x;
        if (what == M_KEYS)
            x = json_string_nocheck(k);
        else if (what == M_VALUES)
            x = json_incref(v);
        else
            x = json_pack("[sO]", k, v);
        if (json_array_append_new(l, x)) {
            json_decref(l);
            return oom(e);
        }
        if (what == M_ITEMS && mm_tpl_mark(e, x, MM_SHAPE_TUPLE, NULL)) {
            json_decref(l);
            return -ENOMEM;
        }
    }
    *out = mm_tpl_jv(l);
    return 0;
}

int mm_tpl_dict_items(mm_tpl_ectx *e, const json_t *d, mm_tpl_val *out)
{
    return dict_items(e, d, M_ITEMS, out);
}

/* d.items() / keys() / values(): views, printed as dict_items([...]) */
static int dict_view(mm_tpl_ectx *e, const json_t *d, int what, mm_tpl_val *out)
{
    int rc = dict_items(e, d, what, out);
    if (rc)
        return rc;
    int shape = what == M_ITEMS ? MM_SHAPE_ITEMS : what == M_KEYS ? MM_SHAPE_KEYS : MM_SHAPE_VALUES;
    if (mm_tpl_mark(e, out->u.j, shape, NULL)) {
        mm_tpl_unref(out);
        return -ENOMEM;
    }
    return 0;
}

int mm_tpl_str_cased(const char *s, size_t n, int upper)
{
    return str_is(s, n, upper ? M_ISUPPER : M_ISLOWER);
}

static int other_method(mm_tpl_ectx *e, const mm_tpl_func *f, const mm_tpl_args *a,
                        mm_tpl_val *out)
{
    const mm_tpl_val *self = &f->self, *s[MM_TPL_MAX_PARAMS];
    char what[48];
    int rc;
    snprintf(what, sizeof(what), "%s.%s()", mm_tpl_typename(self), f->name);
    switch (f->id) {
    case M_ITEMS:
    case M_KEYS:
    case M_VALUES:
        if ((rc = mm_tpl_bind(e, what, "", a, s)))
            return rc;
        return dict_view(e, self->u.j, f->id, out);
    case M_GET:
        if ((rc = mm_tpl_bind(e, what, "key,default", a, s)))
            return rc;
        if (!s[0])
            return mm_tpl_fail(e, -EINVAL, "get expected at least 1 argument, got 0");
        if (mm_tpl_is_str(s[0])) {
            json_t *v = json_object_get(self->u.j, SV(s[0]));
            if (v) {
                *out = mm_tpl_jv(json_incref(v));
                return 0;
            }
        } else if (mm_tpl_is_list(s[0]) || mm_tpl_is_dict(s[0])) {
            return mm_tpl_fail(e, -EINVAL, "unhashable type: '%s'", mm_tpl_typename(s[0]));
        }
        *out = s[1] ? mm_tpl_ref(s[1]) : mm_tpl_none();
        return 0;
    case M_DCOPY:
    case M_LCOPY:
        if ((rc = mm_tpl_bind(e, what, "", a, s)))
            return rc;
        *out = mm_tpl_jv(json_copy(self->u.j));
        return MM_TPL_OOM(*out) ? oom(e) : 0;
    case M_LCOUNT:
    case M_INDEX: {
        if ((rc = mm_tpl_bind(e, what, "value", a, s)))
            return rc;
        if (!s[0])
            return mm_tpl_fail(e, -EINVAL, "%s takes exactly one argument", what);
        size_t i;
        json_t *v;
        long long k = 0;
        json_array_foreach(self->u.j, i, v) {
            if (s[0]->kind == MM_TV_JSON && mm_tpl_json_eq(v, s[0]->u.j)) {
                if (f->id == M_INDEX) {
                    *out = mm_tpl_int((long long)i);
                    return 0;
                }
                k++;
            }
        }
        if (f->id == M_INDEX)
            return mm_tpl_fail(e, -EINVAL, "list.index(x): x not in list");
        *out = mm_tpl_int(k);
        return 0;
    }
    case M_CYCLE:
        if (a->nkw)
            return mm_tpl_fail(e, -EINVAL, "loop.cycle() takes no keyword arguments");
        if (!a->npos)
            return mm_tpl_fail(e, -EINVAL, "no items for cycling given");
        *out = mm_tpl_ref(&a->pos[self->u.loop->index0 % a->npos]);
        return 0;
    case M_CHANGED: {
        json_t *now = json_array();
        if (!now)
            return oom(e);
        for (size_t i = 0; i < a->npos; i++) {
            json_t *j;
            if ((rc = mm_tpl_to_json(e, &a->pos[i], &j))) {
                json_decref(now);
                return rc;
            }
            json_array_append_new(now, j);
        }
        mm_tpl_loop *l = self->u.loop;
        int changed = !l->changed_last || !mm_tpl_json_eq(l->changed_last, now);
        json_decref(l->changed_last);
        l->changed_last = now;
        *out = mm_tpl_bool(changed);
        return 0;
    }
    default:
        return mm_tpl_fail(e, -ENOTSUP, "the %s method '%s'", mm_tpl_typename(self), f->name);
    }
}

int mm_tpl_call_method(mm_tpl_ectx *e, const mm_tpl_func *f, const mm_tpl_args *a,
                       mm_tpl_val *out)
{
    if (mm_tpl_is_str(&f->self))
        return str_method(e, f, a, out);
    return other_method(e, f, a, out);
}

/* ---- globals ---- */
enum { G_RANGE, G_NAMESPACE, G_DICT, G_RAISE, G_STRFTIME, G_UNSUPPORTED };
static const mdef globals[] = {
    {"range", G_RANGE}, {"namespace", G_NAMESPACE}, {"dict", G_DICT},
    {"raise_exception", G_RAISE}, {"strftime_now", G_STRFTIME},
    {"lipsum", G_UNSUPPORTED}, {"cycler", G_UNSUPPORTED}, {"joiner", G_UNSUPPORTED},
    {NULL, 0},
};

int mm_tpl_global_lookup(const char *name, mm_tpl_val *out)
{
    for (const mdef *g = globals; g->name; g++)
        if (!strcmp(g->name, name)) {
            mm_tpl_func *f = calloc(1, sizeof(*f));
            if (!f)
                return -ENOMEM;
            f->refs = 1;
            f->fkind = MM_FN_GLOBAL;
            f->id = g->id;
            f->name = g->name;
            memset(out, 0, sizeof(*out));
            out->kind = MM_TV_FUNC;
            out->u.fn = f;
            return 0;
        }
    return -ENOENT;
}

static int ns_put(mm_tpl_ectx *e, mm_tpl_ns *ns, const char *name, const mm_tpl_val *v)
{
    for (size_t i = 0; i < ns->n; i++)
        if (!strcmp(ns->names[i], name)) {
            mm_tpl_unref(&ns->vals[i]);
            ns->vals[i] = mm_tpl_ref(v);
            return 0;
        }
    if (ns->n == ns->cap) {
        size_t nc = ns->cap ? ns->cap * 2 : 8;
        char **nn = realloc(ns->names, nc * sizeof(*nn));
        if (!nn)
            return oom(e);
        ns->names = nn;
        mm_tpl_val *nv = realloc(ns->vals, nc * sizeof(*nv));
        if (!nv)
            return oom(e);
        ns->vals = nv;
        ns->cap = nc;
    }
    ns->names[ns->n] = strdup(name);
    if (!ns->names[ns->n])
        return oom(e);
    ns->vals[ns->n++] = mm_tpl_ref(v);
    return 0;
}

/* namespace(...) and dict(...): an optional mapping, then keywords. */
static int make_mapping(mm_tpl_ectx *e, const char *what, const mm_tpl_args *a, int ns,
                        mm_tpl_val *out)
{
    int rc = 0;
    if (a->npos > 1)
        return mm_tpl_fail(e, -EINVAL, "%s expected at most 1 argument, got %zu", what, a->npos);
    if (a->npos && !mm_tpl_is_dict(&a->pos[0]))
        return mm_tpl_fail(e, -ENOTSUP, "%s from a %s", what, mm_tpl_typename(&a->pos[0]));
    if (ns) {
        mm_tpl_ns *o = calloc(1, sizeof(*o));
        if (!o)
            return oom(e);
        o->refs = 1;
        mm_tpl_val v = {.kind = MM_TV_NS};
        v.u.ns = o;
        if (a->npos) {
            const char *k;
            json_t *x;
            json_object_foreach(a->pos[0].u.j, k, x) {
                mm_tpl_val xv = mm_tpl_jv(json_incref(x));
                rc = ns_put(e, o, k, &xv);
                mm_tpl_unref(&xv);
                if (rc)
                    break;
            }
        }
        for (size_t i = 0; i < a->nkw && !rc; i++)
            rc = ns_put(e, o, a->kwn[i], &a->kwv[i]);
        if (rc) {
            mm_tpl_unref(&v);
            return rc;
        }
        *out = v;
        return 0;
    }
    json_t *d = a->npos ? json_copy(a->pos[0].u.j) : json_object();
    if (!d)
        return oom(e);
    for (size_t i = 0; i < a->nkw && !rc; i++) {
        json_t *j;
        if (!(rc = mm_tpl_to_json(e, &a->kwv[i], &j)) && json_object_set_new(d, a->kwn[i], j))
            rc = oom(e);
    }
    if (rc) {
        json_decref(d);
        return rc;
    }
    *out = mm_tpl_jv(d);
    return 0;
}

#define MAX_RANGE 100000   /* Jinja's sandbox limit */

int mm_tpl_call_global(mm_tpl_ectx *e, const mm_tpl_func *f, const mm_tpl_args *a,
                       mm_tpl_val *out)
{
    int rc;
    switch (f->id) {
    case G_RANGE: {
        long long v[3] = {0, 0, 1};
        if (a->nkw)
            return mm_tpl_fail(e, -EINVAL, "range() takes no keyword arguments");
        if (a->npos < 1 || a->npos > 3)
            return mm_tpl_fail(e, -EINVAL, "range expected 1 to 3 arguments, got %zu", a->npos);
        for (size_t i = 0; i < a->npos; i++)
            if ((rc = need_int(e, "range()", &a->pos[i], &v[a->npos == 1 ? 1 : i])))
                return rc;
        if (v[2] == 0)
            return mm_tpl_fail(e, -EINVAL, "range() arg 3 must not be zero");
        long long cnt = v[2] > 0 ? (v[1] > v[0] ? (v[1] - v[0] + v[2] - 1) / v[2] : 0)
                                 : (v[0] > v[1] ? (v[0] - v[1] - v[2] - 1) / -v[2] : 0);
        if (cnt > MAX_RANGE)
            return mm_tpl_fail(e, -E2BIG, "range too big: the sandbox allows %d items",
                               MAX_RANGE);
        json_t *l = json_array();
        if (!l)
            return oom(e);
        for (long long i = 0; i < cnt; i++)
            if (json_array_append_new(l, json_integer(v[0] + i * v[2]))) {
                json_decref(l);
                return oom(e);
            }
        if (mm_tpl_mark(e, l, MM_SHAPE_RANGE, v)) {
            json_decref(l);
            return -ENOMEM;
        }
        *out = mm_tpl_jv(l);
        return 0;
    }
    case G_NAMESPACE:
        return make_mapping(e, "namespace()", a, 1, out);
    case G_DICT:
        return make_mapping(e, "dict()", a, 0, out);
    case G_RAISE: {
        /* the template's own message, verbatim: it is meant for the user */
        mm_buf b;
        mm_buf_init(&b, 4096);
        rc = a->npos ? mm_tpl_str(e, &a->pos[0], &b) : 0;
        if (rc == -E2BIG)
            rc = 0;   /* a truncated message is still the message */
        if (!rc && !e->have_err) {
            e->have_err = 1;
            snprintf(e->err, e->errlen, "%s", b.data ? b.data : "");
        }
        mm_buf_free(&b);
        return rc ? rc : -EBADMSG;
    }
    case G_STRFTIME: {
        const mm_tpl_val *s[MM_TPL_MAX_PARAMS];
        if ((rc = mm_tpl_bind(e, "strftime_now()", "format", a, s)))
            return rc;
        if (!s[0])
            return mm_tpl_fail(e, -EINVAL, "strftime_now() takes exactly one argument");
        if ((rc = need_str(e, "strftime_now()", s[0])))
            return rc;
        char buf[512];
        time_t now = time(NULL);
        struct tm tm;
        localtime_r(&now, &tm);
        size_t n = strftime(buf, sizeof(buf), SV(s[0]), &tm);
        if (n == 0 && SN(s[0]) > 0)
            return mm_tpl_fail(e, -ENOTSUP, "strftime_now() format giving more than %zu bytes",
                               sizeof(buf));
        *out = mm_tpl_str_n(buf, n);
        return MM_TPL_OOM(*out) ? oom(e) : 0;
    }
    default:
        return mm_tpl_fail(e, -ENOTSUP, "the global function '%s'", f->name);
    }
}
