/*
 * Coderefs bound to a request object: $send, $receive and the app's
 * on_ready callback are XS subs, each holding a reference to its request
 * in magic tagged by the sub's vtable.  Cheaper than cloning a Perl
 * closure, and cheaper still when reused: an http request's $send and
 * $receive that nothing but the server holds once its request is over are
 * unbound from it and kept, one of each kind, for the next request.
 *
 * Making one (its CV, its magic, the reference to it) and freeing it cost
 * about a thousand instructions; rebinding a kept one, a few dozen
 * (bench/README.md, session 29).
 *
 * The application cannot tell: a sub is kept only when the server's
 * reference is its only one (no copy, no weak reference: that would add
 * back-reference magic), and nothing about it changed since it was made
 * (flags, name, prototype, blessing, magic).  Its request is let go when
 * its request ends, as freeing it would, not when the next one comes.
 */
#include "glue.h"

/* A new bound sub has exactly these flags (SvFLAGS, CvFLAGS) once made;
 * any difference means somebody changed it. */
static __thread U32 made_sv_flags, made_cv_flags;

/* The kept sub for `tag`'s kind running `body`, or NULL; the slot is
 * emptied. */
static SV *take_spare(pTHX_ interp_lookups *L, XSUBADDR_t body, MGVTBL *tag)
{
    size_t i;
    for (i = 0; i < C_ARRAY_LENGTH(L->spare_subs); i++) {
        if (L->spare_subs[i] && L->spare_sub_tags[i] == tag) {
            SV *rv = L->spare_subs[i];
            L->spare_subs[i] = NULL;
            if (CvXSUB((CV *)SvRV(rv)) == body)
                return rv;
            SvREFCNT_dec(rv); /* a tag shared by two bodies: not ours to mix */
            return NULL;
        }
    }
    return NULL;
}

SV *new_bound_xsub(pTHX_ XSUBADDR_t body, MGVTBL *tag, AV *req)
{
    interp_lookups *L = the_lookups(aTHX);
    SV *rv = take_spare(aTHX_ L, body, tag);
    CV *sub;
    if (rv) {
        /* Kept with its magic, which held nothing since its request ended. */
        MAGIC *mg = SvMAGIC(SvRV(rv));
        mg->mg_obj = newRV_inc((SV *)req);
        L->subs_reused++;
        return rv;
    }
    /* What newXS makes of an anonymous XSUB, but with its glob looked up
     * once per interpreter: newXS finds the __ANON__ glob by name every
     * time, about 450 instructions, and a request makes two or three of
     * these subs. */
    sub = (CV *)newSV_type(SVt_PVCV);
    CvGV_set(sub, L->anon_gv);
    CvFILE(sub) = (char *)__FILE__;
    CvISXSUB_on(sub);
    CvXSUB(sub) = body;
    CvANON_on(sub);
    /* The magic holds its own reference to the request (MGf_REFCOUNTED). */
    sv_magicext((SV *)sub, sv_2mortal(newRV_inc((SV *)req)), PERL_MAGIC_ext, tag, NULL, 0);
    made_sv_flags = SvFLAGS(sub);
    made_cv_flags = CvFLAGS(sub);
    return newRV_noinc((SV *)sub);
}

/* The request object `cv` was bound to by new_bound_xsub. */
SV *bound_request(pTHX_ CV *cv, MGVTBL *tag)
{
    MAGIC *mg = mg_findext((SV *)cv, PERL_MAGIC_ext, tag);
    if (!mg || !mg->mg_obj || !SvROK(mg->mg_obj))
        croak("pagi-rs: this coderef no longer belongs to a request");
    return mg->mg_obj;
}

/* Is `rv` (a reference new_bound_xsub made for `tag`) the only way to
 * its sub, and the sub as it was made?  Then nobody else can see it. */
static int unseen(pTHX_ interp_lookups *L, SV *rv, MGVTBL *tag)
{
    CV *sub;
    MAGIC *mg;
    if (!tag || SvREFCNT(rv) != 1 || (SvFLAGS(rv) & ~SVs_TEMP) != (SVt_IV | SVf_ROK))
        return 0;
    sub = (CV *)SvRV(rv);
    if (SvREFCNT(sub) != 1 || SvFLAGS(sub) != made_sv_flags || CvFLAGS(sub) != made_cv_flags
        || CvGV(sub) != L->anon_gv || !CvISXSUB(sub))
        return 0;
    /* Ours alone: a weak reference, or anyone's magic, sits beside it. */
    mg = SvMAGIC(sub);
    return mg && !mg->mg_moremagic && mg->mg_type == PERL_MAGIC_ext && mg->mg_virtual == tag
           && mg->mg_flags == MGf_REFCOUNTED && mg->mg_obj;
}

/* Keep `rv` for the next request of its kind when nobody else can see its
 * sub, else let it go; either way its request is let go now. */
static void retire(pTHX_ SV *rv, MGVTBL *tag)
{
    interp_lookups *L = the_lookups(aTHX);
    size_t i, free_slot = C_ARRAY_LENGTH(L->spare_subs);
    SV *req;
    MAGIC *mg;
    if (!unseen(aTHX_ L, rv, tag)) {
        SvREFCNT_dec(rv);
        return;
    }
    for (i = 0; i < C_ARRAY_LENGTH(L->spare_subs); i++) {
        if (L->spare_subs[i] && L->spare_sub_tags[i] == tag) {
            SvREFCNT_dec(rv); /* one of its kind is kept already */
            return;
        }
        if (!L->spare_subs[i] && free_slot == C_ARRAY_LENGTH(L->spare_subs))
            free_slot = i;
    }
    if (free_slot == C_ARRAY_LENGTH(L->spare_subs)) {
        SvREFCNT_dec(rv);
        return;
    }
    /* Unbound and kept before the request goes: its DESTROY (Perl) may
     * run a request of its own, which then finds the sub ready. */
    mg = SvMAGIC(SvRV(rv));
    req = mg->mg_obj;
    mg->mg_obj = NULL;
    L->spare_subs[free_slot] = rv;
    L->spare_sub_tags[free_slot] = tag;
    L->subs_kept++;
    SvREFCNT_dec(req);
}

/* SAVEDESTRUCTOR_X's signature: runs as the request's scope on the save
 * stack is left, normally or by a die unwinding through it.  The kind is
 * read back from the sub's magic (unseen checks it is the only magic). */
static void retire_at_leave(pTHX_ void *p)
{
    SV *rv = (SV *)p;
    MGVTBL *tag = NULL;
    if (SvROK(rv) && SvTYPE(SvRV(rv)) == SVt_PVCV && SvMAGIC(SvRV(rv)))
        tag = SvMAGIC(SvRV(rv))->mg_virtual;
    retire(aTHX_ rv, tag);
}

void bound_xsub_retire_at_leave(pTHX_ SV *rv)
{
    SAVEDESTRUCTOR_X(retire_at_leave, rv);
}

/* PAGI::RS::_spare_sub_stats(): (kept, reused), this interpreter's counts
 * of bound subs kept at the end of a request and rebound by the next
 * (t/34-spare-subs.t). */
XS(xs_spare_sub_stats)
{
    dXSARGS;
    interp_lookups *L = the_lookups(aTHX);
    PERL_UNUSED_VAR(items);
    SP -= items;
    EXTEND(SP, 2);
    mPUSHu(L->subs_kept);
    mPUSHu(L->subs_reused);
    XSRETURN(2);
}
