/*
 * XS subs for WebSocket sends and the end of a session.  Sequencing and type
 * checks live in Perl (WebSocket.pm); these only carry the values over.
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
 * bytes when $in_bytes is true. */
XS(xs_ws_overflow)
{
    dXSARGS;
    if (items != 3)
        croak_xs_usage(cv, "id, limit, in_bytes");
    pagi_rs_ws_overflow((uint64_t)SvUV(ST(0)), (int64_t)SvIV(ST(1)), SvTRUE(ST(2)) ? 1 : 0);
    XSRETURN_EMPTY;
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
