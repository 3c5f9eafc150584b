/*
 * log.c - CIRCUITS_LOG=debug: one line per socket life-cycle event.
 *
 * Lines go to stderr with one write(2) each (whole lines, even from many
 * threads), prefixed "circuits[pid]".  Warnings, such as an operator that
 * cannot be reached, are printed whatever the level: the program must never
 * fail in silence.
 */
#define _GNU_SOURCE
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "preload.h"

static bool debug;

void cp_log_init(const char *level) { debug = level && strcmp(level, "debug") == 0; }

bool cp_debug(void) { return debug; }

static void emit(const char *fmt, va_list ap)
{
    char line[512];
    int n = snprintf(line, sizeof(line), "circuits[%d]: ", (int)getpid());
    int m = vsnprintf(line + n, sizeof(line) - (size_t)n - 1, fmt, ap);
    size_t len = (size_t)n + (m < 0 ? 0 : (size_t)m);
    if (len > sizeof(line) - 2)
        len = sizeof(line) - 2;
    line[len++] = '\n';
    /* The real write: ours would look the descriptor up for nothing. */
    if (real.write)
        (void)!real.write(STDERR_FILENO, line, len);
}

void cp_log(const char *fmt, ...)
{
    if (!debug)
        return;
    va_list ap;
    va_start(ap, fmt);
    emit(fmt, ap);
    va_end(ap);
}

void cp_warn(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    emit(fmt, ap);
    va_end(ap);
}
