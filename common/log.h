/* log.h: leveled logging to stderr, one line per call, thread-safe. */
#ifndef MM_LOG_H
#define MM_LOG_H

enum { MM_LOG_DEBUG, MM_LOG_INFO, MM_LOG_WARN, MM_LOG_ERROR };

void mm_log_set_level(int level);
int  mm_log_get_level(void);
void mm_log(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define mm_debug(...) mm_log(MM_LOG_DEBUG, __VA_ARGS__)
#define mm_info(...)  mm_log(MM_LOG_INFO, __VA_ARGS__)
#define mm_warn(...)  mm_log(MM_LOG_WARN, __VA_ARGS__)
#define mm_error(...) mm_log(MM_LOG_ERROR, __VA_ARGS__)
#endif
