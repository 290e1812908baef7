/*
 * Strings that repeat from request to request (the method, the HTTP
 * version, the scheme, the addresses, header names and values, the spec
 * versions), kept once per interpreter and handed to each scope as
 * copy-on-write copies.
 *
 * A fresh string costs a malloc, a copy and, when the scope is freed, a
 * free; a copy-on-write copy of a kept string costs neither, and Perl
 * copies the bytes itself the moment anybody changes the value, so the
 * application sees ordinary strings.  The table is two-way set
 * associative and bounded: a string whose pair of slots is taken pushes
 * out the older of the two, so unusual values cost a miss and never grow
 * memory.
 */
#include "glue.h"

/* Longer strings are rarely repeated exactly and cost more to hash and
 * compare than a copy saves. */
#define INTERNED_MAX_LEN 64

/* The first slot of the pair `p[0..len)` may live in.  Eight bytes at a
 * time, multiplied and folded: a header value of 60 bytes hashes in a
 * few dozen instructions, where a byte-at-a-time hash took hundreds. */
static size_t pair_of(const char *p, size_t len)
{
    uint64_t h = (uint64_t)len * 0x9E3779B97F4A7C15ull;
    while (len >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        h = (h ^ w) * 0xFF51AFD7ED558CCDull;
        h ^= h >> 32;
        p += 8;
        len -= 8;
    }
    if (len) {
        uint64_t w = 0;
        memcpy(&w, p, len);
        h = (h ^ w) * 0xFF51AFD7ED558CCDull;
        h ^= h >> 32;
    }
    h ^= h >> 29;
    return (size_t)h & (INTERNED_SLOTS - 2);
}

static int holds(SV *kept, const char *p, size_t len)
{
    return kept && SvCUR(kept) == len && memcmp(SvPVX(kept), p, len) == 0;
}

/* A kept string, its buffer marked as shared by one owner, as sv_setsv
 * marks a buffer the first time it shares it.  sv_setsv shares a short
 * buffer only once it is so marked: unmarked, it wants the buffer no more
 * than twice the string's length (sv.c's SV_COW_MAX_WASTE_FACTOR_THRESHOLD),
 * which "GET" or "1.1" in an 8-byte buffer are not.  The mark needs the
 * spare byte after the NUL where the sharers are counted; sv_grow leaves
 * one, and without it the string is kept unmarked. */
SV *new_kept_sv(pTHX_ const char *p, size_t len)
{
    SV *sv = newSVpvn(p, len);
#ifdef PERL_ANY_COW
    if (!SvIsCOW(sv) && SvLEN(sv) > SvCUR(sv) + 1) {
        CowREFCNT(sv) = 0;
        SvIsCOW_on(sv);
    }
#endif
    return sv;
}

/* A new SV sharing `kept`'s buffer: what sv_setsv makes of a marked
 * buffer, without its general path, which cost more than the malloc it
 * saves (about 270 instructions against newSVpvn's 220).  Once the count
 * of sharers is at its maximum (255), or where Perl has no copy-on-write,
 * a plain copy. */
SV *kept_copy(pTHX_ SV *kept)
{
#ifdef PERL_ANY_COW
    if (SvIsCOW(kept) && SvLEN(kept) && CowREFCNT(kept) != SV_COW_REFCNT_MAX) {
        SV *sv = newSV_type(SVt_PV);
        CowREFCNT(kept)++;
        SvPV_set(sv, SvPVX(kept));
        SvCUR_set(sv, SvCUR(kept));
        SvLEN_set(sv, SvLEN(kept));
        SvFLAGS(sv) |= SVf_POK | SVp_POK | SVf_IsCOW;
        return sv;
    }
#endif
    return newSVpvn(SvPVX(kept), SvCUR(kept));
}

/* The kept string holding `s` in `table`, kept now if it was not; NULL
 * for a string not worth keeping. */
static SV *kept_for(pTHX_ interp_lookups *L, int table, pagi_str s)
{
    const char *p = s.ptr ? s.ptr : "";
    SV **pair;
    /* An empty string is not worth a lookup: it has no bytes to share. */
    if (s.len == 0 || s.len > INTERNED_MAX_LEN)
        return NULL;
    pair = &L->interned[table][pair_of(p, s.len)];
    if (holds(pair[0], p, s.len))
        return pair[0];
    if (holds(pair[1], p, s.len))
        return pair[1];
    /* Newest first; the older of the two goes.  Copies already handed out
     * own their share of its buffer, which goes with the last of them. */
    SvREFCNT_dec(pair[1]);
    pair[1] = pair[0];
    pair[0] = new_kept_sv(aTHX_ p, s.len);
    return pair[0];
}

SV *interned_sv(pTHX_ interp_lookups *L, int table, pagi_str s)
{
    SV *kept = kept_for(aTHX_ L, table, s);
    return kept ? kept_copy(aTHX_ kept) : newSVpvn(s.ptr ? s.ptr : "", s.len);
}

void kept_copy_into(pTHX_ SV *kept, SV *dst)
{
#ifdef PERL_ANY_COW
    if (SvIsCOW(kept) && SvLEN(kept)) {
        /* Already a copy of it (the same value as last time): nothing to do. */
        if (SvIsCOW(dst) && SvPVX(dst) == SvPVX(kept)) {
            SvUTF8_off(dst);
            return;
        }
        if (CowREFCNT(kept) != SV_COW_REFCNT_MAX) {
            if (SvIsCOW(dst))
                sv_force_normal_flags(dst, SV_COW_DROP_PV);
            else if (SvLEN(dst))
                Safefree(SvPVX(dst));
            CowREFCNT(kept)++;
            SvPV_set(dst, SvPVX(kept));
            SvCUR_set(dst, SvCUR(kept));
            SvLEN_set(dst, SvLEN(kept));
            SvFLAGS(dst) = (SvFLAGS(dst) & ~SVf_UTF8) | SVf_POK | SVp_POK | SVf_IsCOW;
            return;
        }
    }
#endif
    sv_setpvn(dst, SvPVX(kept), SvCUR(kept));
    SvUTF8_off(dst);
}

void interned_into(pTHX_ interp_lookups *L, int table, pagi_str s, SV *dst)
{
    SV *kept = kept_for(aTHX_ L, table, s);
    if (kept) {
        kept_copy_into(aTHX_ kept, dst);
        return;
    }
    sv_setpvn(dst, s.ptr ? s.ptr : "", s.len);
    SvUTF8_off(dst);
}
