/*
 * PAGI::RS::Pending's busiest methods in C: making a pending Future,
 * settling it with done, and the questions Future::AsyncAwait asks on every
 * await.  A WebSocket message or a drain wait ran about 200 Perl ops in
 * their Perl versions (perl/PAGI/RS/Pending.pm).
 *
 * They read and write the object as the pure-Perl Future (Future::PP) lays
 * it out: Pending.pm's setup() checks that layout once, and installs these
 * only when it matches.  Anything they do not handle themselves (an
 * unusual callback, $Future::TIMES, a replaced wrap_cb, a subclass) they
 * hand, with the same arguments, to the Perl version they replaced, which
 * handles everything.
 */
#include "glue.h"

enum { P_NEW, P_CLONE, P_DONE, P_ON_READY, P_GET, P_CHAIN_CANCEL, P_NEW_DONE, P_COUNT };

typedef struct {
    PerlInterpreter *owner;
    HV *stash;          /* PAGI::RS::Pending */
    HV *future_stash;   /* Future */
    IV cb_ready;        /* Future::PP's flags for an on_ready callback */
    CV *plain_wrap;     /* Future::wrap_cb as it was at setup */
    GV *wrap_gv;        /* *Future::wrap_cb, to see whether it changed */
    GV *times_gv;       /* *Future::TIMES (a glob: `local` swaps its slot) */
    CV *cancel_awaited; /* PAGI::RS::Pending::_cancel_awaited */
    CV *perl[P_COUNT];  /* the Perl versions */
    HV *spare_done;     /* a done Future kept for the next AWAIT_NEW_DONE */
    AV *spare_result;   /* its result array, emptied */
    UV done_kept, done_reused; /* for t/35-spare-future.t */
} pending_state;

/* Thread-local, but an interpreter may be built on one thread and run on
 * another (the master loads the app, then each worker's thread adopts it),
 * so the state is read from the interpreter itself whenever the thread
 * meets an interpreter it has not seen: from what Pending.pm's setup()
 * leaves when it installs these. */
static __thread pending_state P;

static void load_state(pTHX)
{
    static const char *const perl_names[P_COUNT] = {
        "PAGI::RS::Pending::_perl_new",      "PAGI::RS::Pending::_perl_clone",
        "PAGI::RS::Pending::_perl_done",     "PAGI::RS::Pending::_lean_on_ready",
        "PAGI::RS::Pending::_lean_get",      "PAGI::RS::Pending::_lean_chain_cancel",
        "PAGI::RS::Pending::_perl_new_done",
    };
    SV *wrap = get_sv("PAGI::RS::Pending::C_PLAIN_WRAP", GV_ADD);
    int i;
    for (i = 0; i < P_COUNT; i++) {
        P.perl[i] = get_cv(perl_names[i], 0);
        /* AWAIT_NEW_DONE's may be missing: setup() leaves it out when
         * something else already defined Future::AWAIT_NEW_DONE. */
        if (!P.perl[i] && i != P_NEW_DONE)
            croak("PAGI::RS::Pending: %s is missing (setup() installs the C methods)", perl_names[i]);
    }
    P.cancel_awaited = get_cv("PAGI::RS::Pending::_cancel_awaited", 0);
    if (!P.cancel_awaited || !SvROK(wrap) || SvTYPE(SvRV(wrap)) != SVt_PVCV)
        croak("PAGI::RS::Pending: the C methods were not installed by setup()");
    P.plain_wrap = (CV *)SvRV(wrap);
    P.cb_ready = SvIV(get_sv("PAGI::RS::Pending::C_CB_READY", GV_ADD));
    P.wrap_gv = gv_fetchpvs("Future::wrap_cb", GV_ADD, SVt_PVCV);
    P.times_gv = gv_fetchpvs("Future::TIMES", GV_ADD, SVt_PV);
    P.stash = gv_stashpvs("PAGI::RS::Pending", GV_ADD);
    P.future_stash = gv_stashpvs("Future", GV_ADD);
    /* Another interpreter's kept Future, if any, went with it. */
    P.spare_done = NULL;
    P.spare_result = NULL;
    P.done_kept = P.done_reused = 0;
    P.owner = aTHX;
}

static int state_ready(pTHX)
{
    if (P.owner != aTHX)
        load_state(aTHX);
    return 1;
}

static int future_times(pTHX)
{
    SV *t = GvSV(P.times_gv);
    return t && SvTRUE(t);
}

/* Hand this XS call, arguments and context unchanged, to the Perl version,
 * and return what it returns. */
#define REDIRECT(which)                                                        \
    STMT_START {                                                               \
        I32 count_;                                                            \
        PUSHMARK(MARK);                                                        \
        PUTBACK;                                                               \
        count_ = call_sv((SV *)P.perl[which], GIMME_V);                        \
        XSRETURN(count_);                                                      \
    }                                                                          \
    STMT_END

static HV *future_hv(pTHX_ SV *self)
{
    if (!SvROK(self) || SvTYPE(SvRV(self)) != SVt_PVHV)
        return NULL;
    return (HV *)SvRV(self);
}

static int field_true(pTHX_ HV *hv, const char *key, I32 klen)
{
    SV **v = hv_fetch(hv, key, klen, 0);
    return v && SvTRUE(*v);
}
#define FIELD_TRUE(hv, k) field_true(aTHX_(hv), "" k "", sizeof(k) - 1)

/* field_true for the fields Future::AsyncAwait asks about on every await,
 * by a shared key with its hash (lookups.c): no hashing of the name. */
static int known_field_true(pTHX_ HV *hv, int key)
{
    SV *v = hv_value(aTHX_ hv, KEY(the_lookups(aTHX), key));
    return v && SvTRUE(v);
}

/* A new pending Future on `loop`, laid out as Pending.pm's _build makes it. */
static SV *build(pTHX_ SV *loop)
{
    HV *hv = newHV();
    interp_lookups *L = the_lookups(aTHX);
    STORE(hv, L, K_READY, newSViv(0));
    STORE(hv, L, K_CALLBACKS, newRV_noinc((SV *)newAV()));
    (void)hv_stores(hv, "u_loop", newSVsv(loop));
    return sv_bless(sv_2mortal(newRV_noinc((SV *)hv)), P.stash);
}

/* A pending Future on the bridge's loop for send.c's drain wait, as
 * PAGI::RS::Pending->new would make it; NULL when only the Perl version
 * may make one (setup() did not install the C methods, or
 * $Future::TIMES is on). */
SV *pending_new_on_bridge_loop(pTHX)
{
    SV *loop;
    if (P.owner != aTHX) {
        if (!get_cv("PAGI::RS::Pending::_perl_new", 0))
            return NULL;
        load_state(aTHX);
    }
    loop = get_sv("PAGI::RS::Bridge::LOOP", 0);
    if (!loop || future_times(aTHX))
        return NULL;
    return build(aTHX_ loop);
}

/* Settle `f`, fresh from pending_new_on_bridge_loop and seen by nobody
 * yet (so no callbacks), as done(value) would; takes the reference to
 * `value`.  A receive that finds its event already queued returns it. */
void pending_settle_fresh(pTHX_ SV *f, SV *value)
{
    HV *hv = (HV *)SvRV(f);
    AV *result = newAV();
    av_push(result, value);
    (void)hv_stores(hv, "result", newRV_noinc((SV *)result));
    (void)hv_stores(hv, "ready", newSViv(1));
    (void)hv_deletes(hv, "callbacks", G_DISCARD);
}

/* PAGI::RS::Pending->new($loop) */
XS(xs_pending_new)
{
    dXSARGS;
    if (!state_ready(aTHX) || items != 2 || SvROK(ST(0)) || future_times(aTHX) ||
        !strEQ(SvPV_nolen(ST(0)), "PAGI::RS::Pending"))
        REDIRECT(P_NEW);
    ST(0) = build(aTHX_ ST(1));
    XSRETURN(1);
}

/* AWAIT_CLONE: the async sub's own Future, on the loop of the first one it
 * waits on. */
XS(xs_pending_clone)
{
    dXSARGS;
    HV *hv;
    SV **loop;
    if (!state_ready(aTHX) || items != 1 || future_times(aTHX) || !(hv = future_hv(aTHX_ ST(0))))
        REDIRECT(P_CLONE);
    loop = hv_fetchs(hv, "u_loop", 0);
    ST(0) = build(aTHX_ loop ? *loop : &PL_sv_undef);
    XSRETURN(1);
}

/* Future->AWAIT_NEW_DONE(@result): the Future that Future::AsyncAwait
 * returns for every call of an async sub that finished without waiting
 * (an app, a middleware layer, a helper).  Future::PP makes it through
 * three method calls, about 70 Perl ops; this builds what they build,
 * { ready => 1, callbacks => [], result => [@result] } blessed into Future.
 * A subclass (which may have its own new or done), an instance (the
 * method is also reachable as one) or $Future::TIMES goes to Future's own
 * method. */
XS(xs_future_new_done)
{
    dXSARGS;
    HV *hv;
    AV *result;
    I32 i;
    if (!state_ready(aTHX) || !P.perl[P_NEW_DONE])
        croak("PAGI::RS::Pending: _c_new_done is installed only by setup()");
    if (items < 1 || SvROK(ST(0)) || future_times(aTHX) || !strEQ(SvPV_nolen(ST(0)), "Future"))
        REDIRECT(P_NEW_DONE);
    if (P.spare_done) {
        /* Kept as made, emptied, and out of everybody's reach since. */
        hv = P.spare_done;
        result = P.spare_result;
        P.spare_done = NULL;
        P.spare_result = NULL;
        P.done_reused++;
        if (items > 1)
            av_extend(result, items - 2);
        for (i = 1; i < items; i++)
            av_push(result, newSVsv(ST(i)));
        ST(0) = sv_2mortal(newRV_noinc((SV *)hv));
        XSRETURN(1);
    }
    result = newAV();
    if (items > 1)
        av_extend(result, items - 2);
    for (i = 1; i < items; i++)
        av_push(result, newSVsv(ST(i)));
    hv = newHV();
    {
        interp_lookups *L = the_lookups(aTHX);
        STORE(hv, L, K_READY, newSViv(1));
        STORE(hv, L, K_CALLBACKS, newRV_noinc((SV *)newAV()));
        STORE(hv, L, K_RESULT, newRV_noinc((SV *)result));
    }
    ST(0) = sv_bless(sv_2mortal(newRV_noinc((SV *)hv)), P.future_stash);
    XSRETURN(1);
}

/* ---- a done Future kept for the next one -------------------------------
 * Every request's app, as an async sub that finished without waiting,
 * returns a Future made by AWAIT_NEW_DONE above, which http_app.c reads
 * and lets go: a blessed hash, two arrays and their references, made and
 * freed per request (about 2,000 instructions).  When nothing but the
 * temporary it came back in holds it, it is kept, its result let go at
 * once, and the next AWAIT_NEW_DONE hands it out again.  Nobody can tell:
 * kept only while its hash is as AWAIT_NEW_DONE made it (ready, callbacks
 * empty, result; nothing added, no magic, no weak reference) and Future
 * has no DESTROY (as Perl's own cache of it says; Future.pm defines one
 * only under $Future::DEBUG), so no destructor call is skipped. */

/* A plain array, only its reference's, under a plain reference only its
 * hash's; NULL otherwise. */
static AV *own_array(SV *rv)
{
    AV *av;
    if (!rv || SvREFCNT(rv) != 1 || SvFLAGS(rv) != (SVt_IV | SVf_ROK))
        return NULL;
    av = (AV *)SvRV(rv);
    if (SvTYPE(av) != SVt_PVAV || SvREFCNT(av) != 1 || SvMAGICAL(av) || SvOBJECT(av) || SvREADONLY(av)
        || !AvREAL(av) || AvREIFY(av))
        return NULL;
    return av;
}

void spare_future_keep(pTHX_ SV *f)
{
    interp_lookups *L;
    struct mro_meta *meta;
    HV *hv;
    SV *ready;
    AV *callbacks, *result;
    if (P.owner != aTHX || P.spare_done || !P.perl[P_NEW_DONE])
        return;
    /* The temporary the app's call returned, and nothing else, holds it. */
    if (!SvTEMP(f) || SvREFCNT(f) != 1 || !SvROK(f))
        return;
    hv = (HV *)SvRV(f);
    if (SvTYPE(hv) != SVt_PVHV || SvREFCNT(hv) != 1 || !SvOBJECT(hv) || SvSTASH(hv) != P.future_stash
        || SvMAGICAL(hv) || SvREADONLY(hv) || HvTOTALKEYS(hv) != 3)
        return;
    if (SvOOK(hv) && HvAUX(hv)->xhv_backreferences)
        return;
    meta = HvMROMETA(P.future_stash);
    if (meta->destroy_gen != PL_sub_generation || meta->destroy)
        return;
    L = the_lookups(aTHX);
    ready = hv_value(aTHX_ hv, KEY(L, K_READY));
    callbacks = own_array(hv_value(aTHX_ hv, KEY(L, K_CALLBACKS)));
    result = own_array(hv_value(aTHX_ hv, KEY(L, K_RESULT)));
    if (!ready || SvREFCNT(ready) != 1 || SvFLAGS(ready) != (SVt_IV | SVf_IOK | SVp_IOK) || SvIVX(ready) != 1
        || !callbacks || AvFILLp(callbacks) != -1 || !result)
        return;
    P.spare_done = (HV *)SvREFCNT_inc_simple_NN(hv);
    P.spare_result = result;
    P.done_kept++;
    /* What the app returned goes now, as it would have with the Future. */
    av_clear(result);
}

/* PAGI::RS::_spare_future_stats(): (kept, reused). */
XS(xs_spare_future_stats)
{
    dXSARGS;
    PERL_UNUSED_VAR(items);
    SP -= items;
    EXTEND(SP, 2);
    mPUSHu(P.owner == aTHX ? P.done_kept : 0);
    mPUSHu(P.owner == aTHX ? P.done_reused : 0);
    XSRETURN(2);
}

/* For http_app.c: is `f` done, read from the object as Future::PP's
 * is_done reads it, when it is blessed into Future itself and setup()
 * found that layout (the C methods are installed)?  -1: only its own
 * is_done method can say. */
int future_plain_is_done(pTHX_ SV *f)
{
    HV *hv;
    if (P.owner != aTHX) {
        if (!get_cv("PAGI::RS::Pending::_perl_new", 0))
            return -1;
        load_state(aTHX);
    }
    if (!SvROK(f) || SvTYPE(SvRV(f)) != SVt_PVHV || !SvOBJECT(SvRV(f)) || SvSTASH(SvRV(f)) != P.future_stash)
        return -1;
    hv = (HV *)SvRV(f);
    return known_field_true(aTHX_ hv, K_READY) && !known_field_true(aTHX_ hv, K_FAILURE) &&
           !known_field_true(aTHX_ hv, K_CANCELLED);
}

/* As future_plain_is_done, for "still pending": 1, 0, or -1 when `f` is not
 * a plain Future. */
int future_plain_is_pending(pTHX_ SV *f)
{
    if (future_plain_is_done(aTHX_ f) < 0)
        return -1;
    return !known_field_true(aTHX_(HV *) SvRV(f), K_READY);
}

/* A callbacks entry Future::PP's _mark_ready would run as a plain on_ready
 * callback: [CB_ALWAYS|CB_SELF, an unblessed coderef]. */
static int plain_on_ready(pTHX_ SV *entry)
{
    AV *cb;
    SV **flags, **code;
    if (!SvROK(entry) || SvTYPE(SvRV(entry)) != SVt_PVAV)
        return 0;
    cb = (AV *)SvRV(entry);
    if (av_count(cb) != 2)
        return 0;
    flags = av_fetch(cb, 0, 0);
    code = av_fetch(cb, 1, 0);
    return flags && code && SvIOK(*flags) && SvIV(*flags) == P.cb_ready && SvROK(*code) &&
           SvTYPE(SvRV(*code)) == SVt_PVCV && !SvOBJECT(SvRV(*code));
}

/* $f->done(@result): when every callback is a plain on_ready one, run them
 * directly (as Pending.pm's done does); anything else goes to Perl. */
XS(xs_pending_done)
{
    dXSARGS;
    HV *hv;
    SV **cbs_p, *self, *cbs_rv;
    AV *cbs = NULL;
    SSize_t i, n = 0;
    if (!state_ready(aTHX) || items < 1 || future_times(aTHX) || !(hv = future_hv(aTHX_ ST(0))) ||
        FIELD_TRUE(hv, "ready") || FIELD_TRUE(hv, "subs") || FIELD_TRUE(hv, "revoke_when_ready"))
        REDIRECT(P_DONE);
    cbs_p = hv_fetchs(hv, "callbacks", 0);
    if (cbs_p && SvOK(*cbs_p)) {
        if (!SvROK(*cbs_p) || SvTYPE(SvRV(*cbs_p)) != SVt_PVAV)
            REDIRECT(P_DONE);
        cbs = (AV *)SvRV(*cbs_p);
        n = (SSize_t)av_count(cbs);
        for (i = 0; i < n; i++) {
            SV **e = av_fetch(cbs, i, 0);
            if (!e || !plain_on_ready(aTHX_ * e))
                REDIRECT(P_DONE);
        }
    }
    /* Our own reference to the Future: a callback may drop the caller's. */
    self = sv_2mortal(newRV_inc((SV *)hv));
    (void)hv_stores(hv, "result", newRV_noinc((SV *)av_make(items - 1, &ST(1))));
    (void)hv_stores(hv, "ready", newSViv(1));
    (void)hv_deletes(hv, "on_cancel", G_DISCARD);
    /* Deleted, the list lives on in this mortal until the callbacks ran. */
    cbs_rv = hv_deletes(hv, "callbacks", 0);
    if (cbs_rv && cbs) {
        for (i = 0; i < n; i++) {
            SV **e = av_fetch(cbs, i, 0);
            SV **code = e ? av_fetch((AV *)SvRV(*e), 1, 0) : NULL;
            dSP;
            if (!code)
                continue;
            PUSHMARK(SP);
            XPUSHs(self);
            PUTBACK;
            (void)call_sv(*code, G_VOID | G_DISCARD);
        }
    }
    ST(0) = self;
    XSRETURN(1);
}

/* AWAIT_ON_READY($code): the awaiting async sub's resumption, as a plain
 * on_ready callback.  A replaced wrap_cb goes to Perl, which honours it. */
XS(xs_pending_on_ready)
{
    dXSARGS;
    HV *hv;
    SV **cbs_p;
    AV *entry;
    if (!state_ready(aTHX) || items != 2 || GvCV(P.wrap_gv) != P.plain_wrap || !(hv = future_hv(aTHX_ ST(0))))
        REDIRECT(P_ON_READY);
    cbs_p = hv_fetchs(hv, "callbacks", 0);
    if (!cbs_p || !SvOK(*cbs_p)) {
        cbs_p = hv_stores(hv, "callbacks", newRV_noinc((SV *)newAV()));
    } else if (!SvROK(*cbs_p) || SvTYPE(SvRV(*cbs_p)) != SVt_PVAV) {
        REDIRECT(P_ON_READY);
    }
    entry = newAV();
    av_push(entry, newSViv(P.cb_ready));
    av_push(entry, newSVsv(ST(1)));
    av_push((AV *)SvRV(*cbs_p), newRV_noinc((SV *)entry));
    XSRETURN_EMPTY;
}

/* AWAIT_IS_READY and AWAIT_IS_CANCELLED: whether the Future's field `key`
 * is true. */
static SV *flag_answer(pTHX_ CV *cv, I32 items, SV *self, int key)
{
    HV *hv;
    if (items != 1 || !(hv = future_hv(aTHX_ self)))
        croak_xs_usage(cv, "self");
    return boolSV(known_field_true(aTHX_ hv, key));
}

XS(xs_pending_is_ready)
{
    dXSARGS;
    ST(0) = flag_answer(aTHX_ cv, items, items ? ST(0) : &PL_sv_undef, K_READY);
    XSRETURN(1);
}

XS(xs_pending_is_cancelled)
{
    dXSARGS;
    ST(0) = flag_answer(aTHX_ cv, items, items ? ST(0) : &PL_sv_undef, K_CANCELLED);
    XSRETURN(1);
}

/* AWAIT_GET: the result of a done Future; a failed or cancelled one (or one
 * not ready) goes to Perl, which raises what Future raises. */
XS(xs_pending_get)
{
    dXSARGS;
    HV *hv;
    SV **res;
    AV *av;
    SSize_t i, n;
    if (!state_ready(aTHX) || items != 1 || !(hv = future_hv(aTHX_ ST(0))) || !known_field_true(aTHX_ hv, K_READY) ||
        known_field_true(aTHX_ hv, K_FAILURE) || known_field_true(aTHX_ hv, K_CANCELLED))
        REDIRECT(P_GET);
    res = hv_fetchs(hv, "result", 0);
    if (!res || !SvROK(*res) || SvTYPE(SvRV(*res)) != SVt_PVAV)
        REDIRECT(P_GET);
    av = (AV *)SvRV(*res);
    n = (SSize_t)av_count(av);
    SP -= items;
    if (GIMME_V != G_LIST) {
        SV **first = av_fetch(av, 0, 0);
        XPUSHs(first ? sv_mortalcopy(*first) : &PL_sv_undef);
        XSRETURN(1);
    }
    EXTEND(SP, n);
    for (i = 0; i < n; i++) {
        SV **v = av_fetch(av, i, 0);
        PUSHs(v ? sv_mortalcopy(*v) : &PL_sv_undef);
    }
    XSRETURN(n);
}

/* AWAIT_CHAIN_CANCEL($awaited): remember what the async sub awaits now
 * (weakly), and make sure on_cancel ends with the one entry that cancels
 * it.  When something else was registered since, Perl moves the entry. */
XS(xs_pending_chain_cancel)
{
    dXSARGS;
    HV *hv;
    SV **slot, **oc;
    AV *on_cancel;
    SSize_t n;
    if (!state_ready(aTHX) || items != 2 || !(hv = future_hv(aTHX_ ST(0))))
        REDIRECT(P_CHAIN_CANCEL);
    slot = hv_stores(hv, "u_pagi_rs_awaiting", newSVsv(ST(1)));
    if (slot && SvROK(*slot))
        sv_rvweaken(*slot);
    oc = hv_fetchs(hv, "on_cancel", 0);
    if (!oc || !SvOK(*oc)) {
        on_cancel = newAV();
        (void)hv_stores(hv, "on_cancel", newRV_noinc((SV *)on_cancel));
    } else if (SvROK(*oc) && SvTYPE(SvRV(*oc)) == SVt_PVAV) {
        on_cancel = (AV *)SvRV(*oc);
    } else {
        REDIRECT(P_CHAIN_CANCEL);
    }
    n = (SSize_t)av_count(on_cancel);
    if (n > 0) {
        SV **last = av_fetch(on_cancel, n - 1, 0);
        if (last && SvROK(*last) && SvRV(*last) == (SV *)P.cancel_awaited)
            XSRETURN_EMPTY;
        REDIRECT(P_CHAIN_CANCEL);
    }
    av_push(on_cancel, newRV_inc((SV *)P.cancel_awaited));
    XSRETURN_EMPTY;
}
