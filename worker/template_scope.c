/* template_scope.c: Jinja2's static scoping, so names resolve as they do in
 * Python's compiled templates.
 *
 * Jinja decides per scope ("frame": the template, a for-loop body, a macro,
 * a with/set/filter block) at compile time what each name refers to.  A name
 * whose first use in a frame is an assignment, outside any {% if %}, and
 * that no enclosing frame knows, starts that frame *undefined*: until the
 * assignment runs, the frame (and loops or macros inside it) see undefined,
 * not the render variable of the same name.  Every other name reads through
 * to the enclosing frames and the render variables, which the evaluator
 * does at run time anyway.  So this pass only has to find those
 * start-undefined names; the evaluator binds them when it enters the frame.
 *
 * The rules are Jinja's idtracking.py (Symbols.load/store/branch_update),
 * including its treatment of {% if %}: an assignment inside a branch makes
 * the name fall back to the outer value rather than start undefined. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "template_impl.h"

enum { K_RESOLVE, K_ALIAS, K_UNDEF, K_PARAM };

typedef struct symtab {
    const struct symtab *parent;
    const char **names;
    int *kinds;
    size_t n, cap;
    const char **stores;
    size_t ns, caps;
} symtab;

typedef struct scope {
    mm_template *t;
    int depth;
} scope;

static void st_free(symtab *s)
{
    free(s->names);
    free(s->kinds);
    free(s->stores);
    memset(s, 0, sizeof(*s));
}

static long st_find(const symtab *s, const char *name)
{
    for (size_t i = 0; i < s->n; i++)
        if (!strcmp(s->names[i], name))
            return (long)i;
    return -1;
}

static int st_find_ref(const symtab *s, const char *name)
{
    for (; s; s = s->parent)
        if (st_find(s, name) >= 0)
            return 1;
    return 0;
}

static int st_define(symtab *s, const char *name, int kind)
{
    long i = st_find(s, name);
    if (i >= 0) {
        s->kinds[i] = kind;
        return 0;
    }
    if (s->n == s->cap) {
        size_t nc = s->cap ? s->cap * 2 : 16;
        const char **nn = realloc(s->names, nc * sizeof(*nn));
        if (!nn)
            return -ENOMEM;
        s->names = nn;
        int *nk = realloc(s->kinds, nc * sizeof(*nk));
        if (!nk)
            return -ENOMEM;
        s->kinds = nk;
        s->cap = nc;
    }
    s->names[s->n] = name;
    s->kinds[s->n] = kind;
    s->n++;
    return 0;
}

static int st_has_store(const symtab *s, const char *name)
{
    for (size_t i = 0; i < s->ns; i++)
        if (!strcmp(s->stores[i], name))
            return 1;
    return 0;
}

static int st_add_store(symtab *s, const char *name)
{
    if (st_has_store(s, name))
        return 0;
    if (s->ns == s->caps) {
        size_t nc = s->caps ? s->caps * 2 : 16;
        const char **v = realloc(s->stores, nc * sizeof(*v));
        if (!v)
            return -ENOMEM;
        s->stores = v;
        s->caps = nc;
    }
    s->stores[s->ns++] = name;
    return 0;
}

static int st_load(symtab *s, const char *name)
{
    return st_find_ref(s, name) ? 0 : st_define(s, name, K_RESOLVE);
}

static int st_store(symtab *s, const char *name)
{
    int rc = st_add_store(s, name);
    if (rc || st_find(s, name) >= 0)
        return rc;
    if (s->parent && st_find_ref(s->parent, name))
        return st_define(s, name, K_ALIAS);
    return st_define(s, name, K_UNDEF);
}

static int st_param(symtab *s, const char *name)
{
    int rc = st_add_store(s, name);
    return rc ? rc : st_define(s, name, K_PARAM);
}

static int st_copy(const symtab *s, symtab *c)
{
    memset(c, 0, sizeof(*c));
    c->parent = s->parent;
    for (size_t i = 0; i < s->n; i++)
        if (st_define(c, s->names[i], s->kinds[i]))
            return -ENOMEM;
    for (size_t i = 0; i < s->ns; i++)
        if (st_add_store(c, s->stores[i]))
            return -ENOMEM;
    return 0;
}

/* Jinja's Symbols.branch_update over the [body, elif, else] copies. */
static int st_branch_update(symtab *s, symtab br[3])
{
    int rc = 0;
    symtab counted = {0};
    for (int b = 0; b < 3 && !rc; b++)
        for (size_t i = 0; i < br[b].ns && !rc; i++)
            if (!st_has_store(s, br[b].stores[i]))
                rc = st_add_store(&counted, br[b].stores[i]);
    for (int b = 0; b < 3 && !rc; b++) {
        for (size_t i = 0; i < br[b].n && !rc; i++)
            rc = st_define(s, br[b].names[i], br[b].kinds[i]);
        for (size_t i = 0; i < br[b].ns && !rc; i++)
            rc = st_add_store(s, br[b].stores[i]);
    }
    for (size_t i = 0; i < counted.ns && !rc; i++) {
        const char *name = counted.stores[i];
        int count = 0;
        for (int b = 0; b < 3; b++)
            count += st_has_store(&br[b], name);
        if (count == 3)
            continue;
        rc = st_define(s, name, s->parent && st_find_ref(s->parent, name) ? K_ALIAS : K_RESOLVE);
    }
    st_free(&counted);
    return rc;
}

/* ---- the visitor of one frame's own statements ---- */
static int visit_expr(symtab *s, const mm_tpl_node *n)
{
    int rc = 0;
    if (!n)
        return 0;
    if (n->kind == MM_E_NAME)
        return st_load(s, n->name);
    if (n->kind == MM_E_NSREF)
        return st_load(s, n->name);
    const mm_tpl_node *sub[] = {n->a, n->b, n->c, n->d, n->e};
    for (size_t i = 0; i < 5 && !rc; i++)
        rc = visit_expr(s, sub[i]);
    for (size_t i = 0; i < n->nkids && !rc; i++)
        rc = visit_expr(s, n->kids[i]);
    return rc;
}

static int visit_target(symtab *s, const mm_tpl_node *t, int as_param)
{
    int rc = 0;
    if (t->kind == MM_E_NAME)
        return as_param ? st_param(s, t->name) : st_store(s, t->name);
    if (t->kind == MM_E_NSREF)
        return st_load(s, t->name);
    for (size_t i = 0; i < t->nkids && !rc; i++)
        rc = visit_target(s, t->kids[i], as_param);
    return rc;
}

static int visit_stmt(symtab *s, const mm_tpl_node *n);

static int visit_body(symtab *s, const mm_tpl_node *body)
{
    int rc = 0;
    if (!body)
        return 0;
    if (body->kind != MM_N_BODY)
        return visit_stmt(s, body);
    for (size_t i = 0; i < body->nkids && !rc; i++)
        rc = visit_stmt(s, body->kids[i]);
    return rc;
}

/* The elif nodes of an if chain, and the final else body. */
static const mm_tpl_node *elif_next(const mm_tpl_node *c)
{
    if (c && c->kind == MM_N_BODY && c->nkids == 1 && c->kids[0]->kind == MM_N_IF &&
        c->kids[0]->op == 1)
        return c->kids[0];
    return NULL;
}

/* visit_If: test here; body, elif list and else on copies; then merge.  An
 * elif node alone has no elif or else of its own. */
static int visit_if(symtab *s, const mm_tpl_node *n, int elif_only)
{
    symtab br[3] = {{0}, {0}, {0}};
    int rc = visit_expr(s, n->a);
    for (int b = 0; b < 3 && !rc; b++)
        rc = st_copy(s, &br[b]);
    if (!rc)
        rc = visit_body(&br[0], n->b);
    if (!elif_only) {
        const mm_tpl_node *c = n->c, *e;
        while (!rc && (e = elif_next(c))) {
            rc = visit_if(&br[1], e, 1);
            c = e->c;
        }
        if (!rc)
            rc = visit_body(&br[2], c);
    }
    if (!rc)
        rc = st_branch_update(s, br);
    for (int b = 0; b < 3; b++)
        st_free(&br[b]);
    return rc;
}

static int visit_stmt(symtab *s, const mm_tpl_node *n)
{
    int rc = 0;
    switch (n->kind) {
    case MM_N_BODY:
        return visit_body(s, n);
    case MM_N_OUTPUT:
        return visit_expr(s, n->a);
    case MM_N_IF:
        return visit_if(s, n, 0);
    case MM_N_FOR:
        return visit_expr(s, n->b);          /* only the iterable is ours */
    case MM_N_SET:
        if (!(rc = visit_expr(s, n->b)))
            rc = visit_target(s, n->a, 0);
        return rc;
    case MM_N_SETBLOCK:
        return visit_target(s, n->a, 0);
    case MM_N_MACRO:
        return st_store(s, n->name);
    case MM_N_FILTERBLOCK:
        return visit_expr(s, n->a);
    case MM_N_WITH:
        for (size_t i = 0; i < n->nkids && !rc; i++)
            rc = visit_expr(s, n->kids[i]->b);
        return rc;
    default:
        return 0;
    }
}

/* ---- frames ---- */
static int analyze_frame(scope *S, const symtab *parent, const mm_tpl_node *params_of,
                         mm_tpl_node *body);

/* Find the frames opened by statements of this frame and analyze them. */
static int nested_frames(scope *S, const symtab *s, const mm_tpl_node *n)
{
    int rc = 0;
    if (!n)
        return 0;
    switch (n->kind) {
    case MM_N_BODY:
        for (size_t i = 0; i < n->nkids && !rc; i++)
            rc = nested_frames(S, s, n->kids[i]);
        return rc;
    case MM_N_IF:
        if (!(rc = nested_frames(S, s, n->b)))
            rc = nested_frames(S, s, n->c);
        return rc;
    case MM_N_FOR:
        if (!(rc = analyze_frame(S, s, n, n->c)) && n->d)
            rc = analyze_frame(S, s, NULL, n->d);
        return rc;
    case MM_N_MACRO:
    case MM_N_WITH:
        return analyze_frame(S, s, n, n->b);
    case MM_N_SETBLOCK:
    case MM_N_FILTERBLOCK:
        return analyze_frame(S, s, NULL, n->b);
    default:
        return 0;
    }
}

static int analyze_frame(scope *S, const symtab *parent, const mm_tpl_node *owner,
                         mm_tpl_node *body)
{
    symtab s = {0};
    int rc = 0;
    if (!body)
        return 0;
    if (++S->depth > MM_TPL_MAX_NEST)
        return -E2BIG;
    s.parent = parent;
    if (owner && owner->kind == MM_N_FOR) {
        rc = visit_target(&s, owner->a, 1);
        if (!rc)
            rc = st_param(&s, "loop");
    } else if (owner && owner->kind == MM_N_MACRO) {
        for (size_t i = 0; i < owner->nkids && !rc; i++)
            rc = st_param(&s, owner->kids[i]->name);
        for (size_t i = 0; i < owner->nkids && !rc; i++)
            rc = visit_expr(&s, owner->kids[i]->a);
    } else if (owner && owner->kind == MM_N_WITH) {
        for (size_t i = 0; i < owner->nkids && !rc; i++)
            rc = visit_target(&s, owner->kids[i]->a, 0);
    }
    if (!rc)
        rc = visit_body(&s, body);
    size_t nu = 0;
    for (size_t i = 0; !rc && i < s.n; i++)
        nu += s.kinds[i] == K_UNDEF;
    if (!rc && nu) {
        body->undef = mm_tpl_alloc(&S->t->arena, nu * sizeof(*body->undef));
        if (!body->undef)
            rc = -ENOMEM;
        for (size_t i = 0; !rc && i < s.n; i++)
            if (s.kinds[i] == K_UNDEF)
                body->undef[body->nundef++] = s.names[i];
    }
    if (!rc)
        rc = nested_frames(S, &s, body);
    st_free(&s);
    S->depth--;
    return rc;
}

int mm_tpl_scope(mm_template *t, char *err, size_t errlen)
{
    scope S = {.t = t};
    int rc = analyze_frame(&S, NULL, NULL, t->root);
    if (rc == -E2BIG)
        snprintf(err, errlen, "template syntax error: scopes nested more than %d deep",
                 MM_TPL_MAX_NEST);
    else if (rc)
        snprintf(err, errlen, "out of memory");
    return rc;
}
