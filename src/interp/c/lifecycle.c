/*
 * An interpreter's life, called from Rust: process-wide Perl setup and
 * teardown, building an interpreter with its XS subs, and freeing it.
 */
#include "glue.h"

EXTERN_C void boot_DynaLoader(pTHX_ CV *cv);

static void xs_init(pTHX)
{
    static const char file[] = __FILE__;
    newXS("DynaLoader::boot_DynaLoader", boot_DynaLoader, file);
    newXS("PAGI::RS::_next", xs_next_message, file);
    newXS("PAGI::RS::Pending::_c_new", xs_pending_new, file);
    newXS("PAGI::RS::Pending::_c_clone", xs_pending_clone, file);
    newXS("PAGI::RS::Pending::_c_done", xs_pending_done, file);
    newXS("PAGI::RS::Pending::_c_on_ready", xs_pending_on_ready, file);
    newXS("PAGI::RS::Pending::_c_is_ready", xs_pending_is_ready, file);
    newXS("PAGI::RS::Pending::_c_is_cancelled", xs_pending_is_cancelled, file);
    newXS("PAGI::RS::Pending::_c_get", xs_pending_get, file);
    newXS("PAGI::RS::Pending::_c_chain_cancel", xs_pending_chain_cancel, file);
    newXS("PAGI::RS::Pending::_c_new_done", xs_future_new_done, file);
    newXS("PAGI::RS::_wake_ack", xs_wake_ack, file);
    newXS("PAGI::RS::_start", xs_response_start, file);
    newXS("PAGI::RS::_body", xs_response_body, file);
    newXS("PAGI::RS::_file", xs_response_file, file);
    newXS("PAGI::RS::_fd", xs_response_fd, file);
    newXS("PAGI::RS::_fh_buffered", xs_fh_buffered, file);
    newXS("PAGI::RS::_trailers", xs_response_trailers, file);
    newXS("PAGI::RS::_fullflush", xs_fullflush, file);
    newXS("PAGI::RS::_want_body", xs_want_body, file);
    newXS("PAGI::RS::_finish", xs_finish, file);
    newXS("PAGI::RS::_release", xs_release, file);
    newXS("PAGI::RS::_query", xs_query, file);
    newXS("PAGI::RS::_lifespan_event", xs_lifespan_event, file);
    newXS("PAGI::RS::_log", xs_log, file);
    newXS("PAGI::RS::_embedded_source", xs_embedded_source, file);
    newXS("PAGI::RS::_sse_start", xs_sse_start, file);
    newXS("PAGI::RS::_sse_event", xs_sse_event, file);
    newXS("PAGI::RS::_sse_comment", xs_sse_comment, file);
    newXS("PAGI::RS::_sse_keepalive", xs_sse_keepalive, file);
    newXS("PAGI::RS::_sse_close", xs_sse_close, file);
    newXS("PAGI::RS::_ws_accept", xs_ws_accept, file);
    newXS("PAGI::RS::_ws_send", xs_ws_send, file);
    newXS("PAGI::RS::_ws_close", xs_ws_close, file);
    newXS("PAGI::RS::_ws_keepalive", xs_ws_keepalive, file);
    newXS("PAGI::RS::_ws_overflow", xs_ws_overflow, file);
    newXS("PAGI::RS::_ws_finish", xs_ws_finish, file);
    newXS("PAGI::RS::_ws_receiver", xs_ws_receiver_new, file);
    newXS("PAGI::RS::_end_state", xs_end_state, file);
    newXS("PAGI::RS::_abort", xs_abort, file);
    newXS("PAGI::RS::_turn_resumed", xs_turn_resumed, file);
    newXS("PAGI::RS::_turn_ended", xs_turn_ended, file);
    newXS("PAGI::RS::SentFuture::_c_yes", xs_sent_yes, file);
    newXS("PAGI::RS::SentFuture::_c_no", xs_sent_no, file);
    newXS("PAGI::RS::SentFuture::_c_nothing", xs_sent_nothing, file);
    newXS("PAGI::RS::_method_cache_stats", xs_method_cache_stats, file);
    newXS("PAGI::RS::_call_method", xs_call_method, file);
    newXS("PAGI::RS::_spare_scope_stats", xs_spare_scope_stats, file);
    newXS("PAGI::RS::_spare_sub_stats", xs_spare_sub_stats, file);
    newXS("PAGI::RS::_spare_future_stats", xs_spare_future_stats, file);
    newXS("PAGI::RS::_adopted_bodies", xs_adopted_bodies, file);
}

/* ---- interpreter lifecycle (called from Rust) ----------------------------- */

static int sys_argc = 1;
static char *sys_argv_storage[] = {"pagi-rs", NULL};
static char **sys_argv = sys_argv_storage;

void pagi_sys_init(void)
{
    char **env = NULL;
    PERL_SYS_INIT3(&sys_argc, &sys_argv, &env);
}

void pagi_sys_term(void)
{
    PERL_SYS_TERM();
}

/* argv must be writable and outlive the interpreter ($0 writes into it). */
PerlInterpreter *pagi_interp_new(int argc, char **argv)
{
    PerlInterpreter *my_perl = perl_alloc();
    if (!my_perl)
        return NULL;
    PERL_SET_CONTEXT(my_perl);
    perl_construct(my_perl);
    /* Before any code runs that could call a method. */
    method_cache_attach(aTHX);
    pagi_opcount_install(aTHX);
    PL_exit_flags |= PERL_EXIT_DESTRUCT_END;
    /* NULL env: a custom array would replace the whole process environment. */
    if (perl_parse(my_perl, xs_init, argc, argv, NULL) != 0 || perl_run(my_perl) != 0) {
        perl_destruct(my_perl);
        perl_free(my_perl);
        PERL_SET_CONTEXT(NULL);
        return NULL;
    }
    return my_perl;
}

void pagi_interp_set_context(PerlInterpreter *my_perl)
{
    PERL_SET_CONTEXT(my_perl);
}

/* An interpreter built on one thread moves to the thread that runs it
 * (the master loads the app on its main thread; a worker runs it on an
 * interpreter thread).  Perl keeps no record of the thread that built an
 * interpreter: making it this thread's context is all the move needs, as
 * long as one thread at a time uses it.  In a process forked after the app
 * was loaded, rand() must not repeat the sequence of every sibling: as
 * perl's own fork does, the next rand() seeds afresh. */
void pagi_interp_adopt(PerlInterpreter *my_perl, int forked)
{
    PERL_SET_CONTEXT(my_perl);
    if (forked)
        PL_srand_called = FALSE;
}

/* Flush Perl's buffered output handles before a fork, as perl's fork does,
 * so that nothing buffered is written twice (once by each process). */
void pagi_interp_flush_before_fork(PerlInterpreter *my_perl)
{
    PERL_SET_CONTEXT(my_perl);
    PerlIO_flush((PerlIO *)NULL);
}

void pagi_interp_free(PerlInterpreter *my_perl)
{
    /* No signal may be forwarded to it from now on. */
    signal_target_remove(my_perl);
    PERL_SET_CONTEXT(my_perl);
    pagi_opcount_report(aTHX);
    PL_perl_destruct_level = 0;
    perl_destruct(my_perl);
    perl_free(my_perl);
    /* This thread has no interpreter any more: a signal landing here must
     * see none, not the freed one. */
    PERL_SET_CONTEXT(NULL);
}
