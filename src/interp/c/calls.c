/*
 * Every entry from Rust into Perl (pagi_call, pagi_eval), and the exit and
 * fork handling those entries rely on: an app's exit() croaks in the server,
 * a forked child ends at the outermost frame, and forked children do not
 * keep the server's listening sockets.
 */
#include "glue.h"
#include <unistd.h>
#include <pthread.h>

/* ---- exit and fork ------------------------------------------------------------
 * exit() inside an application would end the whole server (or longjmp across
 * Rust frames).  Every OP_EXIT (CORE::exit too) croaks instead, which the
 * bridge turns into an ordinary application error.  The guard protects the
 * server's own process only: in a process the application forked, exit is
 * Perl's, and the child ends as a forked perl would (see
 * exit_forked_child).  Any descendant counts: a daemon's grandchild too. */

static pid_t server_pid;
static Perl_ppaddr_t perl_pp_exit; /* Perl's own pp_exit */

static OP *pagi_pp_exit(pTHX)
{
    if (getpid() != server_pid)
        return perl_pp_exit(aTHX);
    Perl_croak(aTHX_ "exit() called by the application; pagi-rs does not let an app end the server\n");
    return NULL; /* not reached */
}

/* Perl's my_exit in a forked child unwinds every Perl frame and lands at the
 * outermost JMPENV, which pagi_call/pagi_eval push for this.  End the child
 * as perl ends after exit: END blocks, object destruction and flushing of
 * Perl's handles (perl_destruct), then the status.  _exit, because this
 * process is a fork of a multi-threaded one: the Rust runtime's other
 * threads do not exist here, and C atexit handlers must not run. */
static void exit_forked_child(pTHX)
{
    int status = perl_destruct(my_perl);
    _exit(status & 0xff);
}

/* Listening sockets of the server, closed in every forked child: a child
 * that outlives the server must not keep its port.  Room for every
 * listener (listen.rs MAX_LISTENERS) and then some. */
#define MAX_SERVER_FDS 80
static int server_fds[MAX_SERVER_FDS];
static _Atomic int server_fd_count; /* interpreters may fork meanwhile */

static void close_server_fds_in_child(void)
{
    int i, n = server_fd_count;
    for (i = 0; i < n && i < MAX_SERVER_FDS; i++)
        close(server_fds[i]);
}

/* Called on the main thread (only) once a listening socket is bound.
 * Returns 0 when the table is full (the fd is then not closed in children). */
int pagi_close_in_forked_children(int fd)
{
    int n = server_fd_count;
    if (n >= MAX_SERVER_FDS)
        return 0;
    server_fds[n] = fd;
    server_fd_count = n + 1; /* seq_cst: the fd is stored first */
    return 1;
}

/* A worker process forked by the master (or a daemon's child) runs the
 * application as the server: its exit guard must croak there, not treat it
 * as a child the application forked.  Called once in that process, before
 * any application code runs in it. */
void pagi_mark_server_process(void)
{
    server_pid = getpid();
}

/* PL_ppaddr is shared by every interpreter in the process; install once,
 * on the main thread: the process it is called in is the server's. */
void pagi_install_exit_guard(void)
{
    server_pid = getpid();
    perl_pp_exit = PL_ppaddr[OP_EXIT];
    PL_ppaddr[OP_EXIT] = pagi_pp_exit;
    pthread_atfork(NULL, NULL, close_server_fds_in_child);
}

/* Call the Perl sub `name` with string arguments in list context, under
 * G_EVAL, with $@ localised.  On success returns 1 and stores the stringified
 * first return value (if any) in *result (valid until the next call into the
 * same interpreter); on a Perl exception returns 0 and stores the error text
 * in *result. */

/* Keep a copy of `sv` (a return value or $@) until the next call, and point
 * `result` at its UTF-8 text.  The copy lives in the interpreter's own
 * PL_modglobal, not in a C static: with several interpreter threads a
 * process-wide SV would be freed by one interpreter while it belongs to
 * another's arenas. */
static void keep_result(pTHX_ SV *sv, pagi_str *result)
{
    STRLEN len = 0;
    const char *p = "";
    SV **slot = hv_fetchs(PL_modglobal, "PAGI::RS::last_result", 1);
    if (!slot) {
        result->ptr = p;
        result->len = 0;
        return;
    }
    sv_setsv(*slot, sv);
    if (SvOK(*slot))
        p = SvPVutf8(*slot, len);
    result->ptr = p;
    result->len = len;
}

/* The outermost frame of every entry from Rust into Perl: Perl's exit
 * (my_exit) unwinds to the outermost JMPENV, and that is only reached in a
 * process the application forked (in the server the exit guard croaks
 * first, and nothing else calls my_exit).  The child ends there; anything
 * else goes on unwinding, as it did without this frame. */
#define EXIT_FRAME_PUSH                                                        \
    dJMPENV;                                                                   \
    int exit_frame_ret;                                                        \
    JMPENV_PUSH(exit_frame_ret);                                               \
    if (exit_frame_ret != 0) {                                                 \
        JMPENV_POP;                                                            \
        if (getpid() != server_pid)                                            \
            exit_forked_child(aTHX);                                           \
        JMPENV_JUMP(exit_frame_ret);                                           \
    }

int pagi_call(PerlInterpreter *my_perl, const char *name, const pagi_str *args, size_t nargs,
              pagi_str *result)
{
    int count, ok;
    size_t i;
    dSP;
    EXIT_FRAME_PUSH;

    ENTER;
    SAVETMPS;
    save_scalar(PL_errgv);
    PUSHMARK(SP);
    EXTEND(SP, (SSize_t)nargs);
    for (i = 0; i < nargs; i++)
        mPUSHs(newSVpvn(args[i].ptr, args[i].len));
    PUTBACK;
    count = call_pv(name, G_EVAL | G_SCALAR);
    SPAGAIN;
    ok = !SvTRUE(ERRSV);
    keep_result(aTHX_ ok ? (count > 0 ? POPs : &PL_sv_undef) : ERRSV, result);
    if (!ok && count > 0)
        (void)POPs;
    PUTBACK;
    FREETMPS;
    LEAVE;
    JMPENV_POP;
    return ok;
}

/* Evaluate Perl source (the bootstrap); same error contract as pagi_call. */
int pagi_eval(PerlInterpreter *my_perl, const char *code, pagi_str *result)
{
    SV *ret;
    int ok;
    dSP;
    EXIT_FRAME_PUSH;
    PERL_UNUSED_VAR(sp);
    ENTER;
    SAVETMPS;
    save_scalar(PL_errgv);
    ret = eval_pv(code, FALSE);
    ok = !SvTRUE(ERRSV);
    keep_result(aTHX_ ok ? ret : ERRSV, result);
    FREETMPS;
    LEAVE;
    JMPENV_POP;
    return ok;
}
