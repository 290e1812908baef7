/*
 * A finished http request's scope hash, kept for the next request.
 *
 * Every request's scope is a hash of sixteen keys, two of them hashes
 * too (pagi and extensions).  Storing a new key looks it up in PL_strtab
 * (the table of every shared hash key) and allocates an entry; freeing a
 * hash looks every key up again to release it and frees the entries and
 * the bucket array.  When nothing but the server holds a scope once its
 * request is over, its values are let go and the emptied hash is kept,
 * with its reference, and with its pagi and extensions hashes emptied in
 * place when they too qualify; the next scope stores into the same
 * entries (bench/README.md, session 26).
 *
 * Nothing an application can see changes:
 *   - a hash is kept only when the server's reference is the only one:
 *     no other reference, no weak reference (those live in the hash's aux
 *     part, so a hash with one is never kept), no magic (tie, uvar), no
 *     blessing, not restricted, and only the keys the server gave it;
 *   - its values are let go at once, as freeing the hash would, and each
 *     value of the next scope is new or one that nothing else could reach
 *     (those hashes, and the values kept below), so a value an
 *     application kept (the headers array, its pagi hash) is never reused
 *     or changed.
 * A request whose app is still running when its first call returns holds
 * its scope; such a scope is freed as before, whenever the app lets go.
 *
 * Values kept: the strings, arrays, pairs and empty hashes a scope is
 * mostly made of (every value but the request object's pagi.connection
 * and pagi.transport, and a state or fullflush hash with keys) stay in the
 * kept scope when they too are the server's alone and as it made them:
 * plain strings and numbers with no magic, no number or reference in a
 * string, arrays and hashes neither shifted, blessed, tied nor weakly
 * referenced.
 * The next request writes its own values into them in place (request.c),
 * which saves making and freeing a few dozen scalars and arrays.  Nothing
 * in them can run code when let go or changed, and nothing outside can
 * see them, so keeping them for one more request changes nothing an
 * application can observe; a value that fails any check goes at once, as
 * before.
 */
#include "glue.h"

/* Every key request.c may store in a scope. */
static const int scope_keys[] = {
    K_TYPE, K_PAGI, K_HTTP_VERSION, K_METHOD, K_SCHEME, K_PATH, K_RAW_PATH, K_QUERY_STRING,
    K_ROOT_PATH, K_HEADERS, K_CLIENT, K_SERVER, K_STATE, K_EXTENSIONS, K_CONNECTION, K_TRANSPORT,
};
#define SCOPE_KEY_COUNT C_ARRAY_LENGTH(scope_keys)

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

/* Does `hv`'s aux part, if any, hold only the state of `each` (which
 * the callers reset or which is empty), not weak references, a stash's
 * name or its method order? */
static int aux_only_iterates(HV *hv)
{
    const struct xpvhv_aux *aux;
    if (!SvOOK(hv))
        return 1;
    aux = HvAUX(hv);
    return !aux->xhv_backreferences && !aux->xhv_name_u.xhvnameu_name && !aux->xhv_mro_meta;
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
    return aux_only_iterates(hv);
}

/* The entries of the hash `rv` refers to, when nothing else can reach it
 * and its keys are all among keys[0..nkeys): their number, with each
 * entry in found[] and its key (K_*) in which[]; -1 otherwise.  A fresh
 * hash's `each` starts from its first key, and so, from here, does this
 * one's (resetting also frees an entry deleted during an `each`). */
static int own_entries(pTHX_ interp_lookups *L, SV *rv, const int *keys, size_t nkeys, HE **found,
                       int *which)
{
    HV *hv;
    size_t i;
    int n = 0;
    if (!unreachable(rv))
        return -1;
    hv = (HV *)SvRV(rv);
    if (SvOOK(hv))
        hv_iterinit(hv);
    for (i = 0; i < nkeys; i++) {
        HE *he = entry_of(hv, KEY(L, keys[i]));
        if (he) {
            found[n] = he;
            which[n++] = keys[i];
        }
    }
    /* A key the app added (or a placeholder, which only a hash once
     * restricted has) makes the counts differ. */
    return (size_t)n == (size_t)HvTOTALKEYS(hv) ? n : -1;
}

/* The value leaves its entry before it is let go, so that the hash is
 * whole whenever a DESTROY this triggers runs. */
static void release_value(pTHX_ HE *he)
{
    SV *old = HeVAL(he);
    HeVAL(he) = SvREFCNT_inc_simple_NN(&PL_sv_undef);
    SvREFCNT_dec(old);
}

/* Empty, in place, the nested hash `rv` (a scope's pagi or extensions)
 * if it can be kept with its scope: 1; else 0, and it is left as it is. */
static int keeps_value(int k, SV *value);

static int empty_nested(pTHX_ interp_lookups *L, SV *rv, const int *keys, size_t nkeys)
{
    HE *found[SCOPE_KEY_COUNT];
    int which[SCOPE_KEY_COUNT];
    int i, n = own_entries(aTHX_ L, rv, keys, nkeys, found, which);
    for (i = 0; i < n; i++) {
        if (keeps_value(which[i], HeVAL(found[i])))
            L->scope_values_kept++;
        else
            release_value(aTHX_ found[i]);
    }
    return n >= 0;
}

static const int pagi_keys[] = { K_VERSION, K_SPEC_VERSION };
static const int extension_keys[] = { K_FULLFLUSH };

/* ---- values kept in a kept scope ------------------------------------------ */

/* A request with more headers than this lets its headers array go: a
 * kept scope should not hold on to an unusual request's memory. */
#define KEPT_HEADERS_MAX 64

/* Only its holder's, and nothing but a string's bytes (UTF-8 or not,
 * shared copy-on-write or not): no number, reference, magic or offset. */
static int plain_string(SV *sv)
{
    return sv && SvREFCNT(sv) == 1
           && (SvFLAGS(sv) & ~(U32)(SVf_UTF8 | SVf_IsCOW)) == (SVt_PV | SVf_POK | SVp_POK);
}

/* A port: an integer and nothing else, or undef (a Unix socket's). */
static int plain_port(SV *sv)
{
    return sv && SvREFCNT(sv) == 1
           && (SvFLAGS(sv) == (SVt_IV | SVf_IOK | SVp_IOK) || SvFLAGS(sv) == SVt_NULL);
}

/* The array `rv` refers to, if both are only their holder's and the array
 * is plain (see unreachable, for hashes); else NULL.  An array's weak
 * references live in its magic. */
static AV *plain_array(SV *rv)
{
    AV *av;
    if (!rv || SvREFCNT(rv) != 1 || SvFLAGS(rv) != (SVt_IV | SVf_ROK))
        return NULL;
    av = (AV *)SvRV(rv);
    if (SvTYPE(av) != SVt_PVAV || SvREFCNT(av) != 1 || SvMAGICAL(av) || SvOBJECT(av) || SvREADONLY(av)
        || !AvREAL(av) || AvREIFY(av) || AvALLOC(av) != AvARRAY(av))
        return NULL;
    return av;
}

/* [string, string] (a header), or [string, port] (client, server). */
static int plain_pair(SV *rv, int second_is_port)
{
    AV *av = plain_array(rv);
    SV *second;
    if (!av || AvFILLp(av) != 1 || !plain_string(AvARRAY(av)[0]))
        return 0;
    second = AvARRAY(av)[1];
    return second_is_port ? plain_port(second) : plain_string(second);
}

static int plain_headers(SV *rv)
{
    AV *av = plain_array(rv);
    SSize_t i;
    if (!av || AvFILLp(av) + 1 > KEPT_HEADERS_MAX)
        return 0;
    for (i = 0; i <= AvFILLp(av); i++) {
        if (!plain_pair(AvARRAY(av)[i], 0))
            return 0;
    }
    return 1;
}

/* An empty plain hash only its holder's (see unreachable); its `each`
 * has nothing to resume, and aux left by iterating is harmless. */
static int plain_empty_hash(SV *rv)
{
    HV *hv;
    if (!rv || SvREFCNT(rv) != 1 || SvFLAGS(rv) != (SVt_IV | SVf_ROK))
        return 0;
    hv = (HV *)SvRV(rv);
    if (SvTYPE(hv) != SVt_PVHV || SvREFCNT(hv) != 1 || SvMAGICAL(hv) || SvOBJECT(hv) || SvREADONLY(hv)
        || HvTOTALKEYS(hv) != 0)
        return 0;
    return aux_only_iterates(hv);
}

/* May the value of key k stay in the kept scope (or its pagi or
 * extensions hash) for the next request? */
static int keeps_value(int k, SV *value)
{
    switch (k) {
    case K_TYPE:
    case K_HTTP_VERSION:
    case K_METHOD:
    case K_SCHEME:
    case K_PATH:
    case K_RAW_PATH:
    case K_QUERY_STRING:
    case K_ROOT_PATH:
    case K_VERSION:
    case K_SPEC_VERSION:
        return plain_string(value);
    case K_STATE:
    case K_FULLFLUSH:
        return plain_empty_hash(value);
    case K_HEADERS:
        return plain_headers(value);
    case K_CLIENT:
    case K_SERVER:
        return plain_pair(value, 1);
    default:
        return 0;
    }
}

SV *scope_kept_value(pTHX_ HV *scope, interp_lookups *L, int k)
{
    HE *he = HvTOTALKEYS(scope) ? entry_of(scope, KEY(L, k)) : NULL;
    PERL_UNUSED_CONTEXT;
    /* A value let go left undef in its place (release_value). */
    return he && HeVAL(he) != &PL_sv_undef ? HeVAL(he) : NULL;
}

void scope_store_bytes(pTHX_ HV *scope, interp_lookups *L, int k, pagi_str s, int utf8)
{
    SV *kept = scope_kept_value(aTHX_ scope, L, k);
    if (kept && plain_string(kept)) {
        sv_setpvn(kept, s.ptr ? s.ptr : "", s.len);
        if (utf8)
            SvUTF8_on(kept);
        else
            SvUTF8_off(kept);
        return;
    }
    scope_store(aTHX_ scope, L, k, bytes_sv(aTHX_ s, utf8));
}

void scope_store_interned(pTHX_ HV *scope, interp_lookups *L, int k, pagi_str s)
{
    SV *kept = scope_kept_value(aTHX_ scope, L, k);
    if (kept && plain_string(kept))
        interned_into(aTHX_ L, INTERNED_NAMES, s, kept);
    else
        scope_store(aTHX_ scope, L, k, interned_sv(aTHX_ L, INTERNED_NAMES, s));
}

void scope_store_kept_copy(pTHX_ HV *scope, interp_lookups *L, int k, SV *kept_src)
{
    SV *kept = scope_kept_value(aTHX_ scope, L, k);
    if (kept && plain_string(kept))
        kept_copy_into(aTHX_ kept_src, kept);
    else
        scope_store(aTHX_ scope, L, k, kept_copy(aTHX_ kept_src));
}

int scope_keeps_empty_hash(pTHX_ HV *scope, interp_lookups *L, int k)
{
    return plain_empty_hash(scope_kept_value(aTHX_ scope, L, k));
}

/* Keep the scope `rv` (whose reference the caller hands over) for the next
 * request if nothing else can reach it and it holds the scope's keys only;
 * otherwise let it go.  Its pagi and extensions hashes stay in it, emptied,
 * when they could be kept likewise. */
static void retire(pTHX_ interp_lookups *L, SV *rv)
{
    HE *found[SCOPE_KEY_COUNT];
    int which[SCOPE_KEY_COUNT];
    int i, n;
    if (L->spare_scope) {
        SvREFCNT_dec(rv);
        return;
    }
    n = own_entries(aTHX_ L, rv, scope_keys, SCOPE_KEY_COUNT, found, which);
    if (n < 0) {
        SvREFCNT_dec(rv);
        return;
    }
    for (i = 0; i < n; i++) {
        SV *value = HeVAL(found[i]);
        if (which[i] == K_PAGI && empty_nested(aTHX_ L, value, pagi_keys, C_ARRAY_LENGTH(pagi_keys)))
            continue;
        if (which[i] == K_EXTENSIONS
            && empty_nested(aTHX_ L, value, extension_keys, C_ARRAY_LENGTH(extension_keys)))
            continue;
        if (keeps_value(which[i], value)) {
            L->scope_values_kept++;
            continue;
        }
        release_value(aTHX_ found[i]);
    }
    /* A DESTROY run by letting the values go may even have run a request
     * of its own and kept that scope: the first kept stays. */
    if (L->spare_scope) {
        SvREFCNT_dec(rv);
    } else {
        L->spare_scope = rv;
        L->scopes_kept++;
    }
}

HV *scope_kept_nested(pTHX_ HV *scope, interp_lookups *L, int k)
{
    HE *he = entry_of(scope, KEY(L, k));
    SV *value = he ? HeVAL(he) : NULL;
    PERL_UNUSED_CONTEXT;
    return value && SvROK(value) && SvTYPE(SvRV(value)) == SVt_PVHV ? (HV *)SvRV(value) : NULL;
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

/* PAGI::RS::_spare_scope_stats(): (kept, reused, values kept), this
 * interpreter's counts of scope hashes kept at the end of a request and
 * taken by the next, and of the values kept in them (t/33-spare-scope.t). */
XS(xs_spare_scope_stats)
{
    dXSARGS;
    interp_lookups *L = the_lookups(aTHX);
    PERL_UNUSED_VAR(items);
    SP -= items;
    EXTEND(SP, 3);
    mPUSHu(L->scopes_kept);
    mPUSHu(L->scopes_reused);
    mPUSHu(L->scope_values_kept);
    XSRETURN(3);
}
