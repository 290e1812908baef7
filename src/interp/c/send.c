/*
 * The application's $send: an XS closure bound to its request object,
 * which tries the fast path of the scope's type, keeps the object's SLOT_*
 * fields up to date, and hands everything else to the Perl half.
 */
#include "glue.h"
#include <time.h>

/* ---- the application's $send ----------------------------------------------
 * An XS closure rather than a Perl one: it is called for every response
 * event, and the common case (start, or a body, an SSE event or a
 * WebSocket message that fits under the high-water mark, with no other
 * send in flight) needs no Perl code at all.  The request object it belongs
 * to hangs off the CV as magic; it updates that object's SLOT_* fields. */
static MGVTBL sender_vtbl; /* marks our magic; no callbacks */

/* ---- turns ------------------------------------------------------------------
 * An app whose sends all complete at once never gives the interpreter back:
 * `await` on a done Future does not yield, so an SSE or streaming loop runs
 * until the buffer reaches its high-water mark, while other requests (new
 * ones, or other streams' apps) wait.  After TURN_BUDGET_NS of one turn
 * (from the first send after a message was handed out, or after the app's
 * last yield), a send that completed at once resolves on the loop's next
 * turn instead, if anything else is waiting: a message, or another app that
 * yielded the same way.  The event was taken either way; only the app's
 * Future waits.  Interpreters run on their own threads, so thread-locals are
 * per interpreter. */
/* Measured with sse-bench (100 subscribers, 10,000 events each): 1 ms cut
 * first-event p99 from 1.5 s to 0.1 s for 12 % fewer events/s, 3 ms to
 * 0.3 s for 4 % fewer, 10 ms to 1 s for none. */
#define TURN_BUDGET_NS 3000000ULL

static __thread uint64_t turn_started_ns; /* 0: the turn's first send is to come */
static __thread long apps_yielded;        /* yielded, not yet resumed */

/* The precise clock costs about 19 ns a read on the VMs measured, a tenth
 * of what a small sse.send costs the server; the coarse one (one tick of
 * the kernel's timer, a few ms) about 3 ns.  So the precise clock is read
 * at a turn's first send, and then only every SENDS_PER_CLOCK_READ sends or
 * once the coarse clock ticked since the last read: an app that sends
 * quickly is caught within that many sends of its budget, one that sends
 * slowly within a tick. */
#define SENDS_PER_CLOCK_READ 16
static __thread unsigned sends_since_clock_read;
static __thread uint64_t coarse_at_clock_read;

static uint64_t clock_ns(clockid_t clock)
{
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

void turn_begins(void)
{
    turn_started_ns = 0;
}

/* Has the running app used up its turn while others wait?  If so, it
 * yields: the turn ends here. */
static int turn_is_over(void)
{
    uint64_t coarse = clock_ns(CLOCK_MONOTONIC_COARSE);
    if (turn_started_ns != 0 && ++sends_since_clock_read < SENDS_PER_CLOCK_READ
        && coarse == coarse_at_clock_read)
        return 0;
    uint64_t now = clock_ns(CLOCK_MONOTONIC);
    sends_since_clock_read = 0;
    coarse_at_clock_read = coarse;
    if (turn_started_ns == 0) {
        turn_started_ns = now;
        return 0;
    }
    if (now - turn_started_ns < TURN_BUDGET_NS)
        return 0;
    if (apps_yielded == 0 && !pagi_rs_others_waiting())
        return 0;
    turn_started_ns = 0;
    apps_yielded++;
    return 1;
}

/* PAGI::RS::_turn_resumed(): the loop is resuming an app that yielded.
 * Until _turn_ended, its sends' wake-ups of the network are held, as in a
 * batch of messages (one per send would cost a thread wake-up each). */
XS(xs_turn_resumed)
{
    dXSARGS;
    PERL_UNUSED_VAR(items);
    if (apps_yielded > 0)
        apps_yielded--;
    turn_started_ns = 0;
    pagi_rs_hold_wakeups(1);
    XSRETURN_EMPTY;
}

XS(xs_turn_ended)
{
    dXSARGS;
    PERL_UNUSED_VAR(items);
    pagi_rs_hold_wakeups(0);
    XSRETURN_EMPTY;
}

/* The answers of PAGI::RS::SentFuture, the always-done Future that a send
 * completing at once returns (HTTP.pm's $DONE).  Future::AsyncAwait asks
 * AWAIT_IS_READY and AWAIT_GET on every `await` of it: as XS subs the two
 * calls cost no Perl ops, no pad and no scope (an SSE event loop spends a
 * fifth of its interpreter time in them as Perl subs). */
XS(xs_sent_yes)
{
    dXSARGS;
    PERL_UNUSED_VAR(items);
    XSRETURN_YES;
}

XS(xs_sent_no)
{
    dXSARGS;
    PERL_UNUSED_VAR(items);
    XSRETURN_NO;
}

XS(xs_sent_nothing)
{
    dXSARGS;
    PERL_UNUSED_VAR(items);
    XSRETURN_EMPTY;
}

/* Call the Perl sub in `gv` with `nargs` arguments and return its scalar
 * result, for $send or $receive to hand back to the application.  No
 * G_EVAL: its exceptions belong to the application. */
SV *perl_half(pTHX_ GV *gv, SV **args, int nargs)
{
    dSP;
    int i, count;
    SV *ret;
    PUSHMARK(SP);
    EXTEND(SP, nargs);
    for (i = 0; i < nargs; i++)
        PUSHs(args[i]);
    PUTBACK;
    count = call_sv((SV *)sub_of(aTHX_ gv), G_SCALAR);
    SPAGAIN;
    ret = count > 0 ? POPs : &PL_sv_undef;
    PUTBACK;
    return ret;
}

/* The send found the buffer at the high-water mark, and no on_high_water
 * callback is owed for it (none registered, or the crossing is not new):
 * what it means is the C path's to settle. */
static int found_full_quietly(pTHX_ AV *req, int rc)
{
    return rc == CODE_STILL_HIGH || (rc == CODE_HIGH_WATER && !slot_true(aTHX_ req, SLOT_ON_HIGH));
}

XS(xs_sender)
{
    dXSARGS;
    SV *self = bound_request(aTHX_ cv, &sender_vtbl);
    SV *ev;
    AV *req;
    SV **idp;
    pagi_str err = {0, 0};
    int rc, kind = 0, handled = 0, is_http;
    interp_lookups *L = the_lookups(aTHX);
    HV *stash;
    adopt_signal_handlers(aTHX);
    req = (AV *)SvRV(self);
    stash = SvSTASH((SV *)req);
    is_http = stash == L->http_stash;
    ev = items > 0 ? ST(0) : &PL_sv_undef;
    idp = request_slot(aTHX_ req, SLOT_ID);
    if (!idp)
        rc = CODE_NEEDS_PERL;
    else if (slot_defined(aTHX_ req, SLOT_SEND_BUSY))
        /* Another send of this scope is in flight: sends are sequential,
         * so this one waits its turn in Perl (HTTP.pm _send_in_turn). */
        rc = CODE_IN_TURN;
    else if (is_http)
        rc = fast_send(aTHX_ request_id_of(aTHX_ *idp), ev, &kind, &err);
    else if (stash == L->sse_stash)
        rc = fast_sse_send(aTHX_ request_id_of(aTHX_ *idp), req, ev, &kind, &err);
    else
        rc = fast_ws_send(aTHX_ request_id_of(aTHX_ *idp), ev, &kind, &err);
    /* A send the core answers "closed" while this object still believes
     * the scope open goes to Perl, which brings its facts up to date. */
    if (rc == CODE_CLOSED && slot_true(aTHX_ req, SLOT_CONNECTED))
        rc = CODE_CLOSED_UNSEEN;
    /* Taken, and it filled the buffer: only on_high_water callbacks need
     * the Perl half; without any it is a plain send. */
    if (rc == CODE_REACHED_HIGH && !slot_true(aTHX_ req, SLOT_ON_HIGH))
        rc = CODE_SENT;
    /* A final body send (no trailers to follow) never waits for the drain:
     * HTTP.pm ends the scope as it is taken (_response_complete), and
     * _wait_drain does not wait on an ended scope.  Without on_high_water
     * callbacks to fire, it is a plain final send, which the switch below
     * ends here in C. */
    if (is_http && kind == SEND_KIND_BODY_END && !slot_true(aTHX_ req, SLOT_TRAILERS) &&
        found_full_quietly(aTHX_ req, rc))
        rc = CODE_SENT;
    if (is_http && kind == SEND_KIND_BODY_MORE && found_full_quietly(aTHX_ req, rc) &&
        slot_true(aTHX_ req, SLOT_CONNECTED)) {
        /* A body send that found the buffer full waits for the drain: what
         * HTTP.pm's _wait_drain and _in_flight do for it, without the Perl
         * half (about 70 ops per wait).  The app holds the wait itself;
         * on the drain, request.c's settle_drain (or Transport.pm's
         * _send_waited) frees both slots and resolves it. */
        SV *wait = pending_new_on_bridge_loop(aTHX);
        if (wait) {
            av_store(req, SLOT_SEND_WAIT, newSVsv(wait));
            av_store(req, SLOT_SEND_BUSY, newSVsv(wait));
            ST(0) = wait;
            XSRETURN(1);
        }
    }
    if (rc == CODE_SENT || rc == CODE_CLOSED) {
        switch (kind) {
        case SEND_KIND_START:
        case SEND_KIND_START_TRAILERS:
            if (rc == CODE_SENT) {
                av_store(req, SLOT_STARTED, newSViv(1));
                av_store(req, SLOT_TRAILERS, newSViv(kind == SEND_KIND_START_TRAILERS));
            }
            handled = 1;
            break;
        case SEND_KIND_BODY_MORE:
            handled = 1;
            break;
        case SEND_KIND_BODY_END:
            if (!is_http)
                break;
            if (rc == CODE_CLOSED || slot_true(aTHX_ req, SLOT_TRAILERS)) {
                handled = 1;
            } else if (!slot_true(aTHX_ req, SLOT_WANTS_END)) {
                /* The scope ends here; with someone waiting to hear it,
                 * HTTP.pm's _response_complete notifies them. */
                SV **wait = request_slot(aTHX_ req, SLOT_RECV_WAIT);
                if (!wait || !SvOK(*wait)) {
                    av_store(req, SLOT_COMPLETE, newSViv(1));
                    handled = 1;
                }
            }
            break;
        }
    }
    if (handled && turn_is_over()) {
        /* Taken, but the app waits for the loop's next turn (HTTP.pm). */
        SV *args[1];
        args[0] = self;
        ST(0) = perl_half(aTHX_ L->yield_turn_gv, args, 1);
        XSRETURN(1);
    }
    if (handled) {
        ST(0) = GvSVn(L->done_gv);
        XSRETURN(1);
    }
    {
        /* Everything else (waits, errors, other events): the Perl side
         * finishes the job.  One Perl half for every class: it asks the
         * object's class what its fast path's outcome means. */
        SV *args[4];
        args[0] = self;
        args[1] = ev;
        args[2] = sv_2mortal(newSViv(rc));
        args[3] = rc == CODE_FAILED ? sv_2mortal(newSVpvn(err.ptr ? err.ptr : "", err.len))
                                    : sv_2mortal(newSViv(kind));
        ST(0) = perl_half(aTHX_ L->after_send_gv, args, 4);
        XSRETURN(1);
    }
}

/* The coderef the application gets as $send, bound to request `req`. */
SV *new_sender(pTHX_ AV *req)
{
    return new_bound_xsub(aTHX_ xs_sender, &sender_vtbl, req);
}

