/* main.c: modelmux-gateway command line. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "ctl.h"
#include "log.h"
#include "server.h"
#include "stats_cli.h"

static void usage(FILE *f)
{
    fprintf(f,
            "usage: modelmux-gateway -c CONFIG.json [--check] [-v]\n"
            "       modelmux-gateway stats [-c CONFIG | --redis URL] [--prefix P] [--minutes N] [--json]\n"
            "       modelmux-gateway ctl [--admin URL | -c CONFIG] [--token T] [--json] COMMAND (ctl --help)\n"
            "  -c, --config FILE   gateway configuration (JSON; see docs/CONFIG.md)\n"
            "  --check             validate the configuration and exit (0 valid, 1 invalid)\n"
            "  -v, --verbose       debug logging\n"
            "  -h, --help          this help\n");
}

int main(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], "stats") == 0)
        return mm_stats_main(argc - 1, argv + 1);
    if (argc > 1 && strcmp(argv[1], "ctl") == 0)
        return mm_ctl_main(argc - 1, argv + 1);
    const char *path = NULL;
    int check = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if ((strcmp(a, "-c") == 0 || strcmp(a, "--config") == 0) && i + 1 < argc) {
            path = argv[++i];
        } else if (strncmp(a, "--config=", 9) == 0) {
            path = a + 9;
        } else if (strcmp(a, "--check") == 0) {
            check = 1;
        } else if (strcmp(a, "-v") == 0 || strcmp(a, "--verbose") == 0) {
            mm_log_set_level(MM_LOG_DEBUG);
        } else if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            usage(stdout);
            return 0;
        } else {
            fprintf(stderr, "modelmux-gateway: unknown or incomplete argument '%s'\n", a);
            usage(stderr);
            return 2;
        }
    }
    if (!path) {
        fprintf(stderr, "modelmux-gateway: -c CONFIG is required\n");
        usage(stderr);
        return 2;
    }
    char err[1024] = "";
    mm_gateway_cfg *cfg = NULL;
    if (mm_config_load_file(path, &cfg, err, sizeof err) != 0) {
        fprintf(stderr, "modelmux-gateway: config error: %s\n", err);
        return 1;
    }
    if (check) {
        printf("%s: configuration is valid (%zu models)\n", path, cfg->nmodels);
        mm_config_free(cfg);
        return 0;
    }
    mm_config_free(cfg); /* validated; the server loads it again and owns it */
    int rc = mm_server_run(path, err, sizeof err);
    if (rc)
        fprintf(stderr, "modelmux-gateway: %s\n", err);
    return rc ? 1 : 0;
}
