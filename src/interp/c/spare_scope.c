/*
 * A finished http request's scope hash, kept for the next request.
 *
 * Every request's scope is a hash of sixteen keys.  Storing a new key
 * looks it up in PL_strtab (the table of every shared hash key) and
 * allocates an entry; freeing the hash looks every key up again to
 * release it and frees the entries and the bucket array.  When nothing
 * but the server holds a scope once its request is over, its values are
 * let go and the emptied hash is kept, with its reference; the next
 * scope stores into the same entries (bench/README.md, session 26).
 *
 * Nothing an application can see changes:
 *   - a hash is kept only when the server's reference is the only one:
 *     no other reference, no weak reference (those live in the hash's aux
 *     part, so a hash with one is never kept), no magic (tie, uvar), no
 *     blessing, not restricted, and only the scope's own keys;
 *   - its values are let go at once, as freeing the hash would, and every
 *     value of the next scope is new, so a value an application kept (the
 *     headers array, say) is never reused or changed.
 * A request whose app is still running when its first call returns holds
 * its scope; such a scope is freed as before, whenever the app lets go.
 */
#include "glue.h"

/* Every key request.c may store in a scope. */
static const int scope_keys[] = {
    K_TYPE, K_PAGI, K_HTTP_VERSION, K_METHOD, K_SCHEME, K_PATH, K_RAW_PATH, K_QUERY_STRING,
    K_ROOT_PATH, K_HEADERS, K_CLIENT, K_SERVER, K_STATE, K_EXTENSIONS, K_CONNECTION, K_TRANSPORT,
};
#define SCOPE_KEY_COUNT (sizeof scope_keys / sizeof scope_keys[0])

/* The entry of `hv` under the shared key `key`, by its bucket alone (as
 * glue.h's hv_value), or NULL.  Only for the plain hashes this file keeps,
 * whose keys are all shared and stored without flags. */
static HE *entry_of(HV *hv, SV *key)
{
    HEK *wanted = SvSHARED_HEK_FROM_PV(SvPVX_const(key));
    HE *he;
    if (!HvARRAY(hv))
        return NULL;
    for (he = HvARRAY(hv)[HEK_HASH(wanted) & HvMAX(hv)]; he; he = HeNEXT(he)) {
        if (HeKEY_hek(he) == wanted)
            return he;
    }
    return NULL;
}

HV *spare_scope_take(pTHX_ interp_lookups *L, SV **rv)
{
    HV *scope;
    PERL_UNUSED_CONTEXT;
    if (!L->spare_scope)
        return NULL;
    *rv = L->spare_scope;
    L->spare_scope = NULL;
    scope = (HV *)SvRV(*rv);
    L->scopes_reused++;
    return scope;
}

void scope_store(pTHX_ HV *scope, interp_lookups *L, int k, SV *value)
{
    HE *he = HvTOTALKEYS(scope) ? entry_of(scope, KEY(L, k)) : NULL;
    if (he) {
        SV *old = HeVAL(he);
        HeVAL(he) = value;
        SvREFCNT_dec(old);
    } else {
        (void)hv_store_ent(scope, KEY(L, k), value, 0);
    }
}

void scope_forget(pTHX_ HV *scope, interp_lookups *L, int k)
{
    if (HvTOTALKEYS(scope) && entry_of(scope, KEY(L, k)))
        (void)hv_delete_ent(scope, KEY(L, k), G_DISCARD, 0);
}

/* Is `rv` a plain reference, held by its owner alone, to a plain hash
 * nothing else can reach?  A hash's aux part (SvOOK) holds its weak
 * references, a stash's name and method order, and the state of `each`;
 * iterating (keys, values, each, a copy) is all that gives a plain hash
 * one, and the caller resets that. */
static int unreachable(SV *rv)
{
    HV *hv;
    if (SvREFCNT(rv) != 1 || SvTYPE(rv) != SVt_IV || !SvROK(rv) || SvMAGICAL(rv) || SvREADONLY(rv)
        || SvWEAKREF(rv))
        return 0;
    hv = (HV *)SvRV(rv);
    if (SvTYPE(hv) != SVt_PVHV || SvREFCNT(hv) != 1 || SvMAGICAL(hv) || SvOBJECT(hv) || SvREADONLY(hv)
        || !HvSHAREKEYS(hv) || HvHASKFLAGS(hv) || !HvARRAY(hv))
        return 0;
    if (SvOOK(hv)) {
        const struct xpvhv_aux *aux = HvAUX(hv);
        if (aux->xhv_backreferences || aux->xhv_name_u.xhvnameu_name || aux->xhv_mro_meta)
            return 0;
    }
    return 1;
}

/* Keep the scope `rv` (whose reference the caller hands over) for the next
 * request if nothing else can reach it and it holds the scope's keys only;
 * otherwise let it go. */
static void retire(pTHX_ interp_lookups *L, SV *rv)
{
    HE *found[SCOPE_KEY_COUNT];
    size_t i, n = 0;
    HV *scope;
    if (L->spare_scope || !unreachable(rv)) {
        SvREFCNT_dec(rv);
        return;
    }
    scope = (HV *)SvRV(rv);
    /* A fresh hash's `each` starts from its first key; so must this one's
     * (this also frees an entry deleted during an `each`). */
    if (SvOOK(scope))
        hv_iterinit(scope);
    for (i = 0; i < SCOPE_KEY_COUNT; i++) {
        HE *he = entry_of(scope, KEY(L, scope_keys[i]));
        if (he)
            found[n++] = he;
    }
    /* A key the app added (or a placeholder, which only a hash once
     * restricted has) makes the counts differ. */
    if (n != (size_t)HvTOTALKEYS(scope)) {
        SvREFCNT_dec(rv);
        return;
    }
    /* Each value leaves its entry before it is let go, so the hash is
     * whole whenever a DESTROY that letting go triggers runs.  Such a
     * DESTROY may even run a request of its own and keep that scope: the
     * first hash kept stays, and this one goes. */
    for (i = 0; i < n; i++) {
        SV *old = HeVAL(found[i]);
        HeVAL(found[i]) = SvREFCNT_inc_simple_NN(&PL_sv_undef);
        SvREFCNT_dec(old);
    }
    if (L->spare_scope) {
        SvREFCNT_dec(rv);
    } else {
        L->spare_scope = rv;
        L->scopes_kept++;
    }
}

/* SAVEDESTRUCTOR_X's signature: runs as the request's scope on the save
 * stack is left, normally or by a die unwinding through it. */
static void retire_at_leave(pTHX_ void *rv)
{
    retire(aTHX_ the_lookups(aTHX), (SV *)rv);
}

void spare_scope_retire_at_leave(pTHX_ SV *rv)
{
    SAVEDESTRUCTOR_X(retire_at_leave, rv);
}

/* PAGI::RS::_spare_scope_stats(): (kept, reused), this interpreter's
 * counts of scope hashes kept at the end of a request and taken by the
 * next (t/33-spare-scope.t). */
XS(xs_spare_scope_stats)
{
    dXSARGS;
    interp_lookups *L = the_lookups(aTHX);
    PERL_UNUSED_VAR(items);
    SP -= items;
    EXTEND(SP, 2);
    mPUSHu(L->scopes_kept);
    mPUSHu(L->scopes_reused);
    XSRETURN(2);
}
