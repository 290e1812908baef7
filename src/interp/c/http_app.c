/*
 * Running an http application: its call, $receive, and the end of the
 * request when the app's Future is done, either as it returns (the app
 * awaited only sends that completed at once) or later (it awaited
 * something else first).  This path runs for every request, so it is C;
 * anything less common (a failure, a cancellation, callbacks waiting for
 * the end) is handed to HTTP.pm (_app_returned, _app_ready, _app_done,
 * _finished), which holds the rules this file only short-cuts.
 */
#include "glue.h"

/* ---- $receive ---------------------------------------------------------------
 * An XS closure bound to the request object, like $send (send.c); the logic
 * is HTTP.pm's _receive. */
static MGVTBL receiver_vtbl; /* marks our magic; no callbacks */

/* HTTP.pm's _receive in its two cases that recur for every chunk of a
 * streamed request body: a chunk already queued (a Future done with it),
 * and a body still on its way (the pending Future the next chunk
 * resolves).  About 55 Perl ops per receive otherwise.  NULL when Perl
 * answers: no body, its end, a completed response, a disconnect, 100
 * Continue, a receive already waiting, a subclass, or a slot holding what
 * this code does not expect. */
static SV *receive_streaming(pTHX_ interp_lookups *L, SV *self)
{
    AV *req;
    SV **queue_p, **body, *f;
    if (!SvROK(self) || SvTYPE(SvRV(self)) != SVt_PVAV || SvSTASH(SvRV(self)) != L->http_stash)
        return NULL;
    req = (AV *)SvRV(self);
    /* The response is complete: the end is reported, not the body. */
    if (slot_true(aTHX_ req, SLOT_COMPLETE))
        return NULL;
    queue_p = request_slot(aTHX_ req, SLOT_QUEUE);
    if (queue_p && SvOK(*queue_p)) {
        AV *queue;
        SV **first, *more, *ev;
        if (!SvROK(*queue_p) || SvTYPE(SvRV(*queue_p)) != SVt_PVAV)
            return NULL;
        queue = (AV *)SvRV(*queue_p);
        if (av_count(queue) > 0) {
            SV **id = request_slot(aTHX_ req, SLOT_ID);
            first = av_fetch(queue, 0, 0);
            if (!first || !SvROK(*first) || SvTYPE(SvRV(*first)) != SVt_PVHV || !id)
                return NULL;
            if (!(f = pending_new_on_bridge_loop(aTHX)))
                return NULL;
            more = hv_value(aTHX_(HV *) SvRV(*first), KEY(L, K_MORE));
            ev = av_shift(queue); /* its reference is ours, then the Future's */
            if (more && SvTRUE(more))
                pagi_rs_want_body(request_id_of(aTHX_ *id));
            pending_settle_fresh(aTHX_ f, ev);
            return f;
        }
    }
    if (!slot_true(aTHX_ req, SLOT_CONNECTED) || slot_true(aTHX_ req, SLOT_COMPLETED_CLEANLY))
        return NULL;
    body = request_slot(aTHX_ req, SLOT_BODY);
    if (!body || !SvOK(*body) || SvIV(*body) != BODY_STREAMING)
        return NULL;
    return pending_receive(aTHX_ req);
}

XS(xs_receiver)
{
    dXSARGS;
    SV *self = bound_request(aTHX_ cv, &receiver_vtbl);
    interp_lookups *L = the_lookups(aTHX);
    SV *ret = receive_streaming(aTHX_ L, self);
    PERL_UNUSED_VAR(items);
    ST(0) = ret ? ret : perl_half(aTHX_ L->receive_gv, &self, 1);
    XSRETURN(1);
}

/* Call the Perl sub in `gv` with `self` and up to two more arguments,
 * ignoring what it returns.  Its exceptions propagate: they are the
 * bridge's, caught by Bridge.pm's dispatch loop. */
static void call_perl_half(pTHX_ GV *gv, SV *self, SV *a, SV *b)
{
    dSP;
    PUSHMARK(SP);
    EXTEND(SP, 3);
    PUSHs(self);
    if (a)
        PUSHs(a);
    if (b)
        PUSHs(b);
    PUTBACK;
    call_sv((SV *)sub_of(aTHX_ gv), G_DISCARD | G_VOID);
}

/* Ask `f` a yes/no `method` when it is a Future of any class: 1 or 0, and
 * -1 when it is not a Future. */
static int ask_future(pTHX_ SV *f, const char *method)
{
    dSP;
    int count, answer = 0;
    if (!SvROK(f) || !SvOBJECT(SvRV(f)) || !sv_derived_from_pvn(f, "Future", 6, 0))
        return -1;
    PUSHMARK(SP);
    XPUSHs(f);
    PUTBACK;
    count = call_method(method, G_SCALAR);
    SPAGAIN;
    if (count > 0)
        answer = SvTRUE(POPs);
    PUTBACK;
    return answer;
}

/* Is `f` a Future that is done (not failed, not cancelled)?  A plain
 * Future (what an async sub that did not wait returns) is read directly
 * (pending.c); any other is asked (is_done), as its class may be any
 * Future subclass. */
static int is_done_future(pTHX_ SV *f)
{
    int done = future_plain_is_done(aTHX_ f);
    if (done < 0)
        done = ask_future(aTHX_ f, "is_done");
    return done > 0;
}

/* The app returned a done Future: HTTP.pm's _app_done(undef), in C when
 * nobody registered to hear the request's end (the usual case). */
static void app_done(pTHX_ interp_lookups *L, SV *self)
{
    AV *req = (AV *)SvRV(self);
    SV **idp = request_slot(aTHX_ req, SLOT_ID);
    int rc;
    /* Any of these set means _has_callbacks has something to look at; a
     * send the app left waiting (for the drain or a flush) keeps the
     * request registered until the core settles it (_send_waiting). */
    if (!idp || slot_true(aTHX_ req, SLOT_APP_DONE)
        || slot_defined(aTHX_ req, SLOT_SEND_WAIT) || slot_defined(aTHX_ req, SLOT_DEFER_WAIT)
        || (slot_true(aTHX_ req, SLOT_CONNECTED)
            && (slot_defined(aTHX_ req, SLOT_ON_COMPLETE) || slot_defined(aTHX_ req, SLOT_ON_DISCONNECT)
                || slot_defined(aTHX_ req, SLOT_ON_END) || slot_defined(aTHX_ req, SLOT_FUTURE)
                || slot_defined(aTHX_ req, SLOT_END_FUTURE)))) {
        call_perl_half(aTHX_ L->app_done_gv, self, &PL_sv_undef, NULL);
        return;
    }
    av_store(req, SLOT_APP_DONE, newSViv(1));
    rc = pagi_rs_finish(request_id_of(aTHX_ *idp), NULL, 0, 0, 0);
    if (rc == FINISH_BACKSTOP || rc == FINISH_TRUNCATED) {
        call_perl_half(aTHX_ L->finished_gv, self, sv_2mortal(newSViv(rc)), &PL_sv_no);
    } else {
        char buf[REGISTRY_KEY_SIZE];
        const char *key;
        int klen = registry_key(buf, request_id_of(aTHX_ *idp), &key);
        (void)hv_delete(GvHVn(L->requests_gv), key, klen, G_DISCARD);
    }
}

/* ---- an app that returned a pending Future --------------------------------
 * HTTP.pm's _app_returned and _app_ready for the usual case, the app
 * awaiting something (a database, a timer, the request body) before it
 * finishes: about 200 Perl ops per request through the Perl halves. */
static MGVTBL app_end_vtbl; /* marks our magic; no callbacks */

/* Is `f` a Future still pending?  1 yes, 0 anything else (a non-Future,
 * or a Future already ready: HTTP.pm decides those). */
static int is_pending_future(pTHX_ SV *f)
{
    int pending = future_plain_is_pending(aTHX_ f);
    if (pending < 0)
        pending = ask_future(aTHX_ f, "is_ready") == 0;
    return pending > 0;
}

/* The on_ready callback of the app's Future, bound to the request. */
XS(xs_app_ended)
{
    dXSARGS;
    SV *self = bound_request(aTHX_ cv, &app_end_vtbl);
    interp_lookups *L = the_lookups(aTHX);
    /* Own both before the slot lets go of the Future: it may have held the
     * last reference, and the request may go with it too. */
    SV *f = sv_2mortal(newSVsv(items > 0 ? ST(0) : &PL_sv_undef));
    self = sv_2mortal(newSVsv(self));
    av_store((AV *)SvRV(self), SLOT_APP_FUTURE, newSV(0));
    if (SvOK(f) && is_done_future(aTHX_ f))
        app_done(aTHX_ L, self);
    else
        /* Failed or cancelled: HTTP.pm says why. */
        call_perl_half(aTHX_ L->app_ready_gv, self, f, NULL);
    XSRETURN_EMPTY;
}

/* Keep the app's pending Future alive (nothing else may hold it) and hear
 * when it is ready. */
static void await_app(pTHX_ SV *self, SV *f)
{
    dSP;
    SV *cb = sv_2mortal(new_bound_xsub(aTHX_ xs_app_ended, &app_end_vtbl, (AV *)SvRV(self)));
    av_store((AV *)SvRV(self), SLOT_APP_FUTURE, newSVsv(f));
    PUSHMARK(SP);
    EXTEND(SP, 2);
    PUSHs(f);
    PUSHs(cb);
    PUTBACK;
    call_method("on_ready", G_DISCARD | G_VOID);
}

/* Run the application for the http request `self` with its scope and $send
 * (HTTP.pm's run_app, whose Perl version SSE and WebSocket requests use). */
void run_http_app(pTHX_ interp_lookups *L, SV *self, SV *scope, SV *send)
{
    dSP;
    SV *receive = new_bound_xsub(aTHX_ xs_receiver, &receiver_vtbl, (AV *)SvRV(self));
    SV *f;
    int count;
    bound_xsub_retire_at_leave(aTHX_ receive);
    PUSHMARK(SP);
    EXTEND(SP, 3);
    PUSHs(scope);
    PUSHs(receive);
    PUSHs(send);
    PUTBACK;
    count = call_sv(GvSVn(L->app_gv), G_SCALAR | G_EVAL);
    SPAGAIN;
    f = count > 0 ? POPs : &PL_sv_undef;
    PUTBACK;
    if (SvOK(f) && is_done_future(aTHX_ f)) {
        app_done(aTHX_ L, self);
        spare_future_keep(aTHX_ f);
    } else if (SvOK(f) && is_pending_future(aTHX_ f))
        await_app(aTHX_ self, f);
    else
        /* Died ($@ says why), returned something else, or a Future that is
         * still pending or failed: HTTP.pm decides. */
        call_perl_half(aTHX_ L->app_returned_gv, self, f, SvOK(f) ? &PL_sv_undef : sv_2mortal(newSVsv(ERRSV)));
}
