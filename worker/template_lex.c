/* template_lex.c: template source to tokens, with Jinja2's whitespace rules
 * as transformers configures them.
 *
 * transformers compiles chat templates with trim_blocks=True and
 * lstrip_blocks=True, and Jinja's defaults keep_trailing_newline=False and
 * newline normalisation.  Those rules decide every byte between the tags, so
 * they follow Jinja's lexer closely:
 *   - "\r\n" and "\r" become "\n"; one trailing newline of the source goes;
 *   - "{%-", "{{-", "{#-" strip all whitespace before the tag, "-%}", "-}}",
 *     "-#}" all whitespace after it;
 *   - trim_blocks: one "\n" right after "%}" or "#}" goes ("+%}" keeps it);
 *   - lstrip_blocks: spaces and tabs between the start of a line and "{%" or
 *     "{#" go when nothing else is on the line before the tag ("{%+" keeps
 *     them); never before "{{".
 * "Whitespace" is Python's (str.isspace), as Jinja's regexes use \s. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "template_impl.h"
#include "pctdec.h"

typedef struct lexer {
    const char *s;
    size_t n;
    size_t pos;
    int line;
    int line_starting;   /* the previous token ended with a newline */
    mm_tpl_arena *arena;
    mm_tpl_tokens *out;
    char *err;
    size_t errlen;
} lexer;

static int lex_fail(lexer *L, int line, const char *fmt, const char *arg)
{
    char msg[200];
    snprintf(msg, sizeof(msg), fmt, arg);
    snprintf(L->err, L->errlen, "template syntax error (line %d): %s", line, msg);
    return -EINVAL;
}

static int count_lines(const char *s, size_t n)
{
    int k = 0;
    for (size_t i = 0; i < n; i++)
        k += s[i] == '\n';
    return k;
}

static mm_tpl_token *push(lexer *L, int type, int line)
{
    mm_tpl_tokens *t = L->out;
    if (t->n == t->cap) {
        size_t nc = t->cap ? t->cap * 2 : 256;
        mm_tpl_token *v = realloc(t->v, nc * sizeof(*v));
        if (!v)
            return NULL;
        t->v = v;
        t->cap = nc;
    }
    mm_tpl_token *k = &t->v[t->n++];
    memset(k, 0, sizeof(*k));
    k->type = type;
    k->line = line;
    return k;
}

static int oom(lexer *L)
{
    snprintf(L->err, L->errlen, "out of memory");
    return -ENOMEM;
}

/* Bytes of Python whitespace starting at i. */
static size_t skip_space(const char *s, size_t n, size_t i)
{
    while (i < n) {
        uint32_t cp;
        size_t k = mm_tpl_u8_dec(s, n, i, &cp);
        if (!mm_tpl_py_isspace(cp))
            break;
        i += k;
    }
    return i;
}

/* Length of s[0..n) with trailing Python whitespace removed. */
static size_t rstrip_len(const char *s, size_t n)
{
    size_t keep = 0, i = 0;
    while (i < n) {
        uint32_t cp;
        size_t k = mm_tpl_u8_dec(s, n, i, &cp);
        i += k;
        if (!mm_tpl_py_isspace(cp))
            keep = i;
    }
    return keep;
}

/* Emit the text before a tag, applying "-" or lstrip_blocks. */
static int emit_data(lexer *L, const char *text, size_t len, int sign, int lstrip_ok, int line)
{
    if (sign == '-') {
        len = rstrip_len(text, len);
    } else if (sign != '+' && lstrip_ok) {
        size_t l = len;
        while (l > 0 && text[l - 1] != '\n')
            l--;
        /* Jinja: the rest of the line must be one or more \s characters */
        if ((l > 0 || L->line_starting) && l < len && skip_space(text, len, l) == len)
            len = l;
    }
    if (len == 0)
        return 0;
    mm_tpl_token *k = push(L, MM_TK_DATA, line);
    if (!k)
        return oom(L);
    k->s = mm_tpl_strndup(L->arena, text, len);
    if (!k->s)
        return oom(L);
    k->n = len;
    return 0;
}

/* Decode a string literal's body as Python's "unicode-escape" codec does
 * (Jinja's choice): \n \t \\ \' \" \xhh \uhhhh \Uhhhhhhhh \ooo ...;
 * an unknown escape stays as written. */
static int decode_string(lexer *L, const char *s, size_t n, int line, mm_tpl_token *k)
{
    char *o = mm_tpl_alloc(L->arena, n + 1);   /* decoding never grows */
    size_t j = 0;
    if (!o)
        return oom(L);
    for (size_t i = 0; i < n; i++) {
        if (s[i] != '\\' || i + 1 >= n) {
            o[j++] = s[i];
            continue;
        }
        char c = s[++i];
        uint32_t cp;
        int digits = 0;
        switch (c) {
        case '\n': continue;                 /* line continuation */
        case '\\': o[j++] = '\\'; continue;
        case '\'': o[j++] = '\''; continue;
        case '"': o[j++] = '"'; continue;
        case 'a': o[j++] = '\a'; continue;
        case 'b': o[j++] = '\b'; continue;
        case 'f': o[j++] = '\f'; continue;
        case 'n': o[j++] = '\n'; continue;
        case 'r': o[j++] = '\r'; continue;
        case 't': o[j++] = '\t'; continue;
        case 'v': o[j++] = '\v'; continue;
        case 'x': digits = 2; break;
        case 'u': digits = 4; break;
        case 'U': digits = 8; break;
        case 'N':
            snprintf(L->err, L->errlen,
                     "template syntax error (line %d): \\N{...} escapes are not supported", line);
            return -ENOTSUP;
        default:
            if (c >= '0' && c <= '7') {
                cp = 0;
                int m = 0;
                while (m < 3 && i < n && s[i] >= '0' && s[i] <= '7') {
                    cp = cp * 8 + (uint32_t)(s[i] - '0');
                    i++;
                    m++;
                }
                i--;
                j += mm_tpl_u8_enc(cp, o + j);
                continue;
            }
            o[j++] = '\\';
            o[j++] = c;
            continue;
        }
        cp = 0;
        for (int m = 0; m < digits; m++) {
            int h = i + 1 + (size_t)m < n ? mm_hexval((unsigned char)s[i + 1 + m]) : -1;
            if (h < 0)
                return lex_fail(L, line, "truncated \\%s escape in a string",
                                c == 'x' ? "xXX" : c == 'u' ? "uXXXX" : "UXXXXXXXX");
            cp = cp * 16 + (uint32_t)h;
        }
        i += (size_t)digits;
        if (cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
            return lex_fail(L, line, "escape in a string is not a valid code point%s", "");
        j += mm_tpl_u8_enc(cp, o + j);
    }
    o[j] = '\0';
    k->s = o;
    k->n = j;
    return 0;
}

static int isdig(int c) { return c >= '0' && c <= '9'; }
static int isnamestart(int c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_'; }
static int isnamechar(int c) { return isnamestart(c) || isdig(c); }

/* Bytes of a non-ASCII letter (or, after the start, letter or digit) at i:
 * Jinja's names are Python identifiers.  0 if there is none. */
static size_t name_cp(const char *s, size_t n, size_t i, int start)
{
    uint32_t cp;
    if (i >= n || (unsigned char)s[i] < 0x80)
        return 0;
    size_t k = mm_tpl_u8_dec(s, n, i, &cp);
    if (mm_tpl_py_isalpha(cp) || (!start && mm_tpl_py_isalnum(cp)))
        return k;
    return 0;
}

/* Digits with single underscores between them: (\d+_)*\d+.  0 if none. */
static size_t match_digits(const char *s, size_t n, size_t i)
{
    size_t st = i;
    if (i >= n || !isdig(s[i]))
        return 0;
    while (i < n) {
        if (isdig(s[i]))
            i++;
        else if (s[i] == '_' && i + 1 < n && isdig(s[i + 1]) && i > st)
            i++;
        else
            break;
    }
    return i - st;
}

/* Jinja's float rule: D(.D)?e[+-]?D | D.D, not right after a '.'. */
static size_t match_float(const char *s, size_t n, size_t i)
{
    if (i > 0 && s[i - 1] == '.')
        return 0;
    size_t d = match_digits(s, n, i);
    if (!d)
        return 0;
    size_t p = i + d, frac = 0;
    if (p < n && s[p] == '.')
        frac = match_digits(s, n, p + 1);
    size_t q = frac ? p + 1 + frac : p;
    if (q < n && (s[q] == 'e' || s[q] == 'E')) {
        size_t r = q + 1;
        if (r < n && (s[r] == '+' || s[r] == '-'))
            r++;
        size_t ed = match_digits(s, n, r);
        if (ed)
            return r + ed - i;
    }
    return frac ? p + 1 + frac - i : 0;
}

static size_t match_int(const char *s, size_t n, size_t i, int *base)
{
    size_t p = i;
    *base = 10;
    if (s[p] == '0' && p + 1 < n && strchr("bBoOxX", s[p + 1]) && s[p + 1]) {
        char b = (char)(s[p + 1] | 0x20);
        *base = b == 'b' ? 2 : b == 'o' ? 8 : 16;
        size_t q = p + 2, cnt = 0;
        for (;;) {
            size_t r = q;
            if (r < n && s[r] == '_')
                r++;
            int h = r < n ? mm_hexval((unsigned char)s[r]) : -1;
            if (h < 0 || h >= *base)
                break;
            q = r + 1;
            cnt++;
        }
        if (cnt)
            return q - i;
        *base = 10;
    }
    if (s[p] == '0') {
        p++;
        while (p < n) {
            size_t r = p;
            if (s[r] == '_')
                r++;
            if (r < n && s[r] == '0')
                p = r + 1;
            else
                break;
        }
        return p - i;
    }
    if (s[p] >= '1' && s[p] <= '9') {
        p++;
        while (p < n) {
            size_t r = p;
            if (s[r] == '_')
                r++;
            if (r < n && isdig(s[r]))
                p = r + 1;
            else
                break;
        }
        return p - i;
    }
    return 0;
}

/* Tokens inside {{ }} or {% %} until the closing delimiter. */
static int lex_tag(lexer *L, int block, int open_line)
{
    const char *s = L->s;
    size_t n = L->n;
    char stack[MM_TPL_MAX_NEST];
    int depth = 0;
    for (;;) {
        size_t i = L->pos;
        if (i >= n)
            return lex_fail(L, open_line, "unexpected end of template: '%s' is never closed",
                            block ? "{%" : "{{");
        char c = s[i];
        if (depth == 0) {
            char closer = block ? '%' : '}';
            size_t end = 0;
            if (block && c == '+' && i + 2 < n && s[i + 1] == '%' && s[i + 2] == '}') {
                end = i + 3;                        /* "+%}": keep the newline */
            } else if (c == '-' && i + 2 < n && s[i + 1] == closer && s[i + 2] == '}') {
                end = skip_space(s, n, i + 3);      /* "-%}", "-}}": eat all */
            } else if (c == closer && i + 1 < n && s[i + 1] == '}') {
                end = i + 2;
                if (block && end < n && s[end] == '\n')
                    end++;      /* trim_blocks */
            }
            if (end) {
                if (!push(L, block ? MM_TK_BLOCK_END : MM_TK_VAR_END, L->line))
                    return oom(L);
                L->line += count_lines(s + i, end - i);
                L->line_starting = s[end - 1] == '\n';
                L->pos = end;
                return 0;
            }
        }
        if (c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v') {
            L->line += c == '\n';
            L->pos++;
            continue;
        }
        size_t m;
        int base;
        if ((m = match_float(s, n, i))) {
            char num[64];
            size_t k = 0;
            for (size_t q = i; q < i + m && k + 1 < sizeof(num); q++)
                if (s[q] != '_')
                    num[k++] = s[q];
            num[k] = '\0';
            mm_tpl_token *t = push(L, MM_TK_FLOAT, L->line);
            if (!t)
                return oom(L);
            t->d = strtod(num, NULL);
            L->pos += m;
            continue;
        }
        if (isdig(c) && (m = match_int(s, n, i, &base))) {
            char num[80];
            size_t k = 0, q = i + (base == 10 ? 0 : 2);
            for (; q < i + m && k + 1 < sizeof(num); q++)
                if (s[q] != '_')
                    num[k++] = s[q];
            num[k] = '\0';
            errno = 0;
            char *endp;
            long long v = strtoll(num, &endp, base);
            if (errno || *endp) {
                snprintf(L->err, L->errlen, "template uses an unsupported construct (line %d): "
                         "integer literal %s beyond 64 bits", L->line, num);
                return -ENOTSUP;
            }
            mm_tpl_token *t = push(L, MM_TK_INT, L->line);
            if (!t)
                return oom(L);
            t->i = v;
            L->pos += m;
            continue;
        }
        if (isnamestart(c) || name_cp(s, n, i, 1)) {
            size_t q = i;
            for (;;) {
                size_t k = q < n && isnamechar(s[q]) ? 1 : name_cp(s, n, q, 0);
                if (!k)
                    break;
                q += k;
            }
            mm_tpl_token *t = push(L, MM_TK_NAME, L->line);
            if (!t)
                return oom(L);
            t->s = mm_tpl_strndup(L->arena, s + i, q - i);
            if (!t->s)
                return oom(L);
            t->n = q - i;
            L->pos = q;
            continue;
        }
        if (c == '\'' || c == '"') {
            size_t q = i + 1;
            while (q < n && s[q] != c) {
                if (s[q] == '\\' && q + 1 < n)
                    q++;
                q++;
            }
            if (q >= n)
                return lex_fail(L, L->line, "unterminated string literal%s", "");
            mm_tpl_token *t = push(L, MM_TK_STRING, L->line);
            if (!t)
                return oom(L);
            int rc = decode_string(L, s + i + 1, q - i - 1, L->line, t);
            if (rc)
                return rc;
            L->line += count_lines(s + i, q + 1 - i);
            L->pos = q + 1;
            continue;
        }
        static const struct { const char *txt; int op; } two[] = {
            {"//", MM_OP_FLOORDIV}, {"**", MM_OP_POW}, {"==", MM_OP_EQ},
            {"!=", MM_OP_NE}, {"<=", MM_OP_LE}, {">=", MM_OP_GE},
        };
        int op = 0;
        size_t oplen = 1;
        for (size_t k = 0; k < sizeof(two) / sizeof(two[0]); k++)
            if (i + 1 < n && s[i] == two[k].txt[0] && s[i + 1] == two[k].txt[1]) {
                op = two[k].op;
                oplen = 2;
                break;
            }
        if (!op && c && strchr("+-/*%~[](){}<>=.:|,;", c))
            op = c;
        if (!op) {
            char ch[8];
            uint32_t cp;
            size_t k = mm_tpl_u8_dec(s, n, i, &cp);
            memcpy(ch, s + i, k);
            ch[k] = '\0';
            return lex_fail(L, L->line, "unexpected character '%s'", ch);
        }
        if (op == '(' || op == '[' || op == '{') {
            if (depth >= MM_TPL_MAX_NEST) {
                snprintf(L->err, L->errlen,
                         "template syntax error (line %d): brackets nested too deeply", L->line);
                return -E2BIG;
            }
            stack[depth++] = (char)op;
        } else if (op == ')' || op == ']' || op == '}') {
            char want = op == ')' ? '(' : op == ']' ? '[' : '{';
            char opch[2] = {(char)op, 0};
            if (depth == 0 || stack[depth - 1] != want)
                return lex_fail(L, L->line, "unexpected '%s'", opch);
            depth--;
        }
        mm_tpl_token *t = push(L, MM_TK_OP, L->line);
        if (!t)
            return oom(L);
        t->op = op;
        L->pos += oplen;
    }
}

/* Match "{%[-+]?\s*<word>\s*(-%}\s*|+%}|%}\n?)" at i; the end offset or 0.
 * end_rules: whether "+%}" and the trim_blocks newline apply (Jinja's raw
 * begin has neither, its endraw both). */
static size_t match_word_tag(const char *s, size_t n, size_t i, const char *word,
                             int *sign, int end_rules)
{
    size_t wl = strlen(word);
    if (i + 2 > n || s[i] != '{' || s[i + 1] != '%')
        return 0;
    size_t p = i + 2;
    *sign = 0;
    if (p < n && (s[p] == '-' || s[p] == '+'))
        *sign = s[p++];
    p = skip_space(s, n, p);
    if (p + wl > n || memcmp(s + p, word, wl) != 0)
        return 0;
    p = skip_space(s, n, p + wl);
    if (p + 3 <= n && s[p] == '-' && s[p + 1] == '%' && s[p + 2] == '}')
        return skip_space(s, n, p + 3);
    if (end_rules && p + 3 <= n && s[p] == '+' && s[p + 1] == '%' && s[p + 2] == '}')
        return p + 3;
    if (p + 2 <= n && s[p] == '%' && s[p + 1] == '}') {
        p += 2;
        if (end_rules && p < n && s[p] == '\n')
            p++;
        return p;
    }
    return 0;
}

static int lex_raw(lexer *L, size_t body, int line)
{
    const char *s = L->s;
    size_t n = L->n;
    for (size_t i = body; i + 1 < n; i++) {
        int sign;
        size_t end = match_word_tag(s, n, i, "endraw", &sign, 1);
        if (!end)
            continue;
        int rc = emit_data(L, s + body, i - body, sign, 1, L->line);
        if (rc)
            return rc;
        L->line += count_lines(s + body, end - body);
        L->line_starting = s[end - 1] == '\n';
        L->pos = end;
        return 0;
    }
    return lex_fail(L, line, "'raw' block is never closed with 'endraw'%s", "");
}

static int lex_comment(lexer *L, size_t body, int line)
{
    const char *s = L->s;
    size_t n = L->n;
    for (size_t i = body; i + 1 < n; i++) {
        size_t end = 0;
        if (s[i] == '+' && i + 2 < n && s[i + 1] == '#' && s[i + 2] == '}')
            end = i + 3;
        else if (s[i] == '-' && i + 2 < n && s[i + 1] == '#' && s[i + 2] == '}')
            end = skip_space(s, n, i + 3);
        else if (s[i] == '#' && s[i + 1] == '}') {
            end = i + 2;
            if (end < n && s[end] == '\n')
                end++;
        }
        if (end) {
            L->line += count_lines(s + body, end - body);
            L->line_starting = s[end - 1] == '\n';
            L->pos = end;
            return 0;
        }
    }
    return lex_fail(L, line, "comment is never closed with '#}'%s", "");
}

int mm_tpl_lex(const char *src, size_t len, mm_tpl_arena *a, mm_tpl_tokens *out,
               char *err, size_t errlen)
{
    /* Normalise newlines and drop one trailing newline, as Jinja does. */
    char *s = mm_tpl_alloc(a, len + 1);
    size_t n = 0;
    if (!s) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    for (size_t i = 0; i < len; i++) {
        if (src[i] == '\r') {
            s[n++] = '\n';
            if (i + 1 < len && src[i + 1] == '\n')
                i++;
        } else {
            s[n++] = src[i];
        }
    }
    if (n > 0 && s[n - 1] == '\n')
        n--;
    s[n] = '\0';

    lexer L = {.s = s, .n = n, .line = 1, .line_starting = 1, .arena = a, .out = out,
               .err = err, .errlen = errlen};
    int rc;
    while (L.pos < n) {
        size_t i = L.pos;
        while (i + 1 < n && !(s[i] == '{' && (s[i + 1] == '{' || s[i + 1] == '%' || s[i + 1] == '#')))
            i++;
        if (i + 1 >= n) {
            rc = emit_data(&L, s + L.pos, n - L.pos, 0, 0, L.line);
            if (rc)
                return rc;
            break;
        }
        char kind = s[i + 1];
        int sign = (i + 2 < n && (s[i + 2] == '-' || s[i + 2] == '+')) ? s[i + 2] : 0;
        int data_line = L.line;
        int tag_line = L.line + count_lines(s + L.pos, i - L.pos);
        size_t raw_end = 0;
        int raw_sign = 0;
        if (kind == '%')
            raw_end = match_word_tag(s, n, i, "raw", &raw_sign, 0);
        rc = emit_data(&L, s + L.pos, i - L.pos, raw_end ? raw_sign : sign, kind != '{', data_line);
        if (rc)
            return rc;
        L.line = tag_line;
        if (raw_end) {
            L.line += count_lines(s + i, raw_end - i);
            L.line_starting = s[raw_end - 1] == '\n';
            rc = lex_raw(&L, raw_end, tag_line);
        } else if (kind == '#') {
            rc = lex_comment(&L, i + 2 + (sign ? 1 : 0), tag_line);
        } else {
            if (!push(&L, kind == '%' ? MM_TK_BLOCK_BEGIN : MM_TK_VAR_BEGIN, tag_line))
                return oom(&L);
            L.pos = i + 2 + (sign ? 1 : 0);
            L.line_starting = 0;
            rc = lex_tag(&L, kind == '%', tag_line);
        }
        if (rc)
            return rc;
    }
    if (!push(&L, MM_TK_EOF, L.line))
        return oom(&L);
    return 0;
}
