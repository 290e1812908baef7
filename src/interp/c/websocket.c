/*
 * XS subs for WebSocket sends and the end of a session, whose sequencing
 * and type checks live in Perl (WebSocket.pm; these only carry the values
 * over), and the two steps every received message takes: delivering it to
 * the receive that waits, and $receive itself.  Those short-cut
 * WebSocket.pm's _on_message and _receive, which keep the rules and take
 * every case this file does not.
 */
#include "glue.h"

/* _ws_accept($id, $subprotocol_or_undef, $headers) */
XS(xs_ws_accept)
{
    dXSARGS;
    size_t n = 0;
    const char *why = NULL;
    pagi_str *hdrs, sub, err = {0, 0};
    int has_sub, rc;
    if (items != 3)
        croak_xs_usage(cv, "id, subprotocol, headers");
    sub = text_arg(aTHX_ ST(1), &has_sub);
    hdrs = headers_from_sv(aTHX_ ST(2), &n, &why);
    if (!hdrs) {
        err.ptr = why;
        err.len = strlen(why);
        RETURN_RESULT(-1, err);
    }
    rc = pagi_rs_ws_accept((uint64_t)SvUV(ST(0)), sub.ptr, sub.len, has_sub, hdrs, n, &err);
    RETURN_RESULT(rc, err);
}

/* _ws_send($id, $is_text, $payload): text is encoded, bytes must be bytes. */
XS(xs_ws_send)
{
    dXSARGS;
    pagi_str data, err = {0, 0};
    int is_text, has, rc;
    if (items != 3)
        croak_xs_usage(cv, "id, is_text, payload");
    is_text = SvTRUE(ST(1)) ? 1 : 0;
    if (is_text) {
        data = text_arg(aTHX_ ST(2), &has);
    } else if (!sv_to_bytes(aTHX_ ST(2), &data)) {
        err.ptr = "websocket.send 'bytes' contains wide characters; encode it first";
        err.len = strlen(err.ptr);
        RETURN_RESULT(-1, err);
    }
    rc = pagi_rs_ws_send((uint64_t)SvUV(ST(0)), is_text, data.ptr, data.len, &err);
    RETURN_RESULT(rc, err);
}

/* _ws_close($id, $code, $reason) */
XS(xs_ws_close)
{
    dXSARGS;
    pagi_str reason, err = {0, 0};
    int has, rc;
    if (items != 3)
        croak_xs_usage(cv, "id, code, reason");
    reason = text_arg(aTHX_ ST(2), &has);
    rc = pagi_rs_ws_close((uint64_t)SvUV(ST(0)), (int64_t)SvIV(ST(1)), reason.ptr, reason.len,
                          &err);
    RETURN_RESULT(rc, err);
}

/* _ws_keepalive($id, $interval_ms, $timeout_ms) */
XS(xs_ws_keepalive)
{
    dXSARGS;
    pagi_str err = {0, 0};
    int rc;
    if (items != 3)
        croak_xs_usage(cv, "id, interval_ms, timeout_ms");
    rc = pagi_rs_ws_keepalive((uint64_t)SvUV(ST(0)), (int64_t)SvIV(ST(1)), (int64_t)SvIV(ST(2)),
                              &err);
    RETURN_RESULT(rc, err);
}

/* _ws_overflow($id, $limit, $in_bytes): the limit is in messages, or in
 * bytes when $in_bytes is true.  True: drop the message. */
XS(xs_ws_overflow)
{
    dXSARGS;
    if (items != 3)
        croak_xs_usage(cv, "id, limit, in_bytes");
    XSRETURN_IV(pagi_rs_ws_overflow((uint64_t)SvUV(ST(0)), (int64_t)SvIV(ST(1)), SvTRUE(ST(2)) ? 1 : 0));
}

/* _ws_finish($id, $error_or_undef) */
XS(xs_ws_finish)
{
    dXSARGS;
    pagi_str e = {0, 0};
    int has_err;
    if (items != 2)
        croak_xs_usage(cv, "id, error");
    e = text_arg(aTHX_ ST(1), &has_err);
    XSRETURN_IV(pagi_rs_ws_finish((uint64_t)SvUV(ST(0)), e.ptr, e.len, has_err));
}

/* ---- $receive ---------------------------------------------------------------
 * An XS closure bound to the request object, like http_app.c's; the logic
 * is WebSocket.pm's _receive. */
static MGVTBL ws_receiver_vtbl; /* marks our magic; no callbacks */

/* WebSocket.pm's _receive in its two cases that recur for every message of
 * an open socket: a message already queued (a Future done with it), and
 * none yet (the pending Future the next one resolves).  About 45 Perl ops
 * per receive otherwise.  NULL when Perl answers: the connect event, the
 * end, a subclass, or a slot holding what this code does not expect. */
static SV *receive_ws(pTHX_ interp_lookups *L, SV *self)
{
    AV *req;
    SV **queue_p, *f;
    if (!SvROK(self) || SvTYPE(SvRV(self)) != SVt_PVAV || SvSTASH(SvRV(self)) != L->ws_stash)
        return NULL;
    req = (AV *)SvRV(self);
    if (!slot_true(aTHX_ req, SLOT_WS_CONNECT_DELIVERED))
        return NULL;
    queue_p = request_slot(aTHX_ req, SLOT_QUEUE);
    if (queue_p && SvOK(*queue_p)) {
        AV *queue;
        SV **first, **queued_bytes, *payload;
        HV *ev;
        if (!SvROK(*queue_p) || SvTYPE(SvRV(*queue_p)) != SVt_PVAV)
            return NULL;
        queue = (AV *)SvRV(*queue_p);
        if (av_count(queue) > 0) {
            first = av_fetch(queue, 0, 0);
            queued_bytes = request_slot(aTHX_ req, SLOT_WS_QUEUE_BYTES);
            if (!first || !SvROK(*first) || SvTYPE(SvRV(*first)) != SVt_PVHV || !queued_bytes ||
                SvROK(*queued_bytes))
                return NULL;
            ev = (HV *)SvRV(*first);
            payload = hv_value(aTHX_ ev, KEY(L, K_TEXT));
            if (!payload || !SvOK(payload))
                payload = hv_value(aTHX_ ev, KEY(L, K_BYTES));
            if (payload && (SvGMAGICAL(payload) || SvROK(payload)))
                return NULL; /* Perl measures what C would have to call into. */
            if (!(f = pending_new_on_bridge_loop(aTHX)))
                return NULL;
            /* As bytes::length: the string's bytes, not its characters. */
            sv_setiv(*queued_bytes,
                     SvIV(*queued_bytes) - (IV)(payload && SvOK(payload) ? sv_len(payload) : 0));
            pending_settle_fresh(aTHX_ f, av_shift(queue));
            return f;
        }
    }
    if (!slot_true(aTHX_ req, SLOT_CONNECTED))
        return NULL;
    return pending_receive(aTHX_ req);
}

XS(xs_ws_receiver)
{
    dXSARGS;
    SV *self = bound_request(aTHX_ cv, &ws_receiver_vtbl);
    interp_lookups *L = the_lookups(aTHX);
    SV *ret = receive_ws(aTHX_ L, self);
    PERL_UNUSED_VAR(items);
    ST(0) = ret ? ret : perl_half(aTHX_ L->ws_receive_gv, &self, 1);
    XSRETURN(1);
}

/* _ws_receiver($self): the application's $receive for a websocket scope. */
XS(xs_ws_receiver_new)
{
    dXSARGS;
    if (items != 1 || !SvROK(ST(0)) || SvTYPE(SvRV(ST(0))) != SVt_PVAV)
        croak_xs_usage(cv, "request");
    ST(0) = sv_2mortal(new_bound_xsub(aTHX_ xs_ws_receiver, &ws_receiver_vtbl, (AV *)SvRV(ST(0))));
    XSRETURN(1);
}

/* A WS_RECEIVE message for a receive that waits for it: WebSocket.pm's
 * _on_message, here instead of through Bridge.pm's dispatch (about 70
 * Perl ops per message).  Returns 0 when it must go to Perl: no receive
 * waits (the message is queued, or overflows the queue), or the request is
 * not what this code expects. */
int deliver_ws_message(pTHX_ interp_lookups *L, const pagi_msg *m)
{
    char buf[REGISTRY_KEY_SIZE];
    const char *key;
    int klen = registry_key(buf, m->id, &key);
    SV **entry = hv_fetch(GvHVn(L->requests_gv), key, klen, 0);
    AV *req;
    HV *ev;
    SV *wait, *evref;
    if (!entry)
        return 1; /* Perl forgot the socket: nobody will read it. */
    if (!SvROK(*entry) || SvTYPE(SvRV(*entry)) != SVt_PVAV || SvSTASH(SvRV(*entry)) != L->ws_stash)
        return 0;
    req = (AV *)SvRV(*entry);
    if (!pending_in_slot(aTHX_ req, SLOT_RECV_WAIT, &wait) || !wait)
        return 0;
    ev = newHV();
    (void)hv_stores(ev, "type", newSVpvs("websocket.receive"));
    if (m->num[0])
        (void)hv_store_ent(ev, KEY(L, K_TEXT), bytes_sv(aTHX_ m->str[0], 1), 0);
    else
        (void)hv_store_ent(ev, KEY(L, K_BYTES), bytes_sv(aTHX_ m->str[0], 0), 0);
    evref = sv_2mortal(newRV_noinc((SV *)ev));
    resolve_receive(aTHX_ req, wait, evref);
    return 1;
}
