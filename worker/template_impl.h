/* template_impl.h: what the template_*.c files share (not a public API).
 *
 * Pipeline: template_lex.c turns the source into tokens (Jinja's whitespace
 * rules live there), template_parse.c builds the AST, template_eval.c walks
 * it over values from template_value.c, calling builtins in
 * template_filters.c (filters and tests) and template_methods.c (methods and
 * global functions).  template.c owns the arena and the public entry points. */
#ifndef MM_TEMPLATE_IMPL_H
#define MM_TEMPLATE_IMPL_H
#include <jansson.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include "buf.h"
#include "template.h"

/* ---- arena: every token and AST node lives as long as the template ---- */
typedef struct mm_tpl_arena {
    struct mm_tpl_chunk *head;
} mm_tpl_arena;

void *mm_tpl_alloc(mm_tpl_arena *a, size_t n);           /* zeroed; NULL on ENOMEM */
char *mm_tpl_strndup(mm_tpl_arena *a, const char *s, size_t n);
void  mm_tpl_arena_free(mm_tpl_arena *a);

/* ---- tokens ---- */
enum {
    MM_TK_EOF, MM_TK_DATA, MM_TK_VAR_BEGIN, MM_TK_VAR_END, MM_TK_BLOCK_BEGIN,
    MM_TK_BLOCK_END, MM_TK_NAME, MM_TK_STRING, MM_TK_INT, MM_TK_FLOAT, MM_TK_OP
};
/* Operators are their character; these are the two-character ones. */
enum { MM_OP_FLOORDIV = 256, MM_OP_POW, MM_OP_EQ, MM_OP_NE, MM_OP_LE, MM_OP_GE,
       /* not tokens: comparison kinds of the AST */
       MM_OP_LT, MM_OP_GT, MM_OP_IN, MM_OP_NOTIN, MM_OP_AND, MM_OP_OR, MM_OP_CONCAT };

typedef struct mm_tpl_token {
    int type;
    int op;
    int line;
    const char *s;   /* DATA, NAME, STRING: decoded text in the arena */
    size_t n;
    long long i;     /* INT */
    double d;        /* FLOAT */
} mm_tpl_token;

typedef struct mm_tpl_tokens {
    mm_tpl_token *v;
    size_t n, cap;
} mm_tpl_tokens;

/* 0, -EINVAL (syntax), -ENOMEM.  Tokens and their text go to the arena. */
int mm_tpl_lex(const char *src, size_t len, mm_tpl_arena *a, mm_tpl_tokens *out,
               char *err, size_t errlen);

/* ---- AST ---- */
enum {
    /* statements */
    MM_N_BODY, MM_N_TEXT, MM_N_OUTPUT, MM_N_IF, MM_N_FOR, MM_N_SET, MM_N_SETBLOCK,
    MM_N_MACRO, MM_N_BREAK, MM_N_CONTINUE, MM_N_FILTERBLOCK, MM_N_WITH,
    /* expressions */
    MM_E_CONST, MM_E_NAME, MM_E_LIST, MM_E_TUPLE, MM_E_DICT, MM_E_ATTR, MM_E_ITEM,
    MM_E_SLICE, MM_E_CALL, MM_E_FILTER, MM_E_TEST, MM_E_NOT, MM_E_NEG, MM_E_POS,
    MM_E_BIN, MM_E_CMP, MM_E_COND, MM_E_NSREF, MM_E_PARAM
};

typedef struct mm_tpl_node mm_tpl_node;
struct mm_tpl_node {
    int kind;
    int op;              /* MM_E_BIN operator; MM_E_TEST: negated */
    int line;
    const char *name;    /* names: variable, attribute, filter, test, macro */
    const char *name2;   /* MM_E_NSREF: the attribute */
    const char *text;    /* MM_N_TEXT */
    size_t text_len;
    json_t *value;       /* MM_E_CONST (owned by the template's const list) */
    mm_tpl_node *a, *b, *c, *d, *e;
    mm_tpl_node **kids;  /* bodies, list items, call arguments, dict k,v,k,v */
    const char **kwnames;/* per call argument: keyword or NULL */
    int *ops;            /* MM_E_CMP: operator per kid */
    size_t nkids;
    /* A body that opens a scope: names that start out undefined there (see
     * template_scope.c), bound on entry so outer values do not show. */
    const char **undef;
    size_t nundef;
};
/* Field use per kind:
 *   N_BODY kids | N_TEXT text | N_OUTPUT a | N_IF a=cond b=then c=else
 *   N_FOR a=target b=iter c=body d=else e=filter | N_SET a=target b=value
 *   N_SETBLOCK a=target b=body c=filter chain (input is E_CONST NULL)
 *   N_MACRO name kids=E_PARAM(name, a=default) b=body
 *   N_FILTERBLOCK a=filter chain b=body | N_WITH kids=N_SET b=body
 *   E_ATTR a.name | E_ITEM a[b] | E_SLICE a[b:c:d] | E_CALL a(kids)
 *   E_FILTER a|name(kids) | E_TEST a is [not] name(kids) | E_BIN a op b
 *   E_CMP a ops[i] kids[i] ... | E_COND b if a else c | E_NSREF name.name2
 * An N_IF made from {% elif %} has op = 1. */

struct mm_template {
    mm_tpl_arena arena;
    mm_tpl_node *root;
    json_t **consts;
    size_t nconsts, cap;
};

/* 0, -EINVAL (syntax), -ENOTSUP (known but unimplemented construct),
 * -E2BIG (nesting), -ENOMEM. */
int mm_tpl_parse(mm_template *t, const mm_tpl_tokens *toks, char *err, size_t errlen);

/* Jinja's static scoping, computed after parsing: fills the undef lists. */
int mm_tpl_scope(mm_template *t, char *err, size_t errlen);

/* Filter and test names this engine implements (compile-time checks). */
int mm_tpl_has_filter(const char *name);
int mm_tpl_has_test(const char *name);
/* Names of Jinja filters and tests that exist but are unsupported here. */
int mm_tpl_known_filter(const char *name);
int mm_tpl_known_test(const char *name);

/* ---- values ---- */
enum { MM_TV_UNDEF, MM_TV_JSON, MM_TV_NS, MM_TV_LOOP, MM_TV_FUNC, MM_TV_ITER };

typedef struct mm_tpl_ns mm_tpl_ns;
typedef struct mm_tpl_iter mm_tpl_iter;
typedef struct mm_tpl_loop mm_tpl_loop;
typedef struct mm_tpl_func mm_tpl_func;

typedef struct mm_tpl_val {
    int kind;
    union {
        json_t *j;
        mm_tpl_ns *ns;
        mm_tpl_loop *loop;
        mm_tpl_func *fn;
        mm_tpl_iter *it;
    } u;
    /* MM_TV_UNDEF: why it is undefined, for the error when it is used. */
    const char *uname;   /* the missing name (NULL: see uhint) */
    const char *uowner;  /* container type ("dict", ...); NULL: a variable */
    const char *uhint;   /* full message instead, when set */
} mm_tpl_val;

struct mm_tpl_ns {
    int refs;
    size_t n, cap;
    char **names;
    mm_tpl_val *vals;
};

struct mm_tpl_loop {
    int refs;
    json_t *items;       /* the (filtered) sequence */
    size_t index0;
    json_t *changed_last;/* loop.changed() state */
};

/* A Python iterator (what map, select, items, unique, reverse return):
 * always true, not printable, and used up by iterating it. */
struct mm_tpl_iter {
    int refs;
    json_t *items;
    size_t pos;              /* items before pos are consumed */
    const char *pyname;      /* "generator", "list_reverseiterator", ... */
    /* Generators fail lazily: a filter given a non-iterable raises only when
     * its result is iterated.  err_fmt (with err_arg for %s) is that error. */
    const char *err_fmt, *err_arg;
};

enum { MM_FN_GLOBAL, MM_FN_METHOD, MM_FN_MACRO };
struct mm_tpl_func {
    int refs;
    int fkind;
    int id;                  /* global or method id (template_methods.c) */
    const char *name;        /* for messages */
    mm_tpl_val self;         /* bound object of a method */
    const mm_tpl_node *macro;
};

/* The render state.  Errors are recorded once, with the line being run. */
typedef struct mm_tpl_frame mm_tpl_frame;
typedef struct mm_tpl_ectx {
    const json_t *ctx;
    mm_buf *out;            /* where output goes now */
    size_t out_max;
    char *err;
    size_t errlen;
    int have_err;
    int line;
    int calls;
    unsigned long iters;
    mm_tpl_frame *root;
    /* Lists that are really other Python sequences (tuples, dict views,
     * ranges), see mm_tpl_mark.  Each holds a reference to the end of the
     * render, so a pointer cannot be reused for another list meanwhile. */
    struct mm_tpl_shape *shapes;
    size_t nshapes, capshapes;
    size_t *shape_hash;      /* open addressing: index + 1, 0 empty */
    size_t shape_hashcap;
} mm_tpl_ectx;

enum { MM_SHAPE_LIST, MM_SHAPE_TUPLE, MM_SHAPE_ITEMS, MM_SHAPE_KEYS, MM_SHAPE_VALUES,
       MM_SHAPE_RANGE };
typedef struct mm_tpl_shape {
    json_t *l;
    int kind;
    long long range[3];
} mm_tpl_shape;
/* Record that list l (fresh, not shared) is a tuple, dict view or range:
 * it prints, concatenates and serializes as Python's would.  0 or -ENOMEM. */
int mm_tpl_mark(mm_tpl_ectx *e, json_t *l, int kind, const long long *range);
int mm_tpl_shape_of(const mm_tpl_ectx *e, const json_t *l, const long long **range);
const char *mm_tpl_shape_name(int kind);
void mm_tpl_free_shapes(mm_tpl_ectx *e);
/* Wrap items (reference taken) as an iterator value. */
int mm_tpl_iter_new(mm_tpl_ectx *e, json_t *items, const char *pyname, mm_tpl_val *out);

/* Record "line N: <msg>" unless an error is already recorded; returns rc. */
int mm_tpl_fail(mm_tpl_ectx *e, int rc, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* The error for using an undefined value. */
int mm_tpl_undef_error(mm_tpl_ectx *e, const mm_tpl_val *v);

mm_tpl_val mm_tpl_undef(const char *name, const char *owner);
mm_tpl_val mm_tpl_jv(json_t *j);          /* takes the reference; NULL -> undefined */
mm_tpl_val mm_tpl_ref(const mm_tpl_val *v);/* a new reference to the same value */
void       mm_tpl_unref(mm_tpl_val *v);
/* New values (the reference is the caller's); kind UNDEF if out of memory. */
mm_tpl_val mm_tpl_str_n(const char *s, size_t n);
mm_tpl_val mm_tpl_int(long long i);
mm_tpl_val mm_tpl_bool(int b);
mm_tpl_val mm_tpl_none(void);
/* A float result: 0, -ENOTSUP for inf/nan (JSON cannot hold them), -ENOMEM. */
int mm_tpl_real(mm_tpl_ectx *e, double d, mm_tpl_val *out);
#define MM_TPL_OOM(v) ((v).kind == MM_TV_UNDEF)

/* Python type tests on values. */
int mm_tpl_is_str(const mm_tpl_val *v);
int mm_tpl_is_list(const mm_tpl_val *v);
int mm_tpl_is_dict(const mm_tpl_val *v);
int mm_tpl_is_none(const mm_tpl_val *v);
int mm_tpl_is_bool(const mm_tpl_val *v);
int mm_tpl_is_int(const mm_tpl_val *v);    /* int, not bool */
int mm_tpl_is_num(const mm_tpl_val *v);    /* int, float or bool */
double mm_tpl_num(const mm_tpl_val *v);
long long mm_tpl_intval(const mm_tpl_val *v);   /* int or bool, exactly */
const char *mm_tpl_typename(const mm_tpl_val *v);
int mm_tpl_truthy(const mm_tpl_val *v);

/* Python str() and repr(), appended to b.  0, -E2BIG, -ENOMEM, -EINVAL. */
int mm_tpl_str(mm_tpl_ectx *e, const mm_tpl_val *v, mm_buf *b);
int mm_tpl_repr(mm_tpl_ectx *e, const mm_tpl_val *v, mm_buf *b);
/* str() as a new string value. */
int mm_tpl_to_strval(mm_tpl_ectx *e, const mm_tpl_val *v, mm_tpl_val *out);
/* Python float repr into buf (>= 32 bytes). */
void mm_tpl_fmt_float(double d, char *buf, size_t n);

/* json.dumps(v, ensure_ascii, indent, separators, sort_keys) */
typedef struct mm_tpl_jsonopt {
    int ensure_ascii;
    int sort_keys;
    int indent_set;           /* indent given (not None) */
    const char *indent;       /* the indent string */
    size_t indent_len;
    const char *item_sep, *key_sep;
    size_t item_sep_len, key_sep_len;
} mm_tpl_jsonopt;
int mm_tpl_tojson(mm_tpl_ectx *e, const mm_tpl_val *v, const mm_tpl_jsonopt *o, mm_buf *b);

/* Python ==, and ordering (-1/0/1; -EINVAL when not comparable). */
int mm_tpl_eq(const mm_tpl_val *a, const mm_tpl_val *b);
int mm_tpl_json_eq(const json_t *a, const json_t *b);
int mm_tpl_cmp(mm_tpl_ectx *e, const mm_tpl_val *a, const mm_tpl_val *b, int *res);
int mm_tpl_json_cmp(mm_tpl_ectx *e, const json_t *a, const json_t *b, int *res);
/* The JSON for a value going into a list or dict (new reference). */
int mm_tpl_to_json(mm_tpl_ectx *e, const mm_tpl_val *v, json_t **out);
/* The rest of an iterator, used up (a new array). */
int mm_tpl_iter_take(mm_tpl_ectx *e, mm_tpl_iter *it, json_t **out);
/* Materialize what `for` iterates: an array reference.  Undefined is empty;
 * an iterator is used up. */
int mm_tpl_iterate(mm_tpl_ectx *e, const mm_tpl_val *v, json_t **out);

/* ---- UTF-8 and Python string helpers (template_value.c) ---- */
size_t mm_tpl_u8_dec(const char *s, size_t n, size_t i, uint32_t *cp); /* bytes used */
size_t mm_tpl_u8_enc(uint32_t cp, char *out);
size_t mm_tpl_u8_len(const char *s, size_t n);               /* code points */
size_t mm_tpl_u8_off(const char *s, size_t n, size_t idx);   /* byte offset of code point idx */
int    mm_tpl_u8_valid(const char *s, size_t n);
int    mm_tpl_py_isspace(uint32_t cp);
uint32_t mm_tpl_py_lower(uint32_t cp);
uint32_t mm_tpl_py_upper(uint32_t cp);
int    mm_tpl_py_cased(uint32_t cp);
int    mm_tpl_py_isalpha(uint32_t cp);
int    mm_tpl_py_isalnum(uint32_t cp);

/* ---- evaluation (template_eval.c) ---- */
int mm_tpl_eval_render(const mm_template *t, const json_t *ctx, mm_buf *out,
                       char *err, size_t errlen);
/* Attribute and item access with Jinja's sandboxed rules; results are new
 * references (possibly undefined). */
int mm_tpl_getattr(mm_tpl_ectx *e, const mm_tpl_val *obj, const char *name, mm_tpl_val *out);
int mm_tpl_getitem(mm_tpl_ectx *e, const mm_tpl_val *obj, const mm_tpl_val *key, mm_tpl_val *out);
/* Call a callable value. */
int mm_tpl_call(mm_tpl_ectx *e, const mm_tpl_val *fn, size_t npos, mm_tpl_val *pos,
                size_t nkw, const char **kwn, mm_tpl_val *kwv, mm_tpl_val *out);

/* ---- builtins ---- */
typedef struct mm_tpl_args {
    size_t npos;
    mm_tpl_val *pos;
    size_t nkw;
    const char **kwn;
    mm_tpl_val *kwv;
} mm_tpl_args;

/* Bind args to the comma-separated parameter names in spec: slot[i] points at
 * the argument or is NULL.  Errors as Python would raise them. */
#define MM_TPL_MAX_PARAMS 8
int mm_tpl_bind(mm_tpl_ectx *e, const char *what, const char *spec,
                const mm_tpl_args *a, const mm_tpl_val **slot);

int mm_tpl_filter(mm_tpl_ectx *e, const char *name, const mm_tpl_val *in,
                  const mm_tpl_args *a, mm_tpl_val *out);
int mm_tpl_test(mm_tpl_ectx *e, const char *name, const mm_tpl_val *in,
                const mm_tpl_args *a, int *res);

/* Methods: look up `name` on a str/dict/list/loop value.  0 and *out a bound
 * method; -ENOENT: no such attribute; -EPERM: exists but the sandbox forbids
 * it (a mutating method). */
int mm_tpl_method_lookup(const mm_tpl_val *self, const char *name, mm_tpl_val *out);
int mm_tpl_call_method(mm_tpl_ectx *e, const mm_tpl_func *f, const mm_tpl_args *a,
                       mm_tpl_val *out);
/* Global functions: range, namespace, dict, raise_exception, strftime_now. */
int mm_tpl_global_lookup(const char *name, mm_tpl_val *out);
int mm_tpl_call_global(mm_tpl_ectx *e, const mm_tpl_func *f, const mm_tpl_args *a,
                       mm_tpl_val *out);

/* str.splitlines(keepends) */
int mm_tpl_splitlines(mm_tpl_ectx *e, const char *s, size_t n, int keepends, mm_tpl_val *out);
/* str.islower() (upper = 0) or str.isupper() */
int mm_tpl_str_cased(const char *s, size_t n, int upper);
/* dict.items() as a list of [key, value] lists. */
int mm_tpl_dict_items(mm_tpl_ectx *e, const json_t *d, mm_tpl_val *out);
/* Python str methods shared by filters and methods. new string in *out */
int mm_tpl_strip(mm_tpl_ectx *e, const char *s, size_t n, const mm_tpl_val *chars,
                 int left, int right, mm_tpl_val *out);
int mm_tpl_split(mm_tpl_ectx *e, const char *s, size_t n, const mm_tpl_val *sep,
                 long long maxsplit, int from_right, mm_tpl_val *out);
int mm_tpl_replace(mm_tpl_ectx *e, const char *s, size_t n, const char *old, size_t on,
                   const char *nw, size_t nn, long long count, mm_tpl_val *out);
int mm_tpl_case(mm_tpl_ectx *e, const char *s, size_t n, int how, mm_tpl_val *out);
enum { MM_CASE_LOWER, MM_CASE_UPPER, MM_CASE_CAPITALIZE, MM_CASE_TITLE, MM_CASE_JTITLE };
#endif
