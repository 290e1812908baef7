/*
 * The fast paths of $send, one per scope type: the common event (an http
 * start or byte body, a plain sse.send, a plain websocket.send) goes straight
 * to the core without Perl code; anything else returns CODE_NEEDS_PERL.
 */
#include "glue.h"

/* Send an http.response.start or a byte body straight to the core.
 * Returns the core's code (>= 0) with *kind saying what was sent
 * (SEND_KIND_*, for the caller's bookkeeping), -1 with
 * *err on failure, or -2 when the event needs the Perl path (anything else,
 * file/fh bodies, malformed or tied events). */
int fast_send(pTHX_ uint64_t id, SV *ev_sv, int *kind, pagi_str *err)
{
    interp_lookups *L = the_lookups(aTHX);
    HV *ev;
    SV *type_sv;
    STRLEN tlen;
    const char *type;
    if (!SvROK(ev_sv) || SvTYPE(SvRV(ev_sv)) != SVt_PVHV || SvRMAGICAL(SvRV(ev_sv)))
        return CODE_NEEDS_PERL;
    ev = (HV *)SvRV(ev_sv);
    type_sv = hv_value(aTHX_ ev, KEY(L, K_TYPE));
    if (!type_sv || !SvPOK(type_sv))
        return CODE_NEEDS_PERL;
    type = SvPV(type_sv, tlen);
    if (tlen == 18 && memEQ(type, "http.response.body", 18)) {
        STRLEN found = 1; /* type */
        SV *body = hv_optional(aTHX_ ev, KEY(L, K_BODY), &found);
        SV *more = hv_optional(aTHX_ ev, KEY(L, K_MORE), &found);
        SV *file = hv_optional(aTHX_ ev, KEY(L, K_FILE), &found);
        SV *fh = hv_optional(aTHX_ ev, KEY(L, K_FH), &found);
        pagi_str b;
        int more_flag;
        if ((file && SvOK(file)) || (fh && SvOK(fh)))
            return CODE_NEEDS_PERL;
        if (!sv_to_bytes(aTHX_ body ? body : &PL_sv_undef, &b))
            return CODE_NEEDS_PERL; /* wide characters: the Perl path words the error */
        more_flag = more && SvTRUE(more) ? 1 : 0;
        *kind = more_flag ? SEND_KIND_BODY_MORE : SEND_KIND_BODY_END;
        {
            int rc;
            if (send_lent_body(aTHX_ id, body, more_flag, &rc, err))
                return rc;
        }
        return pagi_rs_response_body(id, b.ptr, b.len, more_flag, err);
    }
    if (tlen == 19 && memEQ(type, "http.response.start", 19)) {
        STRLEN found = 1; /* type */
        SV *status = hv_optional(aTHX_ ev, KEY(L, K_STATUS), &found);
        SV *hdrs = hv_optional(aTHX_ ev, KEY(L, K_HEADERS), &found);
        SV *trailers = hv_optional(aTHX_ ev, KEY(L, K_TRAILERS), &found);
        size_t n = 0;
        const char *why = NULL;
        pagi_str *pairs;
        int want_trailers;
        IV code;
        if (!status_of(aTHX_ status, &code))
            return CODE_NEEDS_PERL;
        pairs = headers_from_sv(aTHX_ hdrs ? hdrs : &PL_sv_undef, &n, &why);
        if (!pairs)
            return CODE_NEEDS_PERL;
        want_trailers = trailers && SvTRUE(trailers) ? 1 : 0;
        *kind = want_trailers ? SEND_KIND_START_TRAILERS : SEND_KIND_START;
        return pagi_rs_response_start(id, (int64_t)code, pairs, n, want_trailers, err);
    }
    return CODE_NEEDS_PERL;
}

/* sse.send straight to the core, for an SSE request that is streaming and
 * an event whose fields need no checks beyond these; anything else (and
 * every error message) is left to SSE.pm (CODE_NEEDS_PERL). */
int fast_sse_send(pTHX_ uint64_t id, AV *req, SV *ev_sv, int *kind, pagi_str *err)
{
    interp_lookups *L = the_lookups(aTHX);
    HV *ev;
    SV *type_sv, *data, *event, *eid, *retry, **state;
    STRLEN tlen;
    const char *type;
    pagi_str ev_s, data_s, eid_s;
    int has_ev, has_data, has_eid;
    int64_t retry_n = -1;
    STRLEN found = 1; /* type, once it is looked up */
    if (!SvROK(ev_sv) || SvTYPE(SvRV(ev_sv)) != SVt_PVHV || SvRMAGICAL(SvRV(ev_sv)))
        return CODE_NEEDS_PERL;
    state = request_slot(aTHX_ req, SLOT_SSE_STREAM);
    if (!state || !SvIOK(*state) || SvIV(*state) != SSE_STREAMING)
        return CODE_NEEDS_PERL;
    ev = (HV *)SvRV(ev_sv);
    type_sv = hv_value(aTHX_ ev, KEY(L, K_TYPE));
    if (!type_sv || !SvPOK(type_sv))
        return CODE_NEEDS_PERL;
    type = SvPV(type_sv, tlen);
    if (tlen != 8 || !memEQ(type, "sse.send", 8))
        return CODE_NEEDS_PERL;
    data = hv_optional(aTHX_ ev, KEY(L, K_DATA), &found);
    event = hv_optional(aTHX_ ev, KEY(L, K_EVENT), &found);
    eid = hv_optional(aTHX_ ev, KEY(L, K_ID), &found);
    retry = hv_optional(aTHX_ ev, KEY(L, K_RETRY), &found);
    if (!data || !SvOK(data) || SvROK(data) || (event && SvROK(event)) || (eid && SvROK(eid)))
        return CODE_NEEDS_PERL;
    if (retry && SvOK(retry)) {
        if (!SvIOK(retry) || SvIV(retry) < 0)
            return CODE_NEEDS_PERL;
        retry_n = (int64_t)SvIV(retry);
    }
    /* Most events have data alone: the absent fields need no call. */
    ev_s = eid_s = (pagi_str){"", 0};
    has_ev = has_eid = 0;
    if (event)
        ev_s = text_arg(aTHX_ event, &has_ev);
    data_s = text_arg(aTHX_ data, &has_data);
    if (eid)
        eid_s = text_arg(aTHX_ eid, &has_eid);
    *kind = SEND_KIND_BODY_MORE;
    return pagi_rs_sse_event(id, ev_s.ptr, ev_s.len, has_ev, data_s.ptr, data_s.len, eid_s.ptr,
                             eid_s.len, has_eid, retry_n, err);
}

/* websocket.send straight to the core: exactly one of text/bytes, plain
 * scalars.  Everything else, and every error message, is WebSocket.pm's. */
int fast_ws_send(pTHX_ uint64_t id, SV *ev_sv, int *kind, pagi_str *err)
{
    interp_lookups *L = the_lookups(aTHX);
    HV *ev;
    SV *type_sv, *text, *bytes;
    STRLEN tlen;
    const char *type;
    pagi_str payload;
    int has;
    STRLEN found = 1; /* type, once it is looked up */
    if (!SvROK(ev_sv) || SvTYPE(SvRV(ev_sv)) != SVt_PVHV || SvRMAGICAL(SvRV(ev_sv)))
        return CODE_NEEDS_PERL;
    ev = (HV *)SvRV(ev_sv);
    type_sv = hv_value(aTHX_ ev, KEY(L, K_TYPE));
    if (!type_sv || !SvPOK(type_sv))
        return CODE_NEEDS_PERL;
    type = SvPV(type_sv, tlen);
    if (tlen != 14 || !memEQ(type, "websocket.send", 14))
        return CODE_NEEDS_PERL;
    text = hv_optional(aTHX_ ev, KEY(L, K_TEXT), &found);
    bytes = hv_optional(aTHX_ ev, KEY(L, K_BYTES), &found);
    if (text && !SvOK(text))
        text = NULL;
    if (bytes && !SvOK(bytes))
        bytes = NULL;
    if (!text == !bytes || (text && SvROK(text)) || (bytes && SvROK(bytes)))
        return CODE_NEEDS_PERL;
    if (text) {
        payload = text_arg(aTHX_ text, &has);
    } else if (!sv_to_bytes(aTHX_ bytes, &payload)) {
        return CODE_NEEDS_PERL;
    }
    *kind = SEND_KIND_BODY_MORE;
    return pagi_rs_ws_send(id, text ? 1 : 0, payload.ptr, payload.len, err);
}
