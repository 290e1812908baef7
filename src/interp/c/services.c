/*
 * XS subs for the server's services to the Perl half: lifespan events,
 * logging, and the sources of the embedded Perl modules.
 */
#include "glue.h"

XS(xs_lifespan_event)
{
    dXSARGS;
    STRLEN len = 0;
    const char *msg = "";
    int rc;
    if (items != 2)
        croak_xs_usage(cv, "kind, message");
    if (SvOK(ST(1)))
        msg = SvPVutf8(sv_2mortal(newSVsv(ST(1))), len);
    rc = pagi_rs_lifespan_event((int)SvIV(ST(0)), msg, len);
    XSRETURN_IV(rc);
}

XS(xs_log)
{
    dXSARGS;
    STRLEN len;
    const char *msg;
    if (items != 2)
        croak_xs_usage(cv, "level, message");
    msg = SvPVutf8(sv_2mortal(newSVsv(ST(1))), len);
    pagi_rs_log((int)SvIV(ST(0)), msg, len);
    XSRETURN_EMPTY;
}

XS(xs_embedded_source)
{
    dXSARGS;
    STRLEN len;
    const char *name;
    pagi_str src = {0, 0};
    if (items != 1)
        croak_xs_usage(cv, "path");
    name = SvPV(ST(0), len);
    if (!pagi_rs_embedded_source(name, len, &src))
        XSRETURN_UNDEF;
    ST(0) = sv_2mortal(newSVpvn(src.ptr, src.len));
    XSRETURN(1);
}
