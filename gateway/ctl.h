/* ctl.h: `modelmux-gateway ctl`, the fleet's command line over the admin
 * API (/admin/models, /admin/backends, see admin_models.h): list models
 * and backends as tables, add a model entry (optionally waiting until it
 * is published), remove one, change split or backend weights.
 *
 * Reloading the configuration file is deliberately not a command: the file
 * is re-read on SIGHUP (kill -HUP, systemctl reload), and changes made
 * through the API live in the running gateway only, so the next reload or
 * restart returns to what the file says.
 *
 * One synchronous libcurl easy request at a time; every answer is read into
 * a capped buffer, and every string from the server is stripped of control
 * characters before it reaches the terminal. */
#ifndef MM_CTL_H
#define MM_CTL_H

/* argv[0] is "ctl". Exit status: 0 success; 1 the API refused (its OpenAI
 * error message on stderr), could not be reached, or an input file was
 * unusable; 2 bad usage. */
int mm_ctl_main(int argc, char **argv);
#endif
