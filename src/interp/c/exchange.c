/*
 * XS subs over a request's exchange outside of its sends: asking for the
 * request body, finishing, releasing, querying, reading how the scope ended,
 * and aborting it.
 */
#include "glue.h"

XS(xs_want_body)
{
    dXSARGS;
    if (items != 1)
        croak_xs_usage(cv, "id");
    pagi_rs_want_body((uint64_t)SvUV(ST(0)));
    XSRETURN_EMPTY;
}

/* _finish($id, $error_or_undef, $interested) */
XS(xs_finish)
{
    dXSARGS;
    uint64_t id;
    pagi_str e = {0, 0};
    int has_err, interested, rc;
    if (items != 3)
        croak_xs_usage(cv, "id, error, interested");
    id = (uint64_t)SvUV(ST(0));
    /* Errors are text; send Perl's UTF-8 form so nothing croaks. */
    e = text_arg(aTHX_ ST(1), &has_err);
    interested = SvTRUE(ST(2)) ? 1 : 0;
    rc = pagi_rs_finish(id, e.ptr, e.len, has_err, interested);
    XSRETURN_IV(rc);
}

XS(xs_release)
{
    dXSARGS;
    if (items != 1)
        croak_xs_usage(cv, "id");
    pagi_rs_release((uint64_t)SvUV(ST(0)));
    XSRETURN_EMPTY;
}

XS(xs_query)
{
    dXSARGS;
    int64_t v;
    if (items != 2)
        croak_xs_usage(cv, "id, what");
    v = pagi_rs_query((uint64_t)SvUV(ST(0)), (int)SvIV(ST(1)));
    if (v < 0)
        XSRETURN_UNDEF;
    XSRETURN_IV((IV)v);
}

/* _end_state($id): (state, reason, detail, peer_code, peer_reason,
 * websocket_code); state is
 * -1 (forgotten), 0 (active), 1 (clean) or 2 (abnormal); the rest undef
 * where absent.  Text comes as characters. */
XS(xs_end_state)
{
    dXSARGS;
    pagi_msg m;
    int state, i;
    if (items != 1)
        croak_xs_usage(cv, "id");
    memset(&m, 0, sizeof m);
    state = pagi_rs_end_state((uint64_t)SvUV(ST(0)), &m);
    SP -= items;
    EXTEND(SP, 6);
    mPUSHi(state);
    for (i = 0; i < 2; i++) {
        if (m.str[i].ptr)
            mPUSHs(bytes_sv(aTHX_ m.str[i], 1));
        else
            PUSHs(&PL_sv_undef);
    }
    if (m.num[0] >= 0)
        mPUSHi((IV)m.num[0]);
    else
        PUSHs(&PL_sv_undef);
    if (m.str[2].ptr)
        mPUSHs(bytes_sv(aTHX_ m.str[2], 1));
    else
        PUSHs(&PL_sv_undef);
    if (m.num[1] >= 0)
        mPUSHi((IV)m.num[1]);
    else
        PUSHs(&PL_sv_undef);
    PUTBACK;
}

/* _abort($id, $detail_or_undef): 1 when it ended the scope. */
XS(xs_abort)
{
    dXSARGS;
    pagi_str detail;
    int has;
    if (items != 2)
        croak_xs_usage(cv, "id, detail");
    detail = text_arg(aTHX_ ST(1), &has);
    XSRETURN_IV(pagi_rs_abort((uint64_t)SvUV(ST(0)), detail.ptr, detail.len, has));
}
