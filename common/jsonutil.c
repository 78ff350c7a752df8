/* jsonutil.c: JSON string escaping and OpenAI error bodies. */
#include "jsonutil.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

int mm_json_append_str(mm_buf *out, const char *s, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    int rc = mm_buf_append(out, "\"", 1);
    size_t start = 0;
    for (size_t i = 0; i < n && rc == 0; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x20 && c != '"' && c != '\\')
            continue;
        rc = mm_buf_append(out, s + start, i - start);
        char esc[7] = {'\\', 0};
        size_t elen = 2;
        switch (c) {
        case '"': esc[1] = '"'; break;
        case '\\': esc[1] = '\\'; break;
        case '\n': esc[1] = 'n'; break;
        case '\r': esc[1] = 'r'; break;
        case '\t': esc[1] = 't'; break;
        default:
            esc[1] = 'u'; esc[2] = '0'; esc[3] = '0';
            esc[4] = hex[c >> 4]; esc[5] = hex[c & 15];
            elen = 6;
        }
        if (rc == 0)
            rc = mm_buf_append(out, esc, elen);
        start = i + 1;
    }
    if (rc == 0)
        rc = mm_buf_append(out, s + start, n - start);
    if (rc == 0)
        rc = mm_buf_append(out, "\"", 1);
    return rc;
}

const char *mm_oai_error_type(int status)
{
    if (status == 429)
        return "rate_limit_error";
    if (status == 401 || status == 403)
        return "authentication_error";
    if (status >= 500)
        return "server_error";
    return "invalid_request_error";
}

int mm_oai_error_body(mm_buf *out, int status, const char *param, const char *message)
{
    int rc = mm_buf_append_str(out, "{\"error\":{\"message\":");
    if (rc == 0)
        rc = mm_json_append_str(out, message, strlen(message));
    if (rc == 0)
        rc = mm_buf_printf(out, ",\"type\":\"%s\",\"param\":", mm_oai_error_type(status));
    if (rc == 0)
        rc = param ? mm_json_append_str(out, param, strlen(param)) : mm_buf_append_str(out, "null");
    if (rc == 0)
        rc = mm_buf_printf(out, ",\"code\":%d}}", status);
    return rc;
}

static size_t skip_ws(const char *s, size_t n, size_t i)
{
    while (i < n && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r'))
        i++;
    return i;
}

/* s[i] == '"': return the index just past the closing quote; *plain is set
 * when the string has no escapes. */
static size_t skip_string(const char *s, size_t n, size_t i, int *plain)
{
    *plain = 1;
    for (i++; i < n; i++) {
        if (s[i] == '\\') {
            *plain = 0;
            i++;
        } else if (s[i] == '"') {
            return i + 1;
        }
    }
    return n;
}

static size_t skip_value(const char *s, size_t n, size_t i)
{
    int plain;
    if (i >= n)
        return n;
    if (s[i] == '"')
        return skip_string(s, n, i, &plain);
    if (s[i] == '{' || s[i] == '[') {
        int depth = 0;
        while (i < n) {
            char c = s[i];
            if (c == '"') {
                i = skip_string(s, n, i, &plain);
                continue;
            }
            if (c == '{' || c == '[')
                depth++;
            else if (c == '}' || c == ']') {
                if (--depth == 0)
                    return i + 1;
            }
            i++;
        }
        return n;
    }
    while (i < n && s[i] != ',' && s[i] != '}' && s[i] != ']' && s[i] != ' ' && s[i] != '\t' &&
           s[i] != '\n' && s[i] != '\r')
        i++;
    return i;
}

int mm_json_top_value_span(const char *s, size_t n, const char *key, size_t *vstart,
                           size_t *vend)
{
    size_t klen = strlen(key);
    size_t i = skip_ws(s, n, 0);
    if (i >= n || s[i] != '{')
        return -ENOENT;
    i++;
    for (;;) {
        i = skip_ws(s, n, i);
        if (i >= n || s[i] != '"')
            return -ENOENT;
        int plain;
        size_t kend = skip_string(s, n, i, &plain);
        int match = plain && kend - i - 2 == klen && memcmp(s + i + 1, key, klen) == 0;
        i = skip_ws(s, n, kend);
        if (i >= n || s[i] != ':')
            return -ENOENT;
        i = skip_ws(s, n, i + 1);
        size_t vs = i;
        i = skip_value(s, n, i);
        if (match) {
            *vstart = vs;
            *vend = i;
            return 0;
        }
        i = skip_ws(s, n, i);
        if (i >= n || s[i] != ',')
            return -ENOENT;
        i++;
    }
}
