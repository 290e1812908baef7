/*
 * A diagnostic run loop that counts the Perl ops an interpreter executes,
 * by op type and by source file, for the benchmarks (bench/bin/op-count).
 * It is installed only when PAGI_RS_COUNT_OPS is set in the environment,
 * and prints its tables to stderr when the interpreter is freed.  The
 * counters are process-wide and unlocked: the figures mean something with
 * one interpreter (the default), which is how the benchmark runs it.
 */
#include "glue.h"

#include <stdio.h>
#include <stdlib.h>

#define MAX_FILES 128

static uint64_t ops_by_type[MAXO];
static uint64_t ops_total;

typedef struct {
    const char *name; /* the first COP's copy; compared by content */
    uint64_t ops;
} file_count;

/* Ops per statement, keyed by its COP: the line-level profile. */
#define STATEMENT_SLOTS 65536
typedef struct {
    const COP *cop;
    /* Copied when first seen: a COP of code freed since (a string eval)
     * cannot be asked at report time. */
    const char *file;
    line_t line;
    uint64_t ops;
} statement_count;
static statement_count statements[STATEMENT_SLOTS];

static statement_count *statement_slot(const COP *cop)
{
    size_t i = ((uintptr_t)cop >> 4) & (STATEMENT_SLOTS - 1);
    size_t probes;
    for (probes = 0; probes < STATEMENT_SLOTS; probes++) {
        statement_count *s = &statements[i];
        if (s->cop == cop)
            return s;
        if (!s->cop) {
            s->cop = cop;
            return s;
        }
        i = (i + 1) & (STATEMENT_SLOTS - 1);
    }
    return NULL;
}

static file_count files[MAX_FILES];
static int nfiles;
static file_count other_files = {"(other files)", 0};

static file_count *file_bucket(const char *name)
{
    int i;
    if (!name)
        return &other_files;
    for (i = 0; i < nfiles; i++)
        if (files[i].name == name || strcmp(files[i].name, name) == 0)
            return &files[i];
    if (nfiles == MAX_FILES)
        return &other_files;
    /* COPs live as long as their code; a file whose code is freed while the
     * interpreter runs (a string eval) would leave a dangling name, so keep
     * a copy. */
    files[nfiles].name = strdup(name);
    if (!files[nfiles].name)
        return &other_files;
    return &files[nfiles++];
}

/* The standard run loop (run.c's Perl_runops_standard) with counters. */
static int counting_runops(pTHX)
{
    OP *op = PL_op;
    file_count *bucket = &other_files;
    statement_count *statement = NULL;
    while (op) {
        ops_total++;
        ops_by_type[op->op_type]++;
        if (op->op_type == OP_NEXTSTATE || op->op_type == OP_DBSTATE) {
            bucket = file_bucket(CopFILE((COP *)op));
            statement = statement_slot((COP *)op);
            if (statement && !statement->file) {
                statement->file = bucket->name;
                statement->line = CopLINE((COP *)op);
            }
        }
        bucket->ops++;
        if (statement)
            statement->ops++;
        PL_op = op = op->op_ppaddr(aTHX);
    }
    PERL_ASYNC_CHECK();
    TAINT_NOT;
    return 0;
}

void pagi_opcount_install(pTHX)
{
    const char *flag = getenv("PAGI_RS_COUNT_OPS");
    if (flag && *flag && strcmp(flag, "0") != 0)
        PL_runops = counting_runops;
}

static int statements_desc(const void *a, const void *b)
{
    uint64_t x = ((const statement_count *)a)->ops, y = ((const statement_count *)b)->ops;
    return x < y ? 1 : x > y ? -1 : 0;
}

static int by_count_desc(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? 1 : x > y ? -1 : 0;
}

void pagi_opcount_report(pTHX)
{
    struct {
        uint64_t count;
        int type;
    } rows[MAXO];
    int i, n = 0;
    if (PL_runops != counting_runops)
        return;
    for (i = 0; i < MAXO; i++)
        if (ops_by_type[i]) {
            rows[n].count = ops_by_type[i];
            rows[n].type = i;
            n++;
        }
    qsort(rows, n, sizeof rows[0], by_count_desc);
    fprintf(stderr, "pagi-rs op count: total %llu\n", (unsigned long long)ops_total);
    for (i = 0; i < n && i < 40; i++)
        fprintf(stderr, "pagi-rs op count: op %s %llu\n", PL_op_name[rows[i].type],
                (unsigned long long)rows[i].count);
    for (i = 0; i < nfiles; i++)
        fprintf(stderr, "pagi-rs op count: file %s %llu\n", files[i].name,
                (unsigned long long)files[i].ops);
    fprintf(stderr, "pagi-rs op count: file %s %llu\n", other_files.name,
            (unsigned long long)other_files.ops);
    /* The statements are not needed after this: sort them in place. */
    qsort(statements, STATEMENT_SLOTS, sizeof statements[0], statements_desc);
    for (i = 0; i < 80 && statements[i].ops; i++)
        fprintf(stderr, "pagi-rs op count: line %s:%d %llu\n", statements[i].file,
                (int)statements[i].line, (unsigned long long)statements[i].ops);
}
