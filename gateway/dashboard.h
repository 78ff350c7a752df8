/* dashboard.h: the admin dashboard page (gateway/dashboard.html), embedded
 * in the binary at build time by tools/embed.sh so the gateway serves it
 * with no files to install and no network (the page loads nothing from
 * elsewhere). The bytes are the HTML file exactly, without a trailing NUL. */
#ifndef MM_DASHBOARD_H
#define MM_DASHBOARD_H
#include <stddef.h>

extern const unsigned char mm_dashboard_html[];
extern const size_t mm_dashboard_html_len;
#endif
