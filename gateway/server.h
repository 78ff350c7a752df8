/* server.h: the gateway process: event-loop threads sharing the listen port
 * (SO_REUSEPORT), each with its own httpd and libcurl multi handle, and the
 * signal handling that stops them. */
#ifndef MM_SERVER_H
#define MM_SERVER_H
#include "config.h"

/* Load config_path and run until SIGTERM/SIGINT (graceful: stop accepting,
 * finish requests within shutdown_grace_ms). SIGHUP re-reads the file.
 * Returns 0 on a clean stop, -errno when start-up failed (message in err). */
int mm_server_run(const char *config_path, char *err, size_t errlen);
#endif
