/* server.h: the gateway process: event-loop threads sharing the listen port
 * (SO_REUSEPORT), each with its own httpd and libcurl multi handle, and the
 * signal handling that stops them. */
#ifndef MM_SERVER_H
#define MM_SERVER_H
#include "config.h"

/* Run until SIGTERM/SIGINT. Returns 0 on a clean stop, -errno when start-up
 * failed (message in err). */
int mm_server_run(const mm_gateway_cfg *cfg, char *err, size_t errlen);
#endif
