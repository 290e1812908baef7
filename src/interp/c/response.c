/*
 * XS subs for the http.response.* events the Perl path sends: start, body,
 * file and fh bodies, trailers, and fullflush.
 */
#include "glue.h"

/* _start($id, $status, $headers, $trailers) */
XS(xs_response_start)
{
    dXSARGS;
    uint64_t id;
    IV status;
    size_t n = 0;
    const char *why = NULL;
    pagi_str *hdrs;
    pagi_str err = {0, 0};
    int rc;
    if (items != 4)
        croak_xs_usage(cv, "id, status, headers, trailers");
    id = (uint64_t)SvUV(ST(0));
    if (!status_of(aTHX_ ST(1), &status)) {
        SP -= items;
        err.ptr = "http.response.start requires an integer 'status'";
        err.len = strlen(err.ptr);
        PUSH_RESULT(-1, err);
        PUTBACK;
        return;
    }
    hdrs = headers_from_sv(aTHX_ ST(2), &n, &why);
    SP -= items;
    if (!hdrs) {
        err.ptr = why;
        err.len = strlen(why);
        PUSH_RESULT(-1, err);
        PUTBACK;
        return;
    }
    rc = pagi_rs_response_start(id, (int64_t)status, hdrs, n, SvTRUE(ST(3)) ? 1 : 0, &err);
    PUSH_RESULT(rc, err);
    PUTBACK;
}

/* _body($id, $bytes, $more) */
XS(xs_response_body)
{
    dXSARGS;
    uint64_t id;
    pagi_str body;
    pagi_str err = {0, 0};
    int more, rc;
    if (items != 3)
        croak_xs_usage(cv, "id, body, more");
    id = (uint64_t)SvUV(ST(0));
    more = SvTRUE(ST(2)) ? 1 : 0;
    if (!sv_to_bytes(aTHX_ ST(1), &body)) {
        SP -= items;
        err.ptr = "body contains wide characters; PAGI bodies are bytes, encode it first "
                  "(e.g. Encode::encode_utf8)";
        err.len = strlen(err.ptr);
        PUSH_RESULT(-1, err);
        PUTBACK;
        return;
    }
    SP -= items;
    if (!send_lent_body(aTHX_ id, ST(1), more, &rc, &err))
        rc = pagi_rs_response_body(id, body.ptr, body.len, more, &err);
    PUSH_RESULT(rc, err);
    PUTBACK;
}

/* _file($id, $path, $offset, $length_or_-1) */
XS(xs_response_file)
{
    dXSARGS;
    uint64_t id;
    pagi_str path;
    pagi_str err = {0, 0};
    int64_t offset, length;
    int rc;
    if (items != 4)
        croak_xs_usage(cv, "id, path, offset, length");
    id = (uint64_t)SvUV(ST(0));
    offset = (int64_t)SvIV(ST(2));
    length = (int64_t)SvIV(ST(3));
    if (!sv_to_bytes(aTHX_ ST(1), &path)) {
        /* A path with wide characters: hand Perl's UTF-8 encoding to the OS,
         * which is what Perl's own open() does with such a name. */
        STRLEN len;
        path.ptr = SvPVutf8(sv_2mortal(newSVsv(ST(1))), len);
        path.len = len;
    }
    SP -= items;
    rc = pagi_rs_response_file(id, path.ptr, path.len, offset, length, &err);
    PUSH_RESULT(rc, err);
    PUTBACK;
}

/* _fd($id, $fd, $offset_or_-1, $length_or_-1, $first_bytes_or_undef):
 * $first_bytes go before what is read from $fd (see _fh_buffered). */
XS(xs_response_fd)
{
    dXSARGS;
    uint64_t id;
    pagi_str err = {0, 0};
    pagi_str first = {"", 0};
    int rc;
    if (items != 4 && items != 5)
        croak_xs_usage(cv, "id, fd, offset, length[, first_bytes]");
    id = (uint64_t)SvUV(ST(0));
    if (items == 5)
        (void)sv_to_bytes(aTHX_ ST(4), &first); /* _fh_buffered's bytes: never wide */
    {
        int fd = (int)SvIV(ST(1));
        int64_t offset = (int64_t)SvIV(ST(2));
        int64_t length = (int64_t)SvIV(ST(3));
        SP -= items;
        rc = pagi_rs_response_fd(id, fd, offset, length, first.ptr, first.len, &err);
    }
    PUSH_RESULT(rc, err);
    PUTBACK;
}

/* _fh_buffered($fh): the bytes Perl has read ahead into $fh's buffer (a
 * readline on a pipe reads more than the line), taken out of it.  The core
 * streams the descriptor, which is past them: they go first. */
XS(xs_fh_buffered)
{
    dXSARGS;
    IO *io;
    PerlIO *fp;
    SV *out;
    if (items != 1)
        croak_xs_usage(cv, "fh");
    io = sv_2io(ST(0));
    fp = io ? IoIFP(io) : NULL;
    out = sv_2mortal(newSVpvs(""));
    if (fp && PerlIO_fast_gets(fp)) {
        SSize_t cnt = PerlIO_get_cnt(fp);
        if (cnt > 0) {
            STDCHAR *ptr = PerlIO_get_ptr(fp);
            sv_setpvn(out, (const char *)ptr, (STRLEN)cnt);
            PerlIO_set_ptrcnt(fp, ptr + cnt, 0);
        }
    }
    ST(0) = out;
    XSRETURN(1);
}

/* _trailers($id, $headers) */
XS(xs_response_trailers)
{
    dXSARGS;
    uint64_t id;
    size_t n = 0;
    const char *why = NULL;
    pagi_str *hdrs;
    pagi_str err = {0, 0};
    int rc;
    if (items != 2)
        croak_xs_usage(cv, "id, headers");
    id = (uint64_t)SvUV(ST(0));
    hdrs = headers_from_sv(aTHX_ ST(1), &n, &why);
    SP -= items;
    if (!hdrs) {
        err.ptr = why;
        err.len = strlen(why);
        PUSH_RESULT(-1, err);
        PUTBACK;
        return;
    }
    rc = pagi_rs_response_trailers(id, hdrs, n, &err);
    PUSH_RESULT(rc, err);
    PUTBACK;
}

XS(xs_fullflush)
{
    dXSARGS;
    pagi_str err = {0, 0};
    int rc;
    if (items != 1)
        croak_xs_usage(cv, "id");
    {
        uint64_t id = (uint64_t)SvUV(ST(0));
        SP -= items;
        rc = pagi_rs_fullflush(id, &err);
    }
    PUSH_RESULT(rc, err);
    PUTBACK;
}
