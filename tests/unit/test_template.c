/* test_template.c: the chat-template engine (worker/template*.c).
 *
 * The expected strings of the RENDERS tests are what Jinja2 3.1 renders when
 * set up as transformers sets it up (ImmutableSandboxedEnvironment,
 * trim_blocks, lstrip_blocks, loopcontrols, transformers' tojson); the
 * golden test at the end compares whole prompts from the real Qwen3,
 * Llama-3, DeepSeek-V3 and ChatML templates with transformers' own
 * apply_chat_template output (tests/fixtures/chat/goldens.json). */
#include <errno.h>
#include <jansson.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "template.h"
#include "test.h"

static char g_out[1 << 16];
static char g_err[1024];

/* Compile src and render it with ctx (JSON text or NULL) into g_out. */
static int render_src(const char *src, const char *ctx_json)
{
    mm_template *t = NULL;
    json_t *ctx = NULL;
    mm_buf out;
    int rc;
    g_out[0] = g_err[0] = '\0';
    if (ctx_json) {
        json_error_t je;
        ctx = json_loads(ctx_json, 0, &je);
        if (!ctx) {
            snprintf(g_err, sizeof(g_err), "bad test context: %s", je.text);
            return -9999;
        }
    }
    mm_buf_init(&out, 1u << 20);
    rc = mm_template_compile(src, &t, g_err, sizeof(g_err));
    if (!rc)
        rc = mm_template_render(t, ctx, &out, g_err, sizeof(g_err));
    if (!rc)
        snprintf(g_out, sizeof(g_out), "%s", mm_buf_cstr(&out));
    mm_buf_free(&out);
    mm_template_free(t);
    json_decref(ctx);
    return rc;
}

#define RENDERS(src, ctx, want)                                              \
    do {                                                                     \
        int rc_ = render_src(src, ctx);                                      \
        if (rc_) {                                                           \
            TEST_FAIL_("%s: rc %d: %s", src, rc_, g_err);                    \
            return;                                                          \
        }                                                                    \
        ASSERT_STR_EQ(g_out, want);                                          \
    } while (0)

/* Compile or render fails with want_rc and a message containing needle. */
#define FAILS(src, ctx, want_rc, needle)                                     \
    do {                                                                     \
        int rc_ = render_src(src, ctx);                                      \
        if (rc_ != (want_rc)) {                                              \
            TEST_FAIL_("%s: rc %d, want %d (%s) out \"%s\"", src, rc_,       \
                       want_rc, g_err, g_out);                               \
            return;                                                          \
        }                                                                    \
        ASSERT_CONTAINS(g_err, needle);                                      \
    } while (0)

TEST(text_and_values)
{
    RENDERS("plain text",
            NULL,
            "plain text");
    RENDERS("{{ s }}|{{ i }}|{{ f }}|{{ t }}|{{ n }}|{{ missing }}|",
            "{\"s\": \"str\", \"i\": 42, \"f\": 1.5, \"t\": true, \"n\": null}",
            "str|42|1.5|True|None||");
    RENDERS("{{ l }} {{ d }}",
            "{\"l\": [1, \"a'b\", null, true, 2.0], \"d\": {\"k\": [\"v\", {\"x\": \"q\\\"\"}]}}",
            "[1, \"a'b\", None, True, 2.0] {'k': ['v', {'x': 'q\"'}]}");
    RENDERS("{{ 0.1 + 0.2 }} {{ 1e16 }} {{ 1e-5 }} {{ 10 / 4 }} {{ 4 / 2 }} {{ 2 ** 10 / 4 }}",
            NULL,
            "0.30000000000000004 1e+16 1e-05 2.5 2.0 256.0");
    RENDERS("{{ (1, 'a') }} {{ (1,) }} {{ {'a': 1}.items() }} {{ {'a': 1}.keys() }} {{ range(3) }}",
            NULL,
            "(1, 'a') (1,) dict_items([('a', 1)]) dict_keys(['a']) range(0, 3)");
    RENDERS("{{ '\303\251\344\270\255\360\237\230\200' }}{{ ['\303\251\\n'] }}",
            NULL,
            "\303\251\344\270\255\360\237\230\200['\303\251\\n']");
}

TEST(whitespace_trim_lstrip)
{
    RENDERS("<ul>\n  {% for i in [1, 2] %}\n  <li>{{ i }}</li>\n  {% endfor %}\n</ul>\n",
            NULL,
            "<ul>\n  <li>1</li>\n  <li>2</li>\n</ul>");
    RENDERS("a  {% if true %}b{% endif %}  c\n  {{ 'x' }}  {% if true %}\ny{% endif %}",
            NULL,
            "a  b  c\n  x  y");
    RENDERS("  {# note #}\nA\n{#- strip -#}  B\n",
            NULL,
            "AB");
    RENDERS("x\n\n",
            NULL,
            "x\n");
    RENDERS("l1\r\nl2\rl3\r\n",
            NULL,
            "l1\nl2\nl3");
}

TEST(whitespace_control_marks)
{
    RENDERS("A  {%- if true -%}  B  {%- endif -%}  C",
            NULL,
            "ABC");
    RENDERS("A\n  {{- 'v' -}}\n  B",
            NULL,
            "AvB");
    RENDERS("A\n  {%+ if true %}B{% endif +%}\nC",
            NULL,
            "A\n  B\nC");
    RENDERS("{% raw %}{{ kept }} {% if %}{% endraw %}|{%- raw -%}  x  {%- endraw -%}  |",
            NULL,
            "{{ kept }} {% if %}|x|");
    RENDERS("{%- set x = 1 -%}\n\n{{ x }}\n",
            NULL,
            "1");
}

TEST(for_loop_variables)
{
    RENDERS("{% for m in msgs %}{{ loop.index }}{{ loop.index0 }}{{ loop.revindex }}{{ loop.revindex0 }}{{ loop.first }}{{ loop.last }}{{ loop.length }}{{ m.role }};{% endfor %}",
            "{\"msgs\": [{\"role\": \"system\", \"content\": \"Be nice.\"}, {\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"<think>\\nhmm\\n</think>\\n\\nHello!\"}]}",
            "1032TrueFalse3system;2121FalseFalse3user;3210FalseTrue3assistant;");
    RENDERS("{% for m in msgs %}{{ loop.previtem.role if loop.previtem is defined else '-' }}>{{ loop.nextitem.role if loop.nextitem is defined else '-' }} {{ loop.cycle('odd', 'even') }};{% endfor %}",
            "{\"msgs\": [{\"role\": \"system\", \"content\": \"Be nice.\"}, {\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"<think>\\nhmm\\n</think>\\n\\nHello!\"}]}",
            "->user odd;system>assistant even;user>- odd;");
    RENDERS("{% for a in [1, 2] %}{% for b in 'xy' %}{{ a }}{{ b }}{{ loop.index }}/{% endfor %}{{ loop.index }};{% endfor %}",
            NULL,
            "1x1/1y2/1;2x1/2y2/2;");
}

TEST(for_loop_sources)
{
    RENDERS("{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %}{% for k in d %}{{ k }}{% endfor %}",
            "{\"d\": {\"b\": 1, \"a\": [2]}}",
            "b=1;a=[2];ba");
    RENDERS("{% for c in 'h\303\251!' %}[{{ c }}]{% endfor %}{% for x in nothing %}no{% else %}else{% endfor %}{% for x in [] %}{% else %}E{% endfor %}",
            NULL,
            "[h][\303\251][!]elseE");
    RENDERS("{% for m in msgs[::-1] %}{{ m.role }},{% endfor %}{% for m in msgs[1:] %}{{ m['role'] }},{% endfor %}",
            "{\"msgs\": [{\"role\": \"system\", \"content\": \"Be nice.\"}, {\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"<think>\\nhmm\\n</think>\\n\\nHello!\"}]}",
            "assistant,user,system,user,assistant,");
    RENDERS("{% for x in range(10) if x is odd %}{{ x }}:{{ loop.length }},{% endfor %}",
            NULL,
            "1:5,3:5,5:5,7:5,9:5,");
    RENDERS("{% for x in [1, 2, 3, 4, 5] %}{% if x == 2 %}{% continue %}{% endif %}{% if x == 4 %}{% break %}{% endif %}{{ x }}{% endfor %}",
            NULL,
            "13");
}

TEST(scoping)
{
    RENDERS("{% set x = 1 %}{% for i in [1, 2] %}{{ x }}{% set x = x + i %}{{ x }};{% endfor %}{{ x }}",
            NULL,
            "12;13;1");
    RENDERS("{% for i in [1] %}{{ v }}{% endfor %}{% set v = 2 %}{{ v }}",
            "{\"v\": \"ctx\"}",
            "2");
    RENDERS("{{ v }}{% set v = 2 %}{{ v }}",
            "{\"v\": \"ctx\"}",
            "ctx2");
    RENDERS("{% if true %}{% set y = 'set in if' %}{% endif %}{{ y }}",
            NULL,
            "set in if");
    RENDERS("{% macro m() %}{{ g }}{% endmacro %}{% set g = 'late' %}{{ m() }}",
            NULL,
            "late");
    RENDERS("{% set ns = namespace(total=0, names='') %}{% for i in [1, 2, 3] %}{% set ns.total = ns.total + i %}{% set ns.names = ns.names ~ i %}{% endfor %}{{ ns.total }} {{ ns.names }} {{ ns }}",
            NULL,
            "6 123 <Namespace {'total': 6, 'names': '123'}>");
    RENDERS("{% with a = 1, b = 2 %}{{ a + b }}{% endwith %}[{{ a }}]",
            NULL,
            "3[]");
}

TEST(if_elif_else)
{
    RENDERS("{% for v in [0, 1, 2, ''] %}{% if v == 1 %}one{% elif v == 2 %}two{% elif v %}other{% else %}falsy{% endif %},{% endfor %}",
            NULL,
            "falsy,one,two,falsy,");
    RENDERS("{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}{{ add_generation_prompt }}",
            NULL,
            "False");
    RENDERS("{% if x is defined and x.y is defined %}deep{% else %}shallow{% endif %}",
            "{\"x\": {\"y\": 0}}",
            "deep");
}

TEST(set_forms)
{
    RENDERS("{% set a, b = [1, 2] %}{{ b }}{{ a }}{% set c = 1, 2 %}{{ c }}",
            NULL,
            "21(1, 2)");
    RENDERS("{% set block %}inside {{ 1 + 1 }}{% endset %}[{{ block }}]{% set up | upper | trim %}  shout  {% endset %}[{{ up }}]",
            NULL,
            "[inside 2][SHOUT]");
    RENDERS("{% filter upper %}abc {{ 'd' }}{% endfilter %}",
            NULL,
            "ABC D");
}

TEST(macros)
{
    RENDERS("{% macro tag(name, value='v', sep='=') %}{{ name }}{{ sep }}{{ value }}{% endmacro %}{{ tag('a') }} {{ tag('b', 2) }} {{ tag('c', sep=':') }} {{ tag(value='y', name='x') }}",
            NULL,
            "a=v b=2 c:v x=y");
    RENDERS("{% macro outer(x) %}[{{ inner(x) }}]{% endmacro %}{% macro inner(y) %}{{ y * 2 }}{% endmacro %}{{ outer(21) }}",
            NULL,
            "[42]");
    RENDERS("{% macro m(a) %}{{ a is defined }}{% endmacro %}{{ m() }}",
            NULL,
            "False");
}

TEST(arithmetic_and_precedence)
{
    RENDERS("{{ 1 + 2 * 3 }} {{ (1 + 2) * 3 }} {{ 7 // 2 }} {{ -7 // 2 }} {{ 7 % 3 }} {{ -7 % 3 }} {{ 2 ** 3 ** 2 }} {{ 7.5 // 2 }} {{ -7.5 % 2 }}",
            NULL,
            "7 9 3 -4 1 2 64 3.0 0.5");
    RENDERS("{{ 'a' ~ 1 ~ none ~ true }} {{ 'ab' * 3 }} {{ [1] * 2 + [2] }} {{ 1 + true }} {{ -x }} {{ +x }}",
            "{\"x\": 3}",
            "a1NoneTrue ababab [1, 1, 2] 2 -3 3");
    RENDERS("{{ messages|length - 1 }} {{ (messages|length - 1) - 1 }} {{ -1|abs }}",
            "{\"messages\": [{\"role\": \"system\", \"content\": \"Be nice.\"}, {\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"<think>\\nhmm\\n</think>\\n\\nHello!\"}]}",
            "2 1 1");
    RENDERS("{{ x or 'default' }} {{ 0 and 1 }} {{ 'a' and 'b' }} {{ none or 0 or [] }} {{ not x }}",
            "{\"x\": \"\"}",
            "default 0 b [] True");
    RENDERS("{{ 'yes' if cond else 'no' }} {{ 'x' if not cond }}|",
            "{\"cond\": false}",
            "no x|");
}

TEST(comparisons_and_membership)
{
    RENDERS("{{ 1 < 2 < 3 }} {{ 3 > 2 > 2 }} {{ 1 == 1.0 }} {{ true == 1 }} {{ 'a' < 'b' }} {{ [1, 2] < [1, 3] }} {{ none == none }} {{ 'a' != 'b' }}",
            NULL,
            "True False True True True True True True");
    RENDERS("{{ 'ell' in 'hello' }} {{ 'z' not in 'hello' }} {{ 2 in [1, 2] }} {{ 'k' in {'k': 1} }} {{ 'x' in nothing }} {{ '' in 'a' }}",
            NULL,
            "True True True True False True");
}

TEST(tests)
{
    RENDERS("{{ x is defined }}{{ y is defined }}{{ y is undefined }}{{ n is none }}{{ n is not none }}{{ s is string }}{{ d is mapping }}{{ l is iterable }}{{ s is iterable }}{{ l is sequence }}",
            "{\"x\": 1, \"n\": null, \"s\": \"s\", \"d\": {}, \"l\": []}",
            "TrueFalseTrueTrueFalseTrueTrueTrueTrueTrue");
    RENDERS("{{ 3 is number }}{{ true is number }}{{ 3 is integer }}{{ 3.0 is float }}{{ true is boolean }}{{ false is false }}{{ 1 is true }}{{ 3 is odd }}{{ 4 is even }}{{ 9 is divisibleby 3 }}{{ 9 is divisibleby(4) }}",
            NULL,
            "TrueTrueTrueTrueTrueTrueFalseTrueTrueTrueFalse");
    RENDERS("{{ 'abc' is lower }}{{ 'ABC' is upper }}{{ 1 is eq 1 }}{{ 2 is gt 1 }}{{ 1 is lt(1) }}{{ 'a' is in ['a'] }}{{ none is sameas none }}{{ 'trim' is filter }}{{ 'odd' is test }}",
            NULL,
            "TrueTrueTrueTrueFalseTrueTrueTrueTrue");
}

TEST(filters_strings)
{
    RENDERS("[{{ '  a b \\n'|trim }}][{{ 'xxaxx'|trim('x') }}][{{ 'AbC'|lower }}][{{ 'abc'|upper }}][{{ 'hello wORLD'|capitalize }}][{{ 'hello wORLD-x(y'|title }}]",
            NULL,
            "[a b][a][abc][ABC][Hello world][Hello World-X(Y]");
    RENDERS("{{ 'a-b-c'|replace('-', '+') }} {{ 'a-b-c'|replace('-', '', 1) }} {{ 5|string ~ '!' }} {{ '<a & \"b\">'|e }} {{ 'x'|safe }}",
            NULL,
            "a+b+c ab-c 5! &lt;a &amp; &#34;b&#34;&gt; x");
    RENDERS("[{{ 'a\\nb\\n\\nc'|indent(2) }}][{{ 'a\\nb'|indent(4, true) }}][{{ 'a\\n\\nb'|indent('> ', blank=true) }}]",
            NULL,
            "[a\n  b\n\n  c][    a\n    b][a\n> \n> b]");
}

TEST(filters_sequences)
{
    RENDERS("{{ [1, 2, 3]|length }} {{ 'h\303\251llo'|length }} {{ {'a': 1}|count }} {{ nothing|length }} {{ [3, 1]|first }} {{ [3, 1]|last }} {{ 'abc'|first }}",
            NULL,
            "3 5 1 0 3 1 a");
    RENDERS("{{ [3, 1, 2]|sort }} {{ ['b', 'A', 'c']|sort }} {{ ['b', 'A', 'c']|sort(case_sensitive=true) }} {{ [1, 3, 2]|sort(reverse=true) }} {{ [{'n': 2}, {'n': 1}]|sort(attribute='n') }}",
            NULL,
            "[1, 2, 3] ['A', 'b', 'c'] ['A', 'b', 'c'] [3, 2, 1] [{'n': 1}, {'n': 2}]");
    RENDERS("{{ [1, 2, 2, 'a', 'A']|unique|list }} {{ [4, 9, 2]|max }} {{ [4, 9, 2]|min }} {{ [1, 2, 3]|sum }} {{ [{'v': 2}, {'v': 3}]|sum(attribute='v') }} {{ 'abc'|reverse }} {{ [1, 2]|reverse|list }}",
            NULL,
            "[1, 2, 'a'] 9 2 6 5 cba [2, 1]");
    RENDERS("{{ ['a', 'b']|join }} {{ [1, 2]|join(', ') }} {{ msgs|map(attribute='role')|join('/') }} {{ [1, 2]|map('string')|list }} {{ 'ab'|list }}",
            "{\"msgs\": [{\"role\": \"system\", \"content\": \"Be nice.\"}, {\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"<think>\\nhmm\\n</think>\\n\\nHello!\"}]}",
            "ab 1, 2 system/user/assistant ['1', '2'] ['a', 'b']");
    RENDERS("{{ msgs|selectattr('role', 'equalto', 'user')|list|length }} {{ msgs|rejectattr('role', 'in', ['user', 'system'])|map(attribute='role')|list }} {{ [0, 1, '', 'a']|select|list }} {{ [1, 2, 3]|reject('odd')|list }}",
            "{\"msgs\": [{\"role\": \"system\", \"content\": \"Be nice.\"}, {\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"<think>\\nhmm\\n</think>\\n\\nHello!\"}]}",
            "1 ['assistant'] [1, 'a'] [2]");
    RENDERS("{{ {'b': 1, 'a': 2}|dictsort }} {{ {'b': 1, 'a': 2}|items|list }} {{ {'a': 1}|list }} {{ x|default('d') }} {{ ''|default('e', true) }} {{ none|d('f') }}",
            NULL,
            "[('a', 2), ('b', 1)] [('b', 1), ('a', 2)] ['a'] d e None");
    RENDERS("{% if msgs|selectattr('role', 'eq', 'nobody') %}a generator is true{% endif %}|{% if msgs|selectattr('role', 'eq', 'nobody')|list %}{% else %}an empty list is false{% endif %}",
            "{\"msgs\": [{\"role\": \"system\", \"content\": \"Be nice.\"}, {\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"<think>\\nhmm\\n</think>\\n\\nHello!\"}]}",
            "a generator is true|an empty list is false");
}

TEST(filters_numbers)
{
    RENDERS("{{ '42'|int + 1 }} {{ 3.9|int }} {{ 'x'|int }} {{ 'x'|int(7) }} {{ '0x1A'|int(0, 16) }} {{ '3.5'|float }} {{ 2|float }} {{ -3|abs }} {{ -2.5|abs }}",
            NULL,
            "43 3 0 7 26 3.5 2.0 3 2.5");
    RENDERS("{{ 2.5|round }} {{ 3.5|round }} {{ 2.675|round(2) }} {{ 2.1|round(0, 'ceil') }} {{ 2.9|round(1, 'floor') }} {{ 3|round }}",
            NULL,
            "2.0 4.0 2.67 3.0 2.9 3");
}

TEST(filter_tojson)
{
    RENDERS("{{ x|tojson }}",
            "{\"x\": {\"b\": [1, 2.5, \"\303\251\\n\\\"\\\\\\u0001\", null, true], \"a\": {\"z\": \"\344\270\255\"}, \"e\": [], \"f\": {}}}",
            "{\"b\": [1, 2.5, \"\303\251\\n\\\"\\\\\\u0001\", null, true], \"a\": {\"z\": \"\344\270\255\"}, \"e\": [], \"f\": {}}");
    RENDERS("{{ x|tojson(indent=2) }}",
            "{\"x\": {\"b\": [1, {\"c\": []}], \"a\": \"\303\251\"}}",
            "{\n  \"b\": [\n    1,\n    {\n      \"c\": []\n    }\n  ],\n  \"a\": \"\303\251\"\n}");
    RENDERS("{{ x|tojson(sort_keys=true) }} {{ x|tojson(ensure_ascii=true) }} {{ x|tojson(separators=[',', ':']) }} {{ x|tojson(indent='\\t') }}",
            "{\"x\": {\"b\": [1, \"\303\251\360\237\230\200\"], \"a\": 1}}",
            "{\"a\": 1, \"b\": [1, \"\303\251\360\237\230\200\"]} {\"b\": [1, \"\\u00e9\\ud83d\\ude00\"], \"a\": 1} {\"b\":[1,\"\303\251\360\237\230\200\"],\"a\":1} {\n\t\"b\": [\n\t\t1,\n\t\t\"\303\251\360\237\230\200\"\n\t],\n\t\"a\": 1\n}");
    RENDERS("{{ 'x'|tojson }} {{ 1.0|tojson }} {{ none|tojson }} {{ (1, 2)|tojson }}",
            NULL,
            "\"x\" 1.0 null [1, 2]");
}

TEST(string_methods)
{
    RENDERS("{{ 'a,b,,c'.split(',') }} {{ ' a  b \\t'.split() }} {{ 'a b c'.split(' ', 1) }} {{ 'a,b,c'.rsplit(',', 1) }} {{ ' a b '.rsplit(None, 1) }}",
            NULL,
            "['a', 'b', '', 'c'] ['a', 'b'] ['a', 'b c'] ['a,b', 'c'] [' a', 'b']");
    RENDERS("[{{ '  x  '.strip() }}][{{ 'xyx'.strip('x') }}][{{ '\\n\\nab\\n'.lstrip('\\n') }}][{{ 'ab\\n\\n'.rstrip() }}][{{ 'ab'.rstrip('b') }}]",
            NULL,
            "[x][y][ab\n][ab][a]");
    RENDERS("{{ 'hello'.startswith('he') }} {{ 'hello'.endswith('lo') }} {{ 'hello'.startswith(('x', 'h')) }} {{ 'h\303\251llo'.find('l') }} {{ 'hello'.rfind('l') }} {{ 'hello'.find('z') }} {{ 'banana'.count('an') }}",
            NULL,
            "True True True 2 3 -1 2");
    RENDERS("{{ 'hello'.replace('l', 'L') }} {{ 'hello'.replace('l', 'L', 1) }} {{ 'hello world'.title() }} {{ 'hELLO'.capitalize() }} {{ 'Ab'.upper() }}{{ 'Ab'.lower() }} {{ '12'.isdigit() }} {{ 'ab'.isalpha() }}",
            NULL,
            "heLLo heLlo Hello World Hello ABab True True");
    RENDERS("{{ 'a{}b{}'.format(1, 'x') }} {{ '{name}!'.format(name='n') }} {{ '%s=%d' % ('k', 3) }} {{ ', '.join(['a', 'b']) }} {{ 'l1\\nl2\\r\\nl3'.splitlines() }}",
            NULL,
            "a1bx n! k=3 a, b ['l1', 'l2', 'l3']");
    RENDERS("{% set c = m.content %}{{ c.split('</think>')[-1].lstrip('\\n') }}|{{ c.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') }}",
            "{\"m\": {\"role\": \"assistant\", \"content\": \"<think>\\nhmm\\n</think>\\n\\nHello!\"}}",
            "Hello!|hmm");
}

TEST(indexing_and_slicing)
{
    RENDERS("{{ 'abcdef'[1:4] }} {{ 'abcdef'[::2] }} {{ 'abcdef'[-2:] }} {{ 'abcdef'[:-2] }} {{ 'abcdef'[5:1:-1] }} {{ 'h\303\251llo'[1] }} {{ 'abc'[-1] }} {{ 'abc'[::-1] }}",
            NULL,
            "bcd ace ef abcd fedc \303\251 c cba");
    RENDERS("{{ l[0] }} {{ l[-1] }} {{ l[1:] }} {{ l[::-1] }} {{ l[5] is defined }} {{ l.0 }} {{ d['k'] }} {{ d.k }} {{ d.get('k') }} {{ d.get('z', 'dflt') }} {{ d['items'] }} {{ d.items is defined }}",
            "{\"l\": [1, 2, 3], \"d\": {\"k\": \"v\", \"items\": \"key named items\"}}",
            "1 3 [2, 3] [3, 2, 1] False 1 v v v dflt key named items True");
}

TEST(dict_methods)
{
    RENDERS("{{ d.keys()|list }} {{ d.values()|list }} {{ d.items()|list }} {{ d.get('missing') }} {{ d|length }}",
            "{\"d\": {\"x\": 1, \"y\": [2]}}",
            "['x', 'y'] [1, [2]] [('x', 1), ('y', [2])] None 2");
}

TEST(python_corners)
{
    RENDERS("{% if true: %}a{% elif x: %}b{% else: %}c{% endif %}{% for i in [1]: %}{{ i }}{% endfor %}",
            NULL,
            "a1");
    RENDERS("{% set caf\303\251 = '\303\274' %}{{ caf\303\251 }}{{ d[1, 2] is defined }}{{ 0x1F }}{{ 1_000 }}{{ 'a' 'b' }}",
            "{\"d\": {\"a\": 1}}",
            "\303\274False311000ab");
    RENDERS("{{ s }}|{{ [s] }}|{{ s|tojson(ensure_ascii=true) }}",
            "{\"s\": \"\177\302\240\342\200\213\357\277\277\360\237\230\200'\\\"\"}",
            "\177\302\240\342\200\213\357\277\277\360\237\230\200'\"|['\\x7f\\xa0\\u200b\\uffff\360\237\230\200\\'\"']|\"\\u007f\\u00a0\\u200b\\uffff\\ud83d\\ude00'\\\"\"");
    RENDERS("{{ '%s and %s' % ('a', [1]) }} {{ '%d%%' % 50 }} {{ 'no args' % [] }}",
            NULL,
            "a and [1] 50% no args");
    RENDERS("{% set g = msgs|selectattr('role', 'eq', 'user') %}{{ g|list|length }}{{ g|list|length }}|{{ (msgs|map(attribute='role')|first) }}",
            "{\"msgs\": [{\"role\": \"system\", \"content\": \"Be nice.\"}, {\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"Hello!\"}]}",
            "10|system");
    RENDERS("{{ (1, 2) + (3,) }} {{ (1, 2)[1:] }} {{ d.items()|first }} {{ range(2, 8, 3)|list }} {{ range(3)[1] }}",
            "{\"d\": {\"k\": \"v\"}}",
            "(1, 2, 3) (2,) ('k', 'v') [2, 5] 1");
}


/* ---- errors name the construct and the line ---- */
TEST(syntax_errors)
{
    FAILS("{% for %}", NULL, -EINVAL, "line 1");
    FAILS("a\nb\n{% if x %}unclosed", NULL, -EINVAL, "'if' is never closed");
    FAILS("a\nb\n{% if x %}unclosed", NULL, -EINVAL, "line 3");
    FAILS("{% endif %}", NULL, -EINVAL, "unexpected 'endif'");
    FAILS("{% for x in y %}\n{% endif %}", NULL, -EINVAL, "expected 'endfor' to close 'for'");
    FAILS("{% if x %}{% else %}{% else %}{% endif %}", NULL, -EINVAL, "unexpected 'else'");
    FAILS("{{ 'open }}", NULL, -EINVAL, "unterminated string");
    FAILS("{{ a ! b }}", NULL, -EINVAL, "unexpected character '!'");
    FAILS("{{ (1 }}", NULL, -EINVAL, "unexpected '}'");
    FAILS("{{ x", NULL, -EINVAL, "'{{' is never closed");
    FAILS("{# x", NULL, -EINVAL, "comment is never closed");
    FAILS("\n{% break %}", NULL, -EINVAL, "(line 2): 'break' outside of a loop");
    FAILS("{% frobnicate %}", NULL, -EINVAL, "unknown tag 'frobnicate'");
    FAILS("{{ x | nosuchfilter }}", NULL, -EINVAL, "no filter named 'nosuchfilter'");
    FAILS("{{ x is nosuchtest }}", NULL, -EINVAL, "no test named 'nosuchtest'");
    /* Jinja defers unknown names inside {% if %} and inline ifs to run time,
     * but not inside a loop or block within them */
    RENDERS("{% if false %}{{ x|nosuch }}{{ x is nosuch }}{{ x|wordwrap }}{% endif %}"
            "{{ 1 if true else x|nosuch }}", NULL, "1");
    FAILS("{% if true %}{{ x|nosuch }}{% endif %}", NULL, -EINVAL, "No filter named 'nosuch' found");
    FAILS("{% if true %}{{ x|wordwrap }}{% endif %}", NULL, -ENOTSUP, "filter 'wordwrap'");
    FAILS("{% if false %}{% for i in [1] %}{{ x|nosuch }}{% endfor %}{% endif %}", NULL, -EINVAL,
          "no filter named 'nosuch'");
    FAILS("{% set 1 = x %}", NULL, -EINVAL, "can only assign to names");
    FAILS("{% macro m(a=1, b) %}{% endmacro %}", NULL, -EINVAL, "non-default parameter");
    FAILS("bad \xff byte", NULL, -EINVAL, "not valid UTF-8");
}

TEST(unsupported_constructs_refused_at_compile)
{
    FAILS("{% include 'other.j2' %}", NULL, -ENOTSUP, "the 'include' tag");
    FAILS("{% extends 'base' %}", NULL, -ENOTSUP, "the 'extends' tag");
    FAILS("{{ x|wordwrap(10) }}", NULL, -ENOTSUP, "filter 'wordwrap'");
    FAILS("{% for x in y recursive %}{% endfor %}", NULL, -ENOTSUP, "recursive");
    FAILS("{% for i in x %}{% macro m() %}{% endmacro %}{% endfor %}", NULL, -ENOTSUP, "macro");
    FAILS("{{ f(*args) }}", NULL, -ENOTSUP, "*args");
    FAILS("{{ 'x' ~ \"\\N{BULLET}\" }}", NULL, -ENOTSUP, "\\N{...}");
    FAILS("{{ 99999999999999999999 }}", NULL, -ENOTSUP, "beyond 64 bits");
    FAILS("{{ 1e400 }}", NULL, -ENOTSUP, "beyond the double range");
}

TEST(runtime_errors)
{
    /* Jinja's default Undefined: printing works, attribute access fails */
    FAILS("{{ x.y }}", NULL, -EINVAL, "'x' is undefined");
    FAILS("\n\n{{ d.a.b }}", "{\"d\": {}}", -EINVAL, "(line 3): 'dict object' has no attribute 'a'");
    FAILS("{{ 'a' + 1 }}", NULL, -EINVAL, "can only concatenate str (not \"int\") to str");
    FAILS("{{ m.content + '!' }}", "{\"m\": {\"content\": null}}", -EINVAL,
          "unsupported operand type(s) for +: 'NoneType' and 'str'");
    FAILS("{{ '</think>' in m.content }}", "{\"m\": {\"content\": null}}", -EINVAL,
          "argument of type 'NoneType' is not iterable");
    FAILS("{{ [1].append(2) }}", NULL, -EINVAL, "access to attribute 'append' of 'list' object is unsafe");
    FAILS("{{ 1 / 0 }}", NULL, -EINVAL, "division by zero");
    FAILS("{{ x|tojson }}", NULL, -EINVAL, "not JSON serializable");
    FAILS("{{ 5|length }}", NULL, -EINVAL, "has no len()");
    FAILS("{% set x = 1 %}{% set x.a = 2 %}", NULL, -EINVAL, "non-namespace");
    FAILS("{{ ('a' if false).upper() }}", NULL, -EINVAL, "no else section");
    /* valid Python this engine does not do: a 500, not a wrong prompt */
    FAILS("{{ 'x'.zfill(3) }}", NULL, -ENOTSUP, "string method 'zfill'");
    FAILS("{{ 9223372036854775807 + 1 }}", NULL, -ENOTSUP, "beyond 64 bits");
    FAILS("{{ [1, 2]|select }}", NULL, -ENOTSUP, "printing a generator");
    FAILS("{{ [x] }}", NULL, -ENOTSUP, "undefined value ('x') inside a list");
}

TEST(raise_exception_message_verbatim)
{
    const char *src =
        "{% for m in messages %}{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
        "{% endif %}{{ m.content }}{% endfor %}";
    int rc = render_src(src, "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, "
                             "{\"role\": \"user\", \"content\": \"b\"}]}");
    ASSERT_EQ(rc, -EBADMSG);
    ASSERT_STR_EQ(g_err, "Conversation roles must alternate user/assistant/user/assistant/...");
    rc = render_src(src, "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, "
                         "{\"role\": \"assistant\", \"content\": \"b\"}]}");
    ASSERT_EQ(rc, 0);
    ASSERT_STR_EQ(g_out, "ab");
}

TEST(failed_render_leaves_output_unchanged)
{
    mm_template *t;
    mm_buf out;
    char err[256];
    mm_buf_init(&out, 1024);
    ASSERT_EQ(mm_buf_append_str(&out, "keep"), 0);
    ASSERT_EQ(mm_template_compile("abc{{ raise_exception('no') }}", &t, err, sizeof(err)), 0);
    ASSERT_EQ(mm_template_render(t, NULL, &out, err, sizeof(err)), -EBADMSG);
    ASSERT_EQ(out.len, 4);
    ASSERT_STR_EQ(mm_buf_cstr(&out), "keep");
    mm_template_free(t);
    /* the caller's cap counts too */
    mm_buf_free(&out);
    mm_buf_init(&out, 8);
    ASSERT_EQ(mm_template_compile("0123456789", &t, err, sizeof(err)), 0);
    ASSERT_EQ(mm_template_render(t, NULL, &out, err, sizeof(err)), -E2BIG);
    ASSERT_EQ(out.len, 0);
    ASSERT_CONTAINS(err, "does not fit");
    mm_template_free(t);
    mm_buf_free(&out);
}

/* ---- caps ---- */
TEST(caps)
{
    FAILS("{% for i in range(20000) %}{{ 'x' * 1000 }}{% endfor %}", NULL, -E2BIG, "output grew past");
    FAILS("{{ 'x' * 20000000 }}", NULL, -E2BIG, "grew past");
    FAILS("{% for i in range(100000) %}{% for j in range(100) %}{% endfor %}{% endfor %}", NULL,
          -E2BIG, "loop iterations");
    FAILS("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", NULL, -E2BIG,
          "nested more than 32 deep");
    FAILS("{{ range(200000)|length }}", NULL, -E2BIG, "range too big");

    char *deep = malloc(4096);
    ASSERT_TRUE(deep != NULL);
    size_t n = 0;
    n += (size_t)snprintf(deep + n, 4096 - n, "{{ ");
    for (int i = 0; i < 300; i++)
        deep[n++] = '(';
    deep[n++] = '1';
    for (int i = 0; i < 300; i++)
        deep[n++] = ')';
    snprintf(deep + n, 4096 - n, " }}");
    int rc = render_src(deep, NULL);
    ASSERT_EQ(rc, -E2BIG);
    n = 0;
    for (int i = 0; i < 150; i++)
        n += (size_t)snprintf(deep + n, 4096 - n, "{%% if 1 %%}");
    for (int i = 0; i < 150; i++)
        n += (size_t)snprintf(deep + n, 4096 - n, "{%% endif %%}");
    rc = render_src(deep, NULL);
    ASSERT_EQ(rc, -E2BIG);
    ASSERT_CONTAINS(g_err, "nested more than");
    free(deep);

    size_t big = MM_TPL_MAX_SOURCE + 10;
    char *src = malloc(big + 1);
    ASSERT_TRUE(src != NULL);
    memset(src, 'a', big);
    src[big] = '\0';
    rc = render_src(src, NULL);
    free(src);
    ASSERT_EQ(rc, -E2BIG);
}

/* ---- the chat entry points ---- */
TEST(chat_render_context_is_transformers_one)
{
    mm_template *t;
    mm_buf out;
    char err[256];
    json_error_t je;
    json_t *msgs = json_loads("[{\"role\": \"user\", \"content\": \"a\"}, "
                              "{\"role\": \"assistant\", \"content\": \"b\"}]", 0, &je);
    json_t *extra = json_loads("{\"enable_thinking\": false, \"pad_token\": \"<pad>\"}", 0, &je);
    json_t *tools = json_loads("{\"tools\": [{\"type\": \"function\"}]}", 0, &je);
    json_t *bad = json_loads("{\"messages\": []}", 0, &je);
    ASSERT_TRUE(msgs && extra && tools && bad);
    ASSERT_EQ(mm_template_compile(
                  "{{ messages|length }}|{{ add_generation_prompt }}|{{ bos_token is defined }}|"
                  "{{ eos_token }}|{{ tools is none }}|{{ tools is defined }}|{{ documents is none }}|"
                  "{{ enable_thinking }}|{{ pad_token }}",
                  &t, err, sizeof(err)), 0);
    mm_buf_init(&out, 4096);
    ASSERT_EQ(mm_chat_render(t, msgs, 1, NULL, "</s>", extra, &out, err, sizeof(err)), 0);
    ASSERT_STR_EQ(mm_buf_cstr(&out), "2|True|False|</s>|True|True|True|False|<pad>");
    mm_buf_reset(&out);
    ASSERT_EQ(mm_chat_render(t, msgs, 0, "<s>", NULL, tools, &out, err, sizeof(err)), 0);
    ASSERT_STR_EQ(mm_buf_cstr(&out), "2|False|True||False|True|True||");
    mm_buf_reset(&out);
    ASSERT_EQ(mm_chat_render(t, msgs, 0, NULL, NULL, bad, &out, err, sizeof(err)), -EINVAL);
    ASSERT_CONTAINS(err, "'messages' may not be overridden");
    json_t *none = json_array();
    ASSERT_EQ(mm_chat_render(t, none, 0, NULL, NULL, NULL, &out, err, sizeof(err)), -EINVAL);
    ASSERT_CONTAINS(err, "empty conversation");
    json_decref(none);
    mm_buf_free(&out);
    mm_template_free(t);
    json_decref(msgs);
    json_decref(extra);
    json_decref(tools);
    json_decref(bad);
}

TEST(special_tokens_and_template_source)
{
    json_error_t je;
    char err[256];
    json_t *m = NULL;
    const char *src;
    json_t *cfg = json_loads(
        "{\"bos_token\": {\"__type\": \"AddedToken\", \"content\": \"<B>\", \"lstrip\": false},"
        " \"eos_token\": \"<E>\", \"unk_token\": null, \"pad_token\": \"\","
        " \"additional_special_tokens\": [\"<x>\", {\"content\": \"<y>\"}],"
        " \"chat_template\": [{\"name\": \"default\", \"template\": \"D\"},"
        "                     {\"name\": \"tool_use\", \"template\": \"T\"}]}", 0, &je);
    ASSERT_TRUE(cfg != NULL);
    ASSERT_EQ(mm_chat_special_tokens(cfg, &m, err, sizeof(err)), 0);
    char *s = json_dumps(m, JSON_COMPACT);
    /* no additional_special_tokens: transformers 5 does not pass them */
    ASSERT_STR_EQ(s, "{\"bos_token\":\"<B>\",\"eos_token\":\"<E>\"}");
    free(s);
    json_decref(m);
    ASSERT_EQ(mm_chat_template_source(cfg, NULL, &src, err, sizeof(err)), 0);
    ASSERT_STR_EQ(src, "D");
    ASSERT_EQ(mm_chat_template_source(cfg, "tool_use", &src, err, sizeof(err)), 0);
    ASSERT_STR_EQ(src, "T");
    ASSERT_EQ(mm_chat_template_source(cfg, "rag", &src, err, sizeof(err)), -ENOENT);
    json_object_set_new(cfg, "eos_token", json_integer(5));
    ASSERT_EQ(mm_chat_special_tokens(cfg, &m, err, sizeof(err)), -EINVAL);
    ASSERT_CONTAINS(err, "eos_token");
    json_object_set_new(cfg, "chat_template", json_string("S"));
    ASSERT_EQ(mm_chat_template_source(cfg, NULL, &src, err, sizeof(err)), 0);
    ASSERT_STR_EQ(src, "S");
    json_object_del(cfg, "chat_template");
    ASSERT_EQ(mm_chat_template_source(cfg, NULL, &src, err, sizeof(err)), -ENOENT);
    json_decref(cfg);
}

/* A compiled template is shared by the worker's threads. */
typedef struct thr_arg {
    const mm_template *t;
    const json_t *msgs;
    const char *want;
    int bad;
} thr_arg;

static void *thr_render(void *p)
{
    thr_arg *a = p;
    char err[256];
    for (int i = 0; i < 200; i++) {
        mm_buf out;
        mm_buf_init(&out, 1 << 16);
        if (mm_chat_render(a->t, a->msgs, 1, NULL, NULL, NULL, &out, err, sizeof(err)) ||
            strcmp(mm_buf_cstr(&out), a->want))
            a->bad++;
        mm_buf_free(&out);
    }
    return NULL;
}

TEST(concurrent_renders_of_one_template)
{
    mm_template *t;
    char err[256];
    json_error_t je;
    json_t *msgs = json_loads("[{\"role\": \"user\", \"content\": \"Hé\"}, "
                              "{\"role\": \"assistant\", \"content\": \"x\"}]", 0, &je);
    ASSERT_TRUE(msgs != NULL);
    ASSERT_EQ(mm_template_compile(
                  "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
                  "<{{ m.role|upper }}>{{ m.content|tojson }}{% endfor %}{{ ns.n }}"
                  "{% if add_generation_prompt %}+{% endif %}", &t, err, sizeof(err)), 0);
    thr_arg a[4];
    pthread_t th[4];
    for (int i = 0; i < 4; i++) {
        a[i] = (thr_arg){t, msgs, "<USER>\"H\303\251\"<ASSISTANT>\"x\"2+", 0};
        ASSERT_EQ(pthread_create(&th[i], NULL, thr_render, &a[i]), 0);
    }
    int bad = 0;
    for (int i = 0; i < 4; i++) {
        pthread_join(th[i], NULL);
        bad += a[i].bad;
    }
    ASSERT_EQ(bad, 0);
    mm_template_free(t);
    json_decref(msgs);
}

/* ---- goldens: the real templates against transformers ---- */
static const char *tokdir(void)
{
    const char *d = getenv("MM_TOKENIZERS");
    return d && *d ? d : "build/tokenizers";
}

/* Print where got and want first differ. */
static void show_diff(const char *what, const char *got, const char *want)
{
    size_t i = 0;
    while (got[i] && got[i] == want[i])
        i++;
    size_t from = i > 40 ? i - 40 : 0;
    printf("  %s: differs at byte %zu\n    got:  \"%.80s\"\n    want: \"%.80s\"\n", what, i,
           got + from, want + from);
}

/* One template: every case of cases.json against goldens.json. */
static int golden_template(const char *name, const json_t *spec, const json_t *cases,
                           const json_t *gold, int *texts, int *refusals)
{
    char path[512], err[1024];
    json_error_t je;
    int fails = 0;
    const char *tok = json_string_value(json_object_get(spec, "tokenizer"));
    snprintf(path, sizeof(path), "%s/%s/tokenizer_config.json", tokdir(), tok ? tok : "?");
    /* llama3's model_max_length is 1e30: too big for a JSON integer here */
    json_t *cfg = json_load_file(path, JSON_DECODE_INT_AS_REAL, &je);
    if (!cfg) {
        printf("  %s: cannot read %s: %s (run tests/fixtures/fetch_tokenizers.sh)\n", name, path,
               je.text);
        return 1;
    }
    const char *src = json_string_value(json_object_get(spec, "chat_template"));
    if (!src && mm_chat_template_source(cfg, NULL, &src, err, sizeof(err))) {
        printf("  %s: %s\n", name, err);
        json_decref(cfg);
        return 1;
    }
    json_t *g = json_object_get(json_object_get(gold, "templates"), name);
    const char *gsrc = json_string_value(json_object_get(g, "template"));
    if (!gsrc || strcmp(gsrc, src)) {
        printf("  %s: the template is not the one goldens.json was made from\n", name);
        json_decref(cfg);
        return 1;
    }
    mm_template *t;
    if (mm_template_compile(src, &t, err, sizeof(err))) {
        printf("  %s: compile: %s\n", name, err);
        json_decref(cfg);
        return 1;
    }
    json_t *specials;
    if (mm_chat_special_tokens(cfg, &specials, err, sizeof(err))) {
        printf("  %s: %s\n", name, err);
        mm_template_free(t);
        json_decref(cfg);
        return 1;
    }
    /* the special tokens transformers passed are the ones we derive */
    json_t *gspec = json_object_get(g, "special_tokens");
    static const char *const keys[] = {"bos_token", "eos_token"};
    for (int k = 0; k < 2; k++) {
        json_t *a = json_object_get(specials, keys[k]), *b = json_object_get(gspec, keys[k]);
        if ((a == NULL) != (b == NULL) || (a && !json_equal(a, b))) {
            printf("  %s: %s differs from transformers' special_tokens_map\n", name, keys[k]);
            fails++;
        }
    }
    const char *bos = json_string_value(json_object_get(specials, "bos_token"));
    const char *eos = json_string_value(json_object_get(specials, "eos_token"));
    size_t i;
    json_t *c;
    json_array_foreach(json_object_get(cases, "cases"), i, c) {
        const char *cname = json_string_value(json_object_get(c, "name"));
        json_t *want = json_object_get(json_object_get(g, "renders"), cname);
        json_t *extra = json_deep_copy(specials);
        json_object_del(extra, "bos_token");
        json_object_del(extra, "eos_token");
        json_object_update(extra, json_object_get(c, "kwargs"));
        if (json_object_get(c, "tools"))
            json_object_set(extra, "tools", json_object_get(c, "tools"));
        mm_buf out;
        mm_buf_init(&out, MM_TPL_MAX_OUTPUT);
        int rc = mm_chat_render(t, json_object_get(c, "messages"),
                                json_is_true(json_object_get(c, "add_generation_prompt")), bos,
                                eos, extra, &out, err, sizeof(err));
        const char *wtext = json_string_value(json_object_get(want, "text"));
        char label[160];
        snprintf(label, sizeof(label), "%s/%s", name, cname ? cname : "?");
        if (!want) {
            printf("  %s: no golden\n", label);
            fails++;
        } else if (wtext) {
            if (rc) {
                printf("  %s: failed (%d): %s\n", label, rc, err);
                fails++;
            } else if (out.len != json_string_length(json_object_get(want, "text")) ||
                       memcmp(mm_buf_cstr(&out), wtext, out.len)) {
                show_diff(label, mm_buf_cstr(&out), wtext);
                fails++;
            } else {
                (*texts)++;
            }
        } else if (rc == 0) {
            printf("  %s: rendered, but transformers refused: %s\n", label,
                   json_string_value(json_object_get(want, "error")));
            fails++;
        } else {
            (*refusals)++;
        }
        mm_buf_free(&out);
        json_decref(extra);
    }
    json_decref(specials);
    mm_template_free(t);
    json_decref(cfg);
    return fails;
}

TEST(goldens_real_templates)
{
    json_error_t je;
    json_t *cases = json_load_file("tests/fixtures/chat/cases.json", 0, &je);
    ASSERT_TRUE(cases != NULL);
    json_t *gold = json_load_file("tests/fixtures/chat/goldens.json", 0, &je);
    if (!gold) {
        printf("  goldens.json missing (make it with tests/fixtures/chat/make_goldens.py)\n");
        json_decref(cases);
        test_cur_failed = 1;
        return;
    }
    int fails = 0, texts = 0, refusals = 0, templates = 0;
    const char *name;
    json_t *spec;
    json_object_foreach(json_object_get(cases, "templates"), name, spec) {
        fails += golden_template(name, spec, cases, gold, &texts, &refusals);
        templates++;
    }
    printf("  goldens: %d templates, %d prompts byte-identical, %d refusals matched, %d failures\n",
           templates, texts, refusals, fails);
    json_decref(gold);
    json_decref(cases);
    ASSERT_EQ(fails, 0);
    ASSERT_EQ(templates, 6);
    ASSERT_TRUE(texts > 90);
}

int main(void)
{
    RUN(text_and_values);
    RUN(whitespace_trim_lstrip);
    RUN(whitespace_control_marks);
    RUN(for_loop_variables);
    RUN(for_loop_sources);
    RUN(scoping);
    RUN(if_elif_else);
    RUN(set_forms);
    RUN(macros);
    RUN(arithmetic_and_precedence);
    RUN(comparisons_and_membership);
    RUN(tests);
    RUN(filters_strings);
    RUN(filters_sequences);
    RUN(filters_numbers);
    RUN(filter_tojson);
    RUN(string_methods);
    RUN(indexing_and_slicing);
    RUN(dict_methods);
    RUN(python_corners);
    RUN(syntax_errors);
    RUN(unsupported_constructs_refused_at_compile);
    RUN(runtime_errors);
    RUN(raise_exception_message_verbatim);
    RUN(failed_render_leaves_output_unchanged);
    RUN(caps);
    RUN(chat_render_context_is_transformers_one);
    RUN(special_tokens_and_template_source);
    RUN(concurrent_renders_of_one_template);
    RUN(goldens_real_templates);
    return test_summary();
}
