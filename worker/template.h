/* template.h: the model's own chat template, rendered like transformers.
 *
 * transformers renders tokenizer_config.json's "chat_template" with Jinja2
 * (ImmutableSandboxedEnvironment, trim_blocks and lstrip_blocks on, the
 * loopcontrols extension, its own tojson filter and the raise_exception and
 * strftime_now globals).  This module implements the subset of that language
 * real chat templates use, over jansson values, so the worker builds
 * byte-identical prompts.  Anything outside the subset is an error that names
 * the construct and line: a prompt that is silently different from the one
 * the model was trained on is worse than a refusal.
 *
 *   mm_template *t;
 *   if (mm_template_compile(src, &t, err, sizeof err)) ... 400/500 ...
 *   mm_chat_render(t, messages, 1, bos, eos, NULL, &out, err, sizeof err);
 *   mm_template_free(t);
 *
 * A compiled template is immutable: several threads may render it at once. */
#ifndef MM_TEMPLATE_H
#define MM_TEMPLATE_H
#include <jansson.h>
#include <stddef.h>

#include "buf.h"

/* Caps.  Output is also bounded by the caller's mm_buf max. */
#define MM_TPL_MAX_SOURCE  (1u << 20)   /* template source bytes */
#define MM_TPL_MAX_OUTPUT  (16u << 20)  /* rendered bytes, and any one value built */
#define MM_TPL_MAX_NEST    100          /* nesting of blocks and expressions */
#define MM_TPL_MAX_CALLS   32           /* macro call depth */
#define MM_TPL_MAX_ITERS   1000000      /* loop iterations + macro calls per render */

typedef struct mm_template mm_template;

/* Compile a NUL-terminated template.  0; -EINVAL syntax error (err names the
 * construct and line); -ENOTSUP a construct this engine does not implement
 * (include, an unknown filter, ...); -E2BIG over MM_TPL_MAX_SOURCE or
 * MM_TPL_MAX_NEST; -ENOMEM. */
int  mm_template_compile(const char *src, mm_template **out, char *err, size_t errlen);

/* Render with `ctx` (a JSON object, or NULL) as the template's variables,
 * appending to `out`; on failure `out` is left as it was.  Returns 0 or:
 *   -EBADMSG  the template called raise_exception(msg); err is msg verbatim
 *             (the request broke the template's rules: a 400);
 *   -EINVAL   a runtime error of the template on this input: undefined
 *             attribute, type error, ... (err names it and the line);
 *   -ENOTSUP  a construct this engine does not implement (a 500);
 *   -E2BIG    a cap was hit (output, value size, iterations, call depth);
 *   -ENOMEM. */
int  mm_template_render(const mm_template *tpl, const json_t *ctx, mm_buf *out,
                        char *err, size_t errlen);

void mm_template_free(mm_template *tpl);

/* Render a chat the way transformers' apply_chat_template(tokenize=False)
 * does (an empty `messages` is refused as there, -EINVAL): variables
 * messages, tools=None, documents=None, add_generation_prompt,
 * bos_token and eos_token (each omitted when NULL, as transformers omits an
 * unset special token), then every key of `extra` (the tokenizer's other
 * special tokens, "tools", "documents", chat_template_kwargs such as
 * enable_thinking), which may override all but messages and
 * add_generation_prompt.  Returns as mm_template_render. */
int  mm_chat_render(const mm_template *tpl, const json_t *messages,
                    int add_generation_prompt, const char *bos_token,
                    const char *eos_token, const json_t *extra, mm_buf *out,
                    char *err, size_t errlen);

/* transformers' special_tokens_map from a parsed tokenizer_config.json, the
 * special tokens apply_chat_template passes to the template: bos/eos/unk/
 * sep/pad/cls/mask_token as strings (plain or AddedToken objects), leaving
 * out unset or empty ones.  As in transformers 5 (what the goldens come
 * from), additional_special_tokens are not among them.  *out is a new
 * object.  0, -EINVAL (err says which key is malformed), -ENOMEM. */
int  mm_chat_special_tokens(const json_t *tokenizer_config, json_t **out,
                            char *err, size_t errlen);

/* The template source in a parsed tokenizer_config.json: "chat_template" as
 * a string, or from the list form [{"name","template"}] the entry called
 * `name` (NULL: "default").  *src points into the config.  0, -ENOENT
 * (no such template), -EINVAL (malformed). */
int  mm_chat_template_source(const json_t *tokenizer_config, const char *name,
                             const char **src, char *err, size_t errlen);
#endif
