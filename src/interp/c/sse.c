/*
 * XS subs for SSE sends.  Sequencing and type checks live in Perl (SSE.pm);
 * these only carry the values over.
 */
#include "glue.h"

/* _sse_start($id, $status, $headers) */
XS(xs_sse_start)
{
    dXSARGS;
    size_t n = 0;
    const char *why = NULL;
    pagi_str *hdrs;
    pagi_str err = {0, 0};
    IV status;
    int rc;
    if (items != 3)
        croak_xs_usage(cv, "id, status, headers");
    /* As for http.response.start: '201' and 201.0 are 201, but '200.5' is
     * refused rather than truncated. */
    if (!status_of(aTHX_ ST(1), &status)) {
        err.ptr = "'status' must be an integer";
        err.len = strlen(err.ptr);
        RETURN_RESULT(-1, err);
    }
    hdrs = headers_from_sv(aTHX_ ST(2), &n, &why);
    if (!hdrs) {
        err.ptr = why;
        err.len = strlen(why);
        RETURN_RESULT(-1, err);
    }
    rc = pagi_rs_sse_start((uint64_t)SvUV(ST(0)), (int64_t)status, hdrs, n, &err);
    RETURN_RESULT(rc, err);
}

/* _sse_event($id, $event, $data, $event_id, $retry_or_undef) */
XS(xs_sse_event)
{
    dXSARGS;
    pagi_str ev, data, eid, err = {0, 0};
    int has_ev, has_data, has_eid, rc;
    if (items != 5)
        croak_xs_usage(cv, "id, event, data, event_id, retry");
    ev = text_arg(aTHX_ ST(1), &has_ev);
    data = text_arg(aTHX_ ST(2), &has_data);
    eid = text_arg(aTHX_ ST(3), &has_eid);
    rc = pagi_rs_sse_event((uint64_t)SvUV(ST(0)), ev.ptr, ev.len, has_ev, data.ptr, data.len,
                           eid.ptr, eid.len, has_eid, SvOK(ST(4)) ? (int64_t)SvIV(ST(4)) : -1,
                           &err);
    RETURN_RESULT(rc, err);
}

/* _sse_comment($id, $comment) */
XS(xs_sse_comment)
{
    dXSARGS;
    pagi_str text, err = {0, 0};
    int has, rc;
    if (items != 2)
        croak_xs_usage(cv, "id, comment");
    text = text_arg(aTHX_ ST(1), &has);
    rc = pagi_rs_sse_comment((uint64_t)SvUV(ST(0)), text.ptr, text.len, &err);
    RETURN_RESULT(rc, err);
}

/* _sse_keepalive($id, $interval_ms, $comment) */
XS(xs_sse_keepalive)
{
    dXSARGS;
    pagi_str text;
    int has;
    if (items != 3)
        croak_xs_usage(cv, "id, interval_ms, comment");
    text = text_arg(aTHX_ ST(2), &has);
    XSRETURN_IV(pagi_rs_sse_keepalive((uint64_t)SvUV(ST(0)), (int64_t)SvIV(ST(1)), text.ptr,
                                      text.len));
}

/* _sse_close($id, $reason_or_undef) */
XS(xs_sse_close)
{
    dXSARGS;
    pagi_str text, err = {0, 0};
    int has, rc;
    if (items != 2)
        croak_xs_usage(cv, "id, reason");
    text = text_arg(aTHX_ ST(1), &has);
    rc = pagi_rs_sse_close((uint64_t)SvUV(ST(0)), text.ptr, text.len, has, &err);
    RETURN_RESULT(rc, err);
}
