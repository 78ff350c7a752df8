/* template_parse.c: tokens to AST, by recursive descent with Jinja2's
 * grammar and operator precedence (loosest first):
 *   a if c else b | or | and | not | == != < <= > >= in, not in |
 *   + - | ~ | * / // % | ** | unary - + | primary with . [] () | filters, is.
 * Unsupported statements and unknown filters or tests are compile errors, so
 * a template that would render wrongly is refused up front. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "template_impl.h"

typedef struct parser {
    mm_template *t;
    const mm_tpl_token *tk;
    size_t ntk;
    size_t pos;
    int depth;          /* nesting, against MM_TPL_MAX_NEST */
    int loops;          /* enclosing for-loops: break/continue need one */
    int macros;         /* enclosing macro definitions */
    char *err;
    size_t errlen;
} parser;

#define CUR(P) (&(P)->tk[(P)->pos])

static const char *tok_desc(const mm_tpl_token *k, char *buf, size_t n)
{
    switch (k->type) {
    case MM_TK_EOF: return "end of template";
    case MM_TK_DATA: return "template data";
    case MM_TK_VAR_BEGIN: return "'{{'";
    case MM_TK_VAR_END: return "'}}'";
    case MM_TK_BLOCK_BEGIN: return "'{%'";
    case MM_TK_BLOCK_END: return "'%}'";
    case MM_TK_NAME: snprintf(buf, n, "'%s'", k->s); return buf;
    case MM_TK_STRING: return "a string";
    case MM_TK_INT: return "an integer";
    case MM_TK_FLOAT: return "a float";
    default: break;
    }
    static const char *two[] = {"//", "**", "==", "!=", "<=", ">="};
    if (k->op >= MM_OP_FLOORDIV && k->op <= MM_OP_GE)
        snprintf(buf, n, "'%s'", two[k->op - MM_OP_FLOORDIV]);
    else
        snprintf(buf, n, "'%c'", k->op);
    return buf;
}

static int pfail_rc(parser *P, int rc, int line, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static int pfail_rc(parser *P, int rc, int line, const char *fmt, ...)
{
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    snprintf(P->err, P->errlen, "template %s (line %d): %s",
             rc == -ENOTSUP ? "uses an unsupported construct" : "syntax error", line, msg);
    return rc;
}
#define pfail(P, line, ...) pfail_rc(P, -EINVAL, line, __VA_ARGS__)

static int unexpected(parser *P, const char *expected)
{
    char b[64];
    const mm_tpl_token *k = CUR(P);
    return pfail(P, k->line, "expected %s, got %s", expected, tok_desc(k, b, sizeof(b)));
}

static int poom(parser *P)
{
    snprintf(P->err, P->errlen, "out of memory");
    return -ENOMEM;
}

static mm_tpl_node *node(parser *P, int kind, int line)
{
    mm_tpl_node *n = mm_tpl_alloc(&P->t->arena, sizeof(*n));
    if (n) {
        n->kind = kind;
        n->line = line;
    }
    return n;
}

/* A growable list of children, copied into the arena when done. */
typedef struct kids {
    mm_tpl_node **v;
    const char **kw;
    int *ops;
    size_t n, cap;
} kids;

static int kids_push(kids *k, mm_tpl_node *n, const char *kw, int op)
{
    if (k->n == k->cap) {
        size_t nc = k->cap ? k->cap * 2 : 8;
        mm_tpl_node **v = realloc(k->v, nc * sizeof(*v));
        if (!v)
            return -ENOMEM;
        k->v = v;
        const char **w = realloc(k->kw, nc * sizeof(*w));
        if (!w)
            return -ENOMEM;
        k->kw = w;
        int *o = realloc(k->ops, nc * sizeof(*o));
        if (!o)
            return -ENOMEM;
        k->ops = o;
        k->cap = nc;
    }
    k->v[k->n] = n;
    k->kw[k->n] = kw;
    k->ops[k->n] = op;
    k->n++;
    return 0;
}

static void kids_free(kids *k)
{
    free(k->v);
    free(k->kw);
    free(k->ops);
}

/* Move the list into n->kids (and kwnames/ops when asked). */
static int kids_commit(parser *P, kids *k, mm_tpl_node *n, int with_kw, int with_ops)
{
    n->nkids = k->n;
    if (!k->n)
        return 0;
    n->kids = mm_tpl_alloc(&P->t->arena, k->n * sizeof(*n->kids));
    if (!n->kids)
        return -ENOMEM;
    memcpy(n->kids, k->v, k->n * sizeof(*n->kids));
    if (with_kw) {
        n->kwnames = mm_tpl_alloc(&P->t->arena, k->n * sizeof(*n->kwnames));
        if (!n->kwnames)
            return -ENOMEM;
        memcpy(n->kwnames, k->kw, k->n * sizeof(*n->kwnames));
    }
    if (with_ops) {
        n->ops = mm_tpl_alloc(&P->t->arena, k->n * sizeof(*n->ops));
        if (!n->ops)
            return -ENOMEM;
        memcpy(n->ops, k->ops, k->n * sizeof(*n->ops));
    }
    return 0;
}

static int add_const(parser *P, json_t *v, int line, mm_tpl_node **out)
{
    mm_template *t = P->t;
    if (!v)
        return poom(P);
    if (t->nconsts == t->cap) {
        size_t nc = t->cap ? t->cap * 2 : 32;
        json_t **c = realloc(t->consts, nc * sizeof(*c));
        if (!c) {
            json_decref(v);
            return poom(P);
        }
        t->consts = c;
        t->cap = nc;
    }
    t->consts[t->nconsts++] = v;
    mm_tpl_node *n = node(P, MM_E_CONST, line);
    if (!n)
        return poom(P);
    n->value = v;
    *out = n;
    return 0;
}

static int is_op(parser *P, int op)
{
    return CUR(P)->type == MM_TK_OP && CUR(P)->op == op;
}

static int is_name(parser *P, const char *s)
{
    return CUR(P)->type == MM_TK_NAME && !strcmp(CUR(P)->s, s);
}

static int expect_op(parser *P, int op)
{
    if (!is_op(P, op)) {
        char want[8];
        snprintf(want, sizeof(want), "'%c'", op);
        return unexpected(P, want);
    }
    P->pos++;
    return 0;
}

static int enter(parser *P)
{
    if (++P->depth > MM_TPL_MAX_NEST)
        return pfail_rc(P, -E2BIG, CUR(P)->line, "nested more than %d deep", MM_TPL_MAX_NEST);
    return 0;
}

static int parse_expr(parser *P, int condexpr, mm_tpl_node **out);
static int parse_unary(parser *P, int with_filter, mm_tpl_node **out);
static int parse_primary(parser *P, mm_tpl_node **out);
static int parse_postfix(parser *P, mm_tpl_node **io);
static int parse_tuple(parser *P, int simplified, int condexpr, const char *end_name,
                       int explicit_parens, mm_tpl_node **out);

/* (args) of a call, filter or test: positional then name=value. */
static int parse_call_args(parser *P, mm_tpl_node *n)
{
    kids k = {0};
    int rc;
    if ((rc = expect_op(P, '(')))
        return rc;
    int seen_kw = 0;
    while (!is_op(P, ')')) {
        if (k.n && (rc = expect_op(P, ',')))
            goto out;
        if (is_op(P, ')'))
            break;
        if (is_op(P, '*') || is_op(P, MM_OP_POW)) {
            rc = pfail_rc(P, -ENOTSUP, CUR(P)->line, "*args and **kwargs in calls");
            goto out;
        }
        const char *kw = NULL;
        if (CUR(P)->type == MM_TK_NAME && P->pos + 1 < P->ntk &&
            P->tk[P->pos + 1].type == MM_TK_OP && P->tk[P->pos + 1].op == '=') {
            kw = CUR(P)->s;
            P->pos += 2;
            seen_kw = 1;
        } else if (seen_kw) {
            rc = pfail(P, CUR(P)->line, "positional argument after a keyword argument");
            goto out;
        }
        mm_tpl_node *a;
        if ((rc = parse_expr(P, 1, &a)))
            goto out;
        if (kids_push(&k, a, kw, 0)) {
            rc = poom(P);
            goto out;
        }
    }
    P->pos++;
    if (kids_commit(P, &k, n, 1, 0))
        rc = poom(P);
out:
    kids_free(&k);
    return rc;
}

static int parse_filter(parser *P, mm_tpl_node *input, mm_tpl_node **out)
{
    int line = CUR(P)->line;
    if (CUR(P)->type != MM_TK_NAME)
        return unexpected(P, "a filter name");
    const char *name = CUR(P)->s;
    P->pos++;
    /* unknown names are checked after parsing (check_names): Jinja lets
     * them through inside {% if %} until they run */
    mm_tpl_node *n = node(P, MM_E_FILTER, line);
    if (!n)
        return poom(P);
    n->a = input;
    n->name = name;
    if (is_op(P, '(')) {
        int rc = parse_call_args(P, n);
        if (rc)
            return rc;
    }
    *out = n;
    return 0;
}

static int parse_test(parser *P, mm_tpl_node *input, mm_tpl_node **out)
{
    int line = CUR(P)->line;
    int neg = 0;
    if (is_name(P, "not")) {
        neg = 1;
        P->pos++;
    }
    if (CUR(P)->type != MM_TK_NAME)
        return unexpected(P, "a test name");
    const char *name = CUR(P)->s;
    P->pos++;
    mm_tpl_node *n = node(P, MM_E_TEST, line);
    if (!n)
        return poom(P);
    n->a = input;
    n->name = name;
    n->op = neg;
    const mm_tpl_token *c = CUR(P);
    int rc;
    if (is_op(P, '(')) {
        if ((rc = parse_call_args(P, n)))
            return rc;
    } else if ((c->type == MM_TK_NAME || c->type == MM_TK_STRING || c->type == MM_TK_INT ||
                c->type == MM_TK_FLOAT || is_op(P, '[') || is_op(P, '{')) &&
               !is_name(P, "else") && !is_name(P, "or") && !is_name(P, "and")) {
        /* Jinja: one argument without parentheses, `x is divisibleby 3` */
        if (is_name(P, "is"))
            return pfail(P, c->line, "tests cannot be chained with 'is'");
        mm_tpl_node *arg;
        if ((rc = parse_primary(P, &arg)) || (rc = parse_postfix(P, &arg)))
            return rc;
        n->kids = mm_tpl_alloc(&P->t->arena, sizeof(*n->kids));
        n->kwnames = mm_tpl_alloc(&P->t->arena, sizeof(*n->kwnames));
        if (!n->kids || !n->kwnames)
            return poom(P);
        n->kids[0] = arg;
        n->nkids = 1;
    }
    *out = n;
    return 0;
}

/* After a unary: | filter, is test, and calls, in any order. */
static int parse_filter_expr(parser *P, mm_tpl_node **io)
{
    int rc;
    for (;;) {
        if (is_op(P, '|')) {
            P->pos++;
            if ((rc = parse_filter(P, *io, io)))
                return rc;
        } else if (is_name(P, "is")) {
            P->pos++;
            if ((rc = parse_test(P, *io, io)))
                return rc;
        } else if (is_op(P, '(')) {
            mm_tpl_node *n = node(P, MM_E_CALL, CUR(P)->line);
            if (!n)
                return poom(P);
            n->a = *io;
            if ((rc = parse_call_args(P, n)))
                return rc;
            *io = n;
        } else {
            return 0;
        }
    }
}

/* a[...]: an index or a slice start:stop:step. */
static int parse_subscript(parser *P, mm_tpl_node *obj, mm_tpl_node **out)
{
    int line = CUR(P)->line, rc;
    P->pos++;   /* '[' */
    mm_tpl_node *start = NULL, *stop = NULL, *step = NULL;
    if (is_op(P, ']')) {
        /* x[] indexes with an empty tuple: always undefined in Jinja */
        mm_tpl_node *n = node(P, MM_E_ITEM, line), *t = node(P, MM_E_TUPLE, line);
        if (!n || !t)
            return poom(P);
        P->pos++;
        n->a = obj;
        n->b = t;
        *out = n;
        return 0;
    }
    if (!is_op(P, ':')) {
        if ((rc = parse_expr(P, 1, &start)))
            return rc;
        if (is_op(P, ',')) {
            /* x[a, b] indexes with a tuple, which no JSON value has */
            kids k = {0};
            mm_tpl_node *t = node(P, MM_E_TUPLE, line), *n = node(P, MM_E_ITEM, line);
            if (!t || !n || kids_push(&k, start, NULL, 0)) {
                kids_free(&k);
                return poom(P);
            }
            while (is_op(P, ',')) {
                P->pos++;
                mm_tpl_node *x;
                if (is_op(P, ':')) {
                    kids_free(&k);
                    return pfail_rc(P, -ENOTSUP, line, "a slice inside a tuple subscript");
                }
                if ((rc = parse_expr(P, 1, &x)) || (rc = kids_push(&k, x, NULL, 0) ? poom(P) : 0)) {
                    kids_free(&k);
                    return rc;
                }
            }
            rc = kids_commit(P, &k, t, 0, 0) ? poom(P) : 0;
            kids_free(&k);
            if (rc || (rc = expect_op(P, ']')))
                return rc;
            n->a = obj;
            n->b = t;
            *out = n;
            return 0;
        }
        if (!is_op(P, ':')) {
            if ((rc = expect_op(P, ']')))
                return rc;
            mm_tpl_node *n = node(P, MM_E_ITEM, line);
            if (!n)
                return poom(P);
            n->a = obj;
            n->b = start;
            *out = n;
            return 0;
        }
    }
    P->pos++;   /* ':' */
    if (!is_op(P, ']') && !is_op(P, ':') && (rc = parse_expr(P, 1, &stop)))
        return rc;
    if (is_op(P, ':')) {
        P->pos++;
        if (!is_op(P, ']') && (rc = parse_expr(P, 1, &step)))
            return rc;
    }
    if ((rc = expect_op(P, ']')))
        return rc;
    mm_tpl_node *n = node(P, MM_E_SLICE, line);
    if (!n)
        return poom(P);
    n->a = obj;
    n->b = start;
    n->c = stop;
    n->d = step;
    *out = n;
    return 0;
}

static int parse_postfix(parser *P, mm_tpl_node **io)
{
    int rc;
    for (;;) {
        int line = CUR(P)->line;
        if (is_op(P, '.')) {
            P->pos++;
            if (CUR(P)->type == MM_TK_NAME) {
                mm_tpl_node *n = node(P, MM_E_ATTR, line);
                if (!n)
                    return poom(P);
                n->a = *io;
                n->name = CUR(P)->s;
                P->pos++;
                *io = n;
            } else if (CUR(P)->type == MM_TK_INT) {
                /* foo.0 is foo[0] */
                mm_tpl_node *idx, *n = node(P, MM_E_ITEM, line);
                if (!n)
                    return poom(P);
                if ((rc = add_const(P, json_integer(CUR(P)->i), line, &idx)))
                    return rc;
                P->pos++;
                n->a = *io;
                n->b = idx;
                *io = n;
            } else {
                return unexpected(P, "an attribute name");
            }
        } else if (is_op(P, '[')) {
            if ((rc = parse_subscript(P, *io, io)))
                return rc;
        } else if (is_op(P, '(')) {
            mm_tpl_node *n = node(P, MM_E_CALL, line);
            if (!n)
                return poom(P);
            n->a = *io;
            if ((rc = parse_call_args(P, n)))
                return rc;
            *io = n;
        } else {
            return 0;
        }
    }
}

static int parse_list_like(parser *P, int close, int kind, mm_tpl_node **out)
{
    int line = CUR(P)->line, rc = 0;
    kids k = {0};
    P->pos++;
    while (!is_op(P, close)) {
        if (k.n && (rc = expect_op(P, ',')))
            goto out;
        if (is_op(P, close))
            break;
        mm_tpl_node *a, *v;
        if ((rc = parse_expr(P, 1, &a)))
            goto out;
        if (kids_push(&k, a, NULL, 0)) {
            rc = poom(P);
            goto out;
        }
        if (kind == MM_E_DICT) {
            if ((rc = expect_op(P, ':')) || (rc = parse_expr(P, 1, &v)))
                goto out;
            if (kids_push(&k, v, NULL, 0)) {
                rc = poom(P);
                goto out;
            }
        }
    }
    P->pos++;
    mm_tpl_node *n = node(P, kind, line);
    if (!n || kids_commit(P, &k, n, 0, 0)) {
        rc = poom(P);
        goto out;
    }
    *out = n;
out:
    kids_free(&k);
    return rc;
}

static int parse_primary(parser *P, mm_tpl_node **out)
{
    const mm_tpl_token *c = CUR(P);
    int line = c->line, rc;
    char b[64];
    switch (c->type) {
    case MM_TK_NAME:
        P->pos++;
        if (!strcmp(c->s, "true") || !strcmp(c->s, "True"))
            return add_const(P, json_true(), line, out);
        if (!strcmp(c->s, "false") || !strcmp(c->s, "False"))
            return add_const(P, json_false(), line, out);
        if (!strcmp(c->s, "none") || !strcmp(c->s, "None"))
            return add_const(P, json_null(), line, out);
        {
            mm_tpl_node *n = node(P, MM_E_NAME, line);
            if (!n)
                return poom(P);
            n->name = c->s;
            *out = n;
        }
        return 0;
    case MM_TK_STRING: {
        /* adjacent literals concatenate: "a" "b" */
        size_t total = 0, q = P->pos;
        while (q < P->ntk && P->tk[q].type == MM_TK_STRING)
            total += P->tk[q++].n;
        char *s = malloc(total + 1);
        size_t off = 0;
        if (!s)
            return poom(P);
        while (P->pos < q) {
            memcpy(s + off, CUR(P)->s, CUR(P)->n);
            off += CUR(P)->n;
            P->pos++;
        }
        json_t *v = json_stringn_nocheck(s, total);
        free(s);
        return add_const(P, v, line, out);
    }
    case MM_TK_INT:
        P->pos++;
        return add_const(P, json_integer(c->i), line, out);
    case MM_TK_FLOAT:
        P->pos++;
        if (!isfinite(c->d))   /* Python's inf: JSON cannot hold it */
            return pfail_rc(P, -ENOTSUP, line, "a float literal beyond the double range");
        return add_const(P, json_real(c->d), line, out);
    case MM_TK_OP:
        if (c->op == '(') {
            P->pos++;
            if ((rc = parse_tuple(P, 0, 1, NULL, 1, out)))
                return rc;
            return expect_op(P, ')');
        }
        if (c->op == '[')
            return parse_list_like(P, ']', MM_E_LIST, out);
        if (c->op == '{')
            return parse_list_like(P, '}', MM_E_DICT, out);
        break;
    default:
        break;
    }
    return pfail(P, line, "unexpected %s", tok_desc(c, b, sizeof(b)));
}

static int parse_unary(parser *P, int with_filter, mm_tpl_node **out)
{
    int rc, line = CUR(P)->line;
    if ((rc = enter(P)))
        return rc;
    if (is_op(P, '-') || is_op(P, '+')) {
        int neg = is_op(P, '-');
        P->pos++;
        mm_tpl_node *n = node(P, neg ? MM_E_NEG : MM_E_POS, line);
        if (!n)
            return poom(P);
        if ((rc = parse_unary(P, 0, &n->a)))
            return rc;
        *out = n;
    } else {
        if ((rc = parse_primary(P, out)))
            return rc;
    }
    if ((rc = parse_postfix(P, out)))
        return rc;
    if (with_filter && (rc = parse_filter_expr(P, out)))
        return rc;
    P->depth--;
    return 0;
}

static int binop(parser *P, int op, int line, mm_tpl_node *a, mm_tpl_node *b, mm_tpl_node **out)
{
    mm_tpl_node *n = node(P, MM_E_BIN, line);
    if (!n)
        return poom(P);
    n->op = op;
    n->a = a;
    n->b = b;
    *out = n;
    return 0;
}

static int parse_pow(parser *P, mm_tpl_node **out)
{
    int rc = parse_unary(P, 1, out);
    while (!rc && is_op(P, MM_OP_POW)) {
        int line = CUR(P)->line;
        mm_tpl_node *r;
        P->pos++;
        if ((rc = parse_unary(P, 1, &r)))
            break;
        rc = binop(P, MM_OP_POW, line, *out, r, out);
    }
    return rc;
}

static int parse_math2(parser *P, mm_tpl_node **out)
{
    int rc = parse_pow(P, out);
    while (!rc && (is_op(P, '*') || is_op(P, '/') || is_op(P, MM_OP_FLOORDIV) || is_op(P, '%'))) {
        int op = CUR(P)->op, line = CUR(P)->line;
        mm_tpl_node *r;
        P->pos++;
        if ((rc = parse_pow(P, &r)))
            break;
        rc = binop(P, op, line, *out, r, out);
    }
    return rc;
}

static int parse_concat(parser *P, mm_tpl_node **out)
{
    int rc = parse_math2(P, out);
    while (!rc && is_op(P, '~')) {
        int line = CUR(P)->line;
        mm_tpl_node *r;
        P->pos++;
        if ((rc = parse_math2(P, &r)))
            break;
        rc = binop(P, MM_OP_CONCAT, line, *out, r, out);
    }
    return rc;
}

static int parse_math1(parser *P, mm_tpl_node **out)
{
    int rc = parse_concat(P, out);
    while (!rc && (is_op(P, '+') || is_op(P, '-'))) {
        int op = CUR(P)->op, line = CUR(P)->line;
        mm_tpl_node *r;
        P->pos++;
        if ((rc = parse_concat(P, &r)))
            break;
        rc = binop(P, op, line, *out, r, out);
    }
    return rc;
}

static int parse_compare(parser *P, mm_tpl_node **out)
{
    int line = CUR(P)->line, rc;
    mm_tpl_node *first;
    kids k = {0};
    if ((rc = parse_math1(P, &first)))
        return rc;
    for (;;) {
        int op = 0;
        const mm_tpl_token *c = CUR(P);
        if (c->type == MM_TK_OP) {
            switch (c->op) {
            case MM_OP_EQ: op = MM_OP_EQ; break;
            case MM_OP_NE: op = MM_OP_NE; break;
            case MM_OP_LE: op = MM_OP_LE; break;
            case MM_OP_GE: op = MM_OP_GE; break;
            case '<': op = MM_OP_LT; break;
            case '>': op = MM_OP_GT; break;
            default: break;
            }
            if (op)
                P->pos++;
        } else if (is_name(P, "in")) {
            op = MM_OP_IN;
            P->pos++;
        } else if (is_name(P, "not") && P->pos + 1 < P->ntk &&
                   P->tk[P->pos + 1].type == MM_TK_NAME && !strcmp(P->tk[P->pos + 1].s, "in")) {
            op = MM_OP_NOTIN;
            P->pos += 2;
        }
        if (!op)
            break;
        mm_tpl_node *r;
        if ((rc = parse_math1(P, &r)))
            goto out;
        if (kids_push(&k, r, NULL, op)) {
            rc = poom(P);
            goto out;
        }
    }
    if (!k.n) {
        *out = first;
        goto out;
    }
    mm_tpl_node *n = node(P, MM_E_CMP, line);
    if (!n || kids_commit(P, &k, n, 0, 1)) {
        rc = poom(P);
        goto out;
    }
    n->a = first;
    *out = n;
out:
    kids_free(&k);
    return rc;
}

static int parse_not(parser *P, mm_tpl_node **out)
{
    if (is_name(P, "not")) {
        int rc, line = CUR(P)->line;
        P->pos++;
        if ((rc = enter(P)))
            return rc;
        mm_tpl_node *n = node(P, MM_E_NOT, line);
        if (!n)
            return poom(P);
        if ((rc = parse_not(P, &n->a)))
            return rc;
        P->depth--;
        *out = n;
        return 0;
    }
    return parse_compare(P, out);
}

static int parse_and(parser *P, mm_tpl_node **out)
{
    int rc = parse_not(P, out);
    while (!rc && is_name(P, "and")) {
        int line = CUR(P)->line;
        mm_tpl_node *r;
        P->pos++;
        if ((rc = parse_not(P, &r)))
            break;
        rc = binop(P, MM_OP_AND, line, *out, r, out);
    }
    return rc;
}

static int parse_or(parser *P, mm_tpl_node **out)
{
    int rc = parse_and(P, out);
    while (!rc && is_name(P, "or")) {
        int line = CUR(P)->line;
        mm_tpl_node *r;
        P->pos++;
        if ((rc = parse_and(P, &r)))
            break;
        rc = binop(P, MM_OP_OR, line, *out, r, out);
    }
    return rc;
}

static int parse_expr(parser *P, int condexpr, mm_tpl_node **out)
{
    int rc;
    if ((rc = enter(P)) || (rc = parse_or(P, out)))
        return rc;
    while (condexpr && is_name(P, "if")) {
        int line = CUR(P)->line;
        P->pos++;
        mm_tpl_node *n = node(P, MM_E_COND, line);
        if (!n)
            return poom(P);
        n->b = *out;
        if ((rc = parse_or(P, &n->a)))
            return rc;
        if (is_name(P, "else")) {
            P->pos++;
            if ((rc = parse_expr(P, 1, &n->c)))
                return rc;
        }
        *out = n;
    }
    P->depth--;
    return 0;
}

static int tuple_end(parser *P, const char *end_name)
{
    const mm_tpl_token *c = CUR(P);
    if (c->type == MM_TK_VAR_END || c->type == MM_TK_BLOCK_END || c->type == MM_TK_EOF ||
        (c->type == MM_TK_OP && c->op == ')'))
        return 1;
    return end_name && is_name(P, end_name);
}

/* Jinja's parse_tuple: an expression, or a comma-separated tuple of them.
 * simplified: names only (assignment targets). */
static int parse_tuple(parser *P, int simplified, int condexpr, const char *end_name,
                       int explicit_parens, mm_tpl_node **out)
{
    int line = CUR(P)->line, rc = 0, is_tuple = 0;
    kids k = {0};
    for (;;) {
        if (k.n && (rc = expect_op(P, ',')))
            goto out;
        if (tuple_end(P, end_name))
            break;
        mm_tpl_node *a;
        if (simplified)
            rc = parse_primary(P, &a);
        else
            rc = parse_expr(P, condexpr, &a);
        if (rc)
            goto out;
        if (kids_push(&k, a, NULL, 0)) {
            rc = poom(P);
            goto out;
        }
        if (is_op(P, ','))
            is_tuple = 1;
        else
            break;
    }
    if (!is_tuple) {
        if (k.n) {
            *out = k.v[0];
            goto out;
        }
        if (!explicit_parens) {
            rc = unexpected(P, "an expression");
            goto out;
        }
    }
    mm_tpl_node *n = node(P, MM_E_TUPLE, line);
    if (!n || kids_commit(P, &k, n, 0, 0)) {
        rc = poom(P);
        goto out;
    }
    *out = n;
out:
    kids_free(&k);
    return rc;
}

/* ---- statements ---- */

static int expect_block_end(parser *P)
{
    if (CUR(P)->type != MM_TK_BLOCK_END)
        return unexpected(P, "end of statement '%}'");
    P->pos++;
    return 0;
}

/* Before a statement body: Jinja takes a colon there "for Python
 * compatibility", {% for x in y: %}. */
static int expect_body_start(parser *P)
{
    if (is_op(P, ':'))
        P->pos++;
    return expect_block_end(P);
}

/* Parse statements until a {% name %} whose name is in ends (NULL-terminated).
 * Leaves P at that name.  ends NULL: until the end of the template. */
static int parse_body(parser *P, const char *const *ends, const char *opener, int open_line,
                      mm_tpl_node **out);

static int is_end_name(parser *P, const char *const *ends)
{
    for (; ends && *ends; ends++)
        if (is_name(P, *ends))
            return 1;
    return 0;
}

static int parse_assign_target(parser *P, int with_ns, const char *end_name, mm_tpl_node **out)
{
    int line = CUR(P)->line;
    if (with_ns && CUR(P)->type == MM_TK_NAME && P->pos + 2 < P->ntk &&
        P->tk[P->pos + 1].type == MM_TK_OP && P->tk[P->pos + 1].op == '.' &&
        P->tk[P->pos + 2].type == MM_TK_NAME) {
        mm_tpl_node *n = node(P, MM_E_NSREF, line);
        if (!n)
            return poom(P);
        n->name = CUR(P)->s;
        n->name2 = P->tk[P->pos + 2].s;
        P->pos += 3;
        *out = n;
        return 0;
    }
    int rc = parse_tuple(P, 1, 0, end_name, 0, out);
    if (rc)
        return rc;
    mm_tpl_node *t = *out;
    if (t->kind == MM_E_NAME)
        return 0;
    if (t->kind == MM_E_TUPLE && t->nkids) {
        for (size_t i = 0; i < t->nkids; i++)
            if (t->kids[i]->kind != MM_E_NAME)
                return pfail(P, line, "can only assign to names");
        return 0;
    }
    return pfail(P, line, "can only assign to names");
}

static int parse_for(parser *P, int line, mm_tpl_node **out)
{
    static const char *const ends1[] = {"endfor", "else", NULL};
    static const char *const ends2[] = {"endfor", NULL};
    int rc;
    mm_tpl_node *n = node(P, MM_N_FOR, line);
    if (!n)
        return poom(P);
    if ((rc = parse_assign_target(P, 0, "in", &n->a)))
        return rc;
    if (!is_name(P, "in"))
        return unexpected(P, "'in'");
    P->pos++;
    if ((rc = parse_tuple(P, 0, 0, "recursive", 0, &n->b)))
        return rc;
    if (is_name(P, "if")) {
        P->pos++;
        if ((rc = parse_expr(P, 1, &n->e)))
            return rc;
    }
    if (is_name(P, "recursive"))
        return pfail_rc(P, -ENOTSUP, CUR(P)->line, "recursive for loops");
    if ((rc = expect_body_start(P)))
        return rc;
    P->loops++;
    rc = parse_body(P, ends1, "for", line, &n->c);
    P->loops--;
    if (rc)
        return rc;
    if (is_name(P, "else")) {
        P->pos++;
        if ((rc = expect_body_start(P)) || (rc = parse_body(P, ends2, "for", line, &n->d)))
            return rc;
    }
    P->pos++;   /* endfor */
    *out = n;
    return expect_block_end(P);
}

static int parse_if(parser *P, int line, mm_tpl_node **out)
{
    static const char *const ends1[] = {"elif", "else", "endif", NULL};
    static const char *const ends2[] = {"endif", NULL};
    int rc;
    mm_tpl_node *n = node(P, MM_N_IF, line);
    if (!n)
        return poom(P);
    *out = n;
    if ((rc = parse_tuple(P, 0, 0, NULL, 0, &n->a)) || (rc = expect_body_start(P)) ||
        (rc = parse_body(P, ends1, "if", line, &n->b)))
        return rc;
    for (;;) {
        if (is_name(P, "elif")) {
            int l2 = CUR(P)->line;
            P->pos++;
            mm_tpl_node *e = node(P, MM_N_IF, l2);
            if (!e)
                return poom(P);
            e->op = 1;   /* an elif: scoping treats it as Jinja's If.elif_ */
            if ((rc = parse_tuple(P, 0, 0, NULL, 0, &e->a)) || (rc = expect_body_start(P)) ||
                (rc = parse_body(P, ends1, "if", line, &e->b)))
                return rc;
            /* an elif is an if nested in the else branch */
            mm_tpl_node *body = node(P, MM_N_BODY, l2);
            if (!body)
                return poom(P);
            body->kids = mm_tpl_alloc(&P->t->arena, sizeof(*body->kids));
            if (!body->kids)
                return poom(P);
            body->kids[0] = e;
            body->nkids = 1;
            n->c = body;
            n = e;
            continue;
        }
        if (is_name(P, "else")) {
            P->pos++;
            if ((rc = expect_body_start(P)) || (rc = parse_body(P, ends2, "if", line, &n->c)))
                return rc;
        }
        break;
    }
    P->pos++;   /* endif */
    return expect_block_end(P);
}

/* Filter chain of a {% filter %} or {% set x | f %}: input is a placeholder. */
static int parse_filter_chain(parser *P, mm_tpl_node **out)
{
    mm_tpl_node *hole;
    int rc = add_const(P, json_null(), CUR(P)->line, &hole);
    if (rc)
        return rc;
    hole->value = NULL;   /* marks the placeholder */
    *out = hole;
    do {
        if ((rc = parse_filter(P, *out, out)))
            return rc;
    } while (is_op(P, '|') && (P->pos++, 1));
    return 0;
}

static int parse_set(parser *P, int line, mm_tpl_node **out)
{
    static const char *const ends[] = {"endset", NULL};
    int rc;
    mm_tpl_node *target;
    if ((rc = parse_assign_target(P, 1, NULL, &target)))
        return rc;
    if (is_op(P, '=')) {
        P->pos++;
        mm_tpl_node *n = node(P, MM_N_SET, line);
        if (!n)
            return poom(P);
        n->a = target;
        if ((rc = parse_tuple(P, 0, 1, NULL, 0, &n->b)))
            return rc;
        *out = n;
        return expect_block_end(P);
    }
    if (target->kind == MM_E_TUPLE)
        return pfail(P, line, "a block 'set' needs a single name");
    mm_tpl_node *n = node(P, MM_N_SETBLOCK, line);
    if (!n)
        return poom(P);
    n->a = target;
    if (is_op(P, '|')) {
        P->pos++;
        if ((rc = parse_filter_chain(P, &n->c)))
            return rc;
    }
    if ((rc = expect_body_start(P)) || (rc = parse_body(P, ends, "set", line, &n->b)))
        return rc;
    P->pos++;
    *out = n;
    return expect_block_end(P);
}

static int parse_macro(parser *P, int line, mm_tpl_node **out)
{
    static const char *const ends[] = {"endmacro", NULL};
    int rc = 0;
    kids k = {0};
    if (P->loops || P->macros)
        return pfail_rc(P, -ENOTSUP, line, "a macro defined inside a loop or macro");
    if (CUR(P)->type != MM_TK_NAME)
        return unexpected(P, "a macro name");
    mm_tpl_node *n = node(P, MM_N_MACRO, line);
    if (!n)
        return poom(P);
    n->name = CUR(P)->s;
    P->pos++;
    if ((rc = expect_op(P, '(')))
        return rc;
    int seen_default = 0;
    while (!is_op(P, ')')) {
        if (k.n && (rc = expect_op(P, ',')))
            goto out;
        if (CUR(P)->type != MM_TK_NAME) {
            rc = unexpected(P, "a parameter name");
            goto out;
        }
        mm_tpl_node *p = node(P, MM_E_PARAM, CUR(P)->line);
        if (!p) {
            rc = poom(P);
            goto out;
        }
        p->name = CUR(P)->s;
        P->pos++;
        if (is_op(P, '=')) {
            P->pos++;
            if ((rc = parse_expr(P, 1, &p->a)))
                goto out;
            seen_default = 1;
        } else if (seen_default) {
            rc = pfail(P, p->line, "non-default parameter follows default parameter");
            goto out;
        }
        if (kids_push(&k, p, NULL, 0)) {
            rc = poom(P);
            goto out;
        }
    }
    P->pos++;
    if (kids_commit(P, &k, n, 0, 0)) {
        rc = poom(P);
        goto out;
    }
    if ((rc = expect_body_start(P)))
        goto out;
    P->macros++;
    rc = parse_body(P, ends, "macro", line, &n->b);
    P->macros--;
    if (rc)
        goto out;
    P->pos++;
    if (CUR(P)->type == MM_TK_NAME)   /* {% endmacro name %} */
        P->pos++;
    *out = n;
    rc = expect_block_end(P);
out:
    kids_free(&k);
    return rc;
}

static int parse_with(parser *P, int line, mm_tpl_node **out)
{
    static const char *const ends[] = {"endwith", NULL};
    int rc = 0;
    kids k = {0};
    mm_tpl_node *n = node(P, MM_N_WITH, line);
    if (!n)
        return poom(P);
    while (CUR(P)->type != MM_TK_BLOCK_END) {
        if (k.n && (rc = expect_op(P, ',')))
            goto out;
        mm_tpl_node *s = node(P, MM_N_SET, CUR(P)->line);
        if (!s) {
            rc = poom(P);
            goto out;
        }
        if ((rc = parse_assign_target(P, 0, NULL, &s->a)) || (rc = expect_op(P, '=')) ||
            (rc = parse_expr(P, 1, &s->b)))
            goto out;
        if (kids_push(&k, s, NULL, 0)) {
            rc = poom(P);
            goto out;
        }
    }
    if (kids_commit(P, &k, n, 0, 0)) {
        rc = poom(P);
        goto out;
    }
    if ((rc = expect_body_start(P)) || (rc = parse_body(P, ends, "with", line, &n->b)))
        goto out;
    P->pos++;
    *out = n;
    rc = expect_block_end(P);
out:
    kids_free(&k);
    return rc;
}

static int parse_statement(parser *P, mm_tpl_node **out)
{
    static const char *const gen_ends[] = {"endgeneration", NULL};
    static const char *const filter_ends[] = {"endfilter", NULL};
    const mm_tpl_token *c = CUR(P);
    int line = c->line, rc;
    if (c->type != MM_TK_NAME)
        return unexpected(P, "a statement name");
    const char *w = c->s;
    P->pos++;
    if ((rc = enter(P)))
        return rc;
    if (!strcmp(w, "for"))
        rc = parse_for(P, line, out);
    else if (!strcmp(w, "if"))
        rc = parse_if(P, line, out);
    else if (!strcmp(w, "set"))
        rc = parse_set(P, line, out);
    else if (!strcmp(w, "macro"))
        rc = parse_macro(P, line, out);
    else if (!strcmp(w, "with"))
        rc = parse_with(P, line, out);
    else if (!strcmp(w, "break") || !strcmp(w, "continue")) {
        if (!P->loops)
            return pfail(P, line, "'%s' outside of a loop", w);
        *out = node(P, w[0] == 'b' ? MM_N_BREAK : MM_N_CONTINUE, line);
        if (!*out)
            return poom(P);
        rc = expect_block_end(P);
    } else if (!strcmp(w, "generation")) {
        /* transformers' AssistantTracker tag: renders its body as is */
        if ((rc = expect_body_start(P)) ||
            (rc = parse_body(P, gen_ends, "generation", line, out)))
            return rc;
        P->pos++;
        rc = expect_block_end(P);
    } else if (!strcmp(w, "filter")) {
        mm_tpl_node *n = node(P, MM_N_FILTERBLOCK, line);
        if (!n)
            return poom(P);
        if ((rc = parse_filter_chain(P, &n->a)) || (rc = expect_body_start(P)) ||
            (rc = parse_body(P, filter_ends, "filter", line, &n->b)))
            return rc;
        P->pos++;
        *out = n;
        rc = expect_block_end(P);
    } else if (!strcmp(w, "include") || !strcmp(w, "import") || !strcmp(w, "from") ||
               !strcmp(w, "extends") || !strcmp(w, "block") || !strcmp(w, "call") ||
               !strcmp(w, "autoescape") || !strcmp(w, "do") || !strcmp(w, "trans")) {
        return pfail_rc(P, -ENOTSUP, line, "the '%s' tag", w);
    } else {
        return pfail(P, line, "unknown tag '%s'", w);
    }
    if (rc)
        return rc;
    P->depth--;
    return 0;
}

static int parse_body(parser *P, const char *const *ends, const char *opener, int open_line,
                      mm_tpl_node **out)
{
    int rc = 0, line = CUR(P)->line;
    kids k = {0};
    for (;;) {
        const mm_tpl_token *c = CUR(P);
        mm_tpl_node *s = NULL;
        if (c->type == MM_TK_EOF) {
            if (ends) {
                rc = pfail(P, open_line, "'%s' is never closed (expected '%s')", opener, ends[0]);
                goto out;
            }
            break;
        }
        if (c->type == MM_TK_DATA) {
            s = node(P, MM_N_TEXT, c->line);
            if (!s) {
                rc = poom(P);
                goto out;
            }
            s->text = c->s;
            s->text_len = c->n;
            P->pos++;
        } else if (c->type == MM_TK_VAR_BEGIN) {
            P->pos++;
            s = node(P, MM_N_OUTPUT, c->line);
            if (!s) {
                rc = poom(P);
                goto out;
            }
            if ((rc = parse_tuple(P, 0, 1, NULL, 0, &s->a)))
                goto out;
            if (CUR(P)->type != MM_TK_VAR_END) {
                rc = unexpected(P, "end of print statement '}}'");
                goto out;
            }
            P->pos++;
        } else if (c->type == MM_TK_BLOCK_BEGIN) {
            P->pos++;
            if (is_end_name(P, ends))
                break;
            if (CUR(P)->type == MM_TK_NAME && !strncmp(CUR(P)->s, "end", 3)) {
                if (ends)
                    rc = pfail(P, CUR(P)->line, "unexpected '%s' (expected '%s' to close '%s' "
                               "from line %d)", CUR(P)->s, ends[0], opener, open_line);
                else
                    rc = pfail(P, CUR(P)->line, "unexpected '%s'", CUR(P)->s);
                goto out;
            }
            if (CUR(P)->type == MM_TK_NAME && (is_name(P, "else") || is_name(P, "elif"))) {
                rc = pfail(P, CUR(P)->line, "unexpected '%s'", CUR(P)->s);
                goto out;
            }
            if ((rc = parse_statement(P, &s)))
                goto out;
        } else {
            rc = unexpected(P, "template data or a tag");
            goto out;
        }
        if (kids_push(&k, s, NULL, 0)) {
            rc = poom(P);
            goto out;
        }
    }
    mm_tpl_node *b = node(P, MM_N_BODY, line);
    if (!b || kids_commit(P, &k, b, 0, 0)) {
        rc = poom(P);
        goto out;
    }
    *out = b;
out:
    kids_free(&k);
    return rc;
}

/* Filter and test names must exist, except where Jinja's code generator is
 * in a "soft" frame (an if statement or an inline if, but not a loop,
 * macro or block inside one): there an unknown name fails only if it runs. */
static int check_names(parser *P, const mm_tpl_node *n, int soft)
{
    int rc = 0;
    if (!n)
        return 0;
    switch (n->kind) {
    case MM_N_IF:
    case MM_E_COND:
        soft = 1;
        break;
    case MM_N_FOR:
        if ((rc = check_names(P, n->a, soft)) || (rc = check_names(P, n->b, soft)))
            return rc;
        if ((rc = check_names(P, n->c, 0)) || (rc = check_names(P, n->d, 0)))
            return rc;
        return check_names(P, n->e, 0);
    case MM_N_MACRO:
    case MM_N_SETBLOCK:
    case MM_N_FILTERBLOCK:
        soft = 0;
        break;
    case MM_N_WITH:
        for (size_t i = 0; i < n->nkids && !rc; i++)
            rc = check_names(P, n->kids[i], soft);
        return rc ? rc : check_names(P, n->b, 0);
    case MM_E_FILTER:
    case MM_E_TEST:
        if (!soft) {
            int filt = n->kind == MM_E_FILTER;
            if (filt ? !mm_tpl_has_filter(n->name) : !mm_tpl_has_test(n->name)) {
                if (filt ? mm_tpl_known_filter(n->name) : mm_tpl_known_test(n->name))
                    return pfail_rc(P, -ENOTSUP, n->line, "%s '%s'", filt ? "filter" : "test",
                                    n->name);
                return pfail(P, n->line, "no %s named '%s'", filt ? "filter" : "test", n->name);
            }
        }
        break;
    default:
        break;
    }
    const mm_tpl_node *sub[] = {n->a, n->b, n->c, n->d, n->e};
    for (size_t i = 0; i < 5 && !rc; i++)
        rc = check_names(P, sub[i], soft);
    for (size_t i = 0; i < n->nkids && !rc; i++)
        rc = check_names(P, n->kids[i], soft);
    return rc;
}

int mm_tpl_parse(mm_template *t, const mm_tpl_tokens *toks, char *err, size_t errlen)
{
    parser P = {.t = t, .tk = toks->v, .ntk = toks->n, .err = err, .errlen = errlen};
    int rc = parse_body(&P, NULL, NULL, 0, &t->root);
    return rc ? rc : check_names(&P, t->root, 0);
}
