/*
 * Conversions between Perl values and the plain C values that cross into
 * Rust: bytes and text out of scalars (never changing the application's
 * own scalar), header lists flattened, and byte strings back into scalars.
 */
#include "glue.h"

/* Bytes of an SV without touching the caller's scalar.  SvPVbyte would
 * downgrade the application's own string in place; a string holding wide
 * characters cannot be bytes at all, and we report that instead of croaking. */
int sv_to_bytes(pTHX_ SV *sv, pagi_str *out)
{
    STRLEN len;
    const char *p;
    /* Once, before anything reads it: an element of a tied hash passed as
     * an argument holds its value only after its FETCH. */
    SvGETMAGIC(sv);
    if (!SvOK(sv)) {
        out->ptr = "";
        out->len = 0;
        return 1;
    }
    if (SvUTF8(sv)) {
        SV *copy = sv_2mortal(newSVsv_nomg(sv));
        if (!sv_utf8_downgrade(copy, TRUE))
            return 0;
        p = SvPV_nomg(copy, len);
    } else {
        p = SvPV_nomg(sv, len);
    }
    out->ptr = p;
    out->len = len;
    return 1;
}

SV *bytes_sv(pTHX_ pagi_str s, int utf8)
{
    SV *sv = newSVpvn(s.ptr ? s.ptr : "", s.len);
    if (utf8)
        SvUTF8_on(sv);
    return sv;
}

/* A BODY message's body as a new string.  The network joined it into one
 * buffer from the C library's malloc, ending in a NUL with a byte to spare
 * (malloc.rs's PerlBuffer), and the string takes that buffer as its own:
 * Perl frees it (free) or grows it (realloc) as any string's.  That needs
 * Perl's allocator to be the C library's, as in every perl built without
 * its own malloc (usemymalloc=n) or memory-pool tracking; any other perl,
 * and a body left in pieces (malloc failed), gets the pieces copied one
 * after another.  Always defined: an empty body is "". */
SV *body_sv(pTHX_ const pagi_msg *m)
{
    size_t i, total = 0;
    SV *sv;
    char *at;
#if !defined(MYMALLOC) && !defined(PERL_TRACK_MEMPOOL)
    if (m->adoptable) {
        size_t len, size;
        char *buf = pagi_rs_adopt_body(&len, &size);
        if (buf) {
            sv = newSV_type(SVt_PV);
            SvPV_set(sv, buf);
            SvCUR_set(sv, len);
            SvLEN_set(sv, size);
            SvPOK_only(sv);
            the_lookups(aTHX)->bodies_adopted++;
            return sv;
        }
    }
#endif
    for (i = 0; i < m->npieces; i++)
        total += m->pieces[i].len;
    sv = newSV(total + 1); /* room for the NUL Perl keeps after a string */
    SvPOK_only(sv);
    at = SvPVX(sv);
    for (i = 0; i < m->npieces; i++) {
        if (m->pieces[i].len) {
            memcpy(at, m->pieces[i].ptr, m->pieces[i].len);
            at += m->pieces[i].len;
        }
    }
    *at = '\0';
    SvCUR_set(sv, total);
    return sv;
}

/* Flatten [[name, value], ...] into 2n pagi_str entries held in a mortal buffer.
 * Returns NULL and sets *why on a malformed list. */
pagi_str *headers_from_sv(pTHX_ SV *sv, size_t *n_out, const char **why)
{
    AV *av;
    SSize_t i, top;
    pagi_str *buf;
    SV *holder;

    *n_out = 0;
    if (!SvOK(sv)) {
        return (pagi_str *)"";
    }
    if (!SvROK(sv) || SvTYPE(SvRV(sv)) != SVt_PVAV) {
        *why = "headers must be an array reference of [name, value] pairs";
        return NULL;
    }
    av = (AV *)SvRV(sv);
    top = av_top_index(av);
    holder = sv_2mortal(newSV((top + 2) * 2 * sizeof(pagi_str)));
    buf = (pagi_str *)SvPVX(holder);
    for (i = 0; i <= top; i++) {
        SV **pair = av_fetch(av, i, 0);
        AV *pav;
        SV **name, **value;
        if (!pair || !SvROK(*pair) || SvTYPE(SvRV(*pair)) != SVt_PVAV) {
            *why = "each header must be an array reference [name, value]";
            return NULL;
        }
        pav = (AV *)SvRV(*pair);
        if (av_top_index(pav) != 1) {
            *why = "each header must have exactly two elements [name, value]";
            return NULL;
        }
        name = av_fetch(pav, 0, 0);
        value = av_fetch(pav, 1, 0);
        if (!name || !SvOK(*name)) {
            *why = "header name is undefined";
            return NULL;
        }
        if (!value || !SvOK(*value)) {
            *why = "header value is undefined";
            return NULL;
        }
        if (!sv_to_bytes(aTHX_ * name, &buf[2 * i]) || !sv_to_bytes(aTHX_ * value, &buf[2 * i + 1])) {
            *why = "header contains wide characters; encode it to bytes first";
            return NULL;
        }
    }
    *n_out = (size_t)(top + 1);
    return buf;
}

/* UTF-8 bytes of a text argument; *has = 0 for undef.  Text fields are
 * characters: they are UTF-8 encoded here, on a copy, never in the
 * application's own scalar. */
pagi_str text_arg(pTHX_ SV *sv, int *has)
{
    pagi_str out = {"", 0};
    STRLEN len;
    SV *copy;
    SvGETMAGIC(sv); /* once: see sv_to_bytes */
    *has = SvOK(sv) ? 1 : 0;
    if (!*has)
        return out;
    /* ASCII is its own UTF-8: no copy (the common case, and numbers). */
    if (!SvUTF8(sv) && !SvROK(sv)) {
        const char *p = SvPV_nomg(sv, len);
        if (is_utf8_invariant_string((const U8 *)p, len)) {
            out.ptr = p;
            out.len = len;
            return out;
        }
    }
    copy = sv_2mortal(newSVsv_nomg(sv));
    sv_utf8_encode(copy);
    out.ptr = SvPV_nomg(copy, len);
    out.len = len;
    return out;
}

/* `id` in decimal at the end of buf (no NUL); *start points at its first
 * digit.  Returns the digit count. */
int registry_key(char buf[REGISTRY_KEY_SIZE], uint64_t id, const char **start)
{
    int len = 0;
    do {
        buf[REGISTRY_KEY_SIZE - 1 - len++] = (char)('0' + id % 10);
        id /= 10;
    } while (id);
    *start = buf + REGISTRY_KEY_SIZE - len;
    return len;
}

/* PAGI::RS::_adopted_bodies(): how many request-body strings this
 * interpreter took over from the network without a copy (t/40). */
XS(xs_adopted_bodies)
{
    dXSARGS;
    PERL_UNUSED_VAR(items);
    XSRETURN_UV(the_lookups(aTHX)->bodies_adopted);
}
