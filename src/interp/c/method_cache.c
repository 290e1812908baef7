/*
 * call_method, with a per-interpreter cache of the methods it finds.
 *
 * Future::AsyncAwait asks every awaited Future whether it is ready and for
 * its result, and once an async sub has suspended, asks the sub's own Future
 * whether it was cancelled: two or three calls of call_method per `await`,
 * each by name.  libperl's call_method makes a mortal scalar of the name (a
 * malloc and a free) and looks the name up in the invocant's class each
 * time.  On an SSE stream that was about a quarter of the interpreter's time
 * per event (bench/README.md, session 20).
 *
 * The pagi-rs executable defines Perl_call_method and exports it (build.rs,
 * --export-dynamic-symbol).  The dynamic linker looks in the executable
 * first, so it binds every call_method in the process here: libperl's own
 * and every XS module's.  libperl's definition stays reachable through
 * dlsym(RTLD_NEXT) and takes every call the cache does not.
 *
 * What is cached is the CV that Perl itself finds for the method
 * (gv_fetchmeth_pvn, as pp_method does), and it is reused only while Perl's
 * own counters say nothing changed that could change the answer:
 * PL_sub_generation (a change that concerns every class), the class's
 * pkg_gen (its own methods or @ISA) and its cache_gen (a method of a class it
 * inherits from).  Those are the counters Perl's own method caches trust.
 * An entry holds a reference to the class's stash and to the CV, so that
 * neither address can be reused by something else while it is cached.
 *
 * Only the plain case is cached: as the invocant, a blessed reference
 * without get-magic or a class name that Perl finds in its stash cache; a
 * method name without a package part (no SUPER::); a method that is
 * defined (not a stub left for AUTOLOAD); outside global destruction.
 * Everything else goes to libperl's call_method as it came.
 * PAGI_RS_METHOD_CACHE=0 in the environment turns the cache off (main.rs).
 *
 * A cached method that is an XSUB (pagi-rs's Futures answer in C) is run
 * directly when the call is a plain one, as pp_entersub would run it, not
 * through call_sv: call_sv builds a fake op, saves it, pushes the CV and
 * enters the op's entersub, which cost as much again as the XSUB's own
 * answer (session 22: a tenth of an SSE event's instructions).
 */
#include <dlfcn.h>

#include "glue.h"

/* Entries per interpreter, in pairs (two-way set associative): a pair is
 * found by the class and the name's address, and an entry in it confirmed
 * by the class and the name's text (the same address may hold another
 * name).  Both addresses move with every run (ASLR); with one entry per
 * slot, two of the methods an await calls landed on the same slot in about
 * one process in twenty and pushed each other out at every call, for the
 * life of the process (t/18 caught it). */
#define CACHED_METHODS 64
/* Longer method names are not cached. */
#define CACHED_NAME_MAX 47

typedef struct {
    HV *stash; /* NULL: an empty entry */
    CV *cv;
    U32 sub_generation;
    U32 pkg_gen;
    U32 cache_gen;
    char name[CACHED_NAME_MAX + 1];
} cached_method;

typedef struct {
    /* The interpreter it was made for.  An ithread's interpreter, cloned
     * by perl_clone, inherits the pointer to this very struct: it must not
     * use it (another thread's, and the parent's stashes). */
    PerlInterpreter *owner;
    cached_method entries[CACHED_METHODS];
    UV hits;
    UV misses;
} method_cache;

typedef I32 (*call_method_fn)(pTHX_ const char *, I32);

/* Set once by pagi_method_cache_setup, before any interpreter or thread. */
static int cache_enabled;
/* The interpreters' slot in PL_my_cxt_list (Perl's per-interpreter storage
 * for C code), assigned when the first interpreter attaches. */
static int cache_index = -1;
/* libperl's call_method; resolved at setup, or at first use in programs
 * (the unit tests) that never call setup. */
static call_method_fn libperl_call_method;

static call_method_fn find_libperl_call_method(void)
{
    call_method_fn found = __atomic_load_n(&libperl_call_method, __ATOMIC_ACQUIRE);
    if (!found) {
        found = (call_method_fn)dlsym(RTLD_NEXT, "Perl_call_method");
        __atomic_store_n(&libperl_call_method, found, __ATOMIC_RELEASE);
    }
    return found;
}

/* What GIMME_V reads inside an XSUB run by call_xsub: an op whose only
 * content is the context wanted (OPf_WANT_* has G_WANT's values).  Never
 * written after setup, so every interpreter thread may point PL_op here. */
static OP context_ops[G_WANT + 1];

void pagi_method_cache_setup(int enable)
{
    I32 want;
    for (want = 1; want <= G_WANT; want++)
        context_ops[want].op_flags = (U8)want;
    cache_enabled = enable && find_libperl_call_method() != NULL;
}

void method_cache_attach(pTHX)
{
    method_cache *cache = (method_cache *)Perl_my_cxt_init(aTHX_ &cache_index, sizeof(method_cache));
    cache->owner = aTHX;
}

static method_cache *cache_of(pTHX)
{
    method_cache *cache;
    if (cache_index < 0 || cache_index >= PL_my_cxt_size)
        return NULL;
    cache = (method_cache *)PL_my_cxt_list[cache_index];
    return cache && cache->owner == aTHX ? cache : NULL;
}

static I32 call_uncached(pTHX_ const char *methname, I32 flags)
{
    call_method_fn libperl = find_libperl_call_method();
    if (libperl)
        return libperl(aTHX_ methname, flags);
    /* Only with a libperl linked in statically, which build.rs does not do:
     * what perlcall documents call_method to be. */
    return call_sv(sv_2mortal(newSVpv(methname, 0)), (flags & ~G_METHOD_NAMED) | G_METHOD);
}

/* The class named by an invocant that is a string, if Perl would take it
 * for a class without more ado: the name is in PL_stashcache, which
 * pp_method's lookup (opmethod_stash in pp_hot.c) consults before it asks
 * whether a filehandle has that name.  A name not in that cache (perhaps a
 * filehandle's, perhaps a class not yet looked up) is left to libperl, whose
 * lookup caches it.  Future::AsyncAwait calls AWAIT_NEW_DONE this way, on
 * its future class by name, for every async sub that returns without
 * suspending. */
static HV *class_of_name(pTHX_ SV *invocant)
{
    if (SvMAGICAL(invocant) || !SvPOK(invocant) || isGV_with_GP(invocant) || SvCUR(invocant) == 0)
        return NULL;
    return gv_stashsv(invocant, GV_CACHE_ONLY);
}

/* The class of the invocant the caller pushed after its mark, if it is one
 * the cache takes: a blessed reference without get-magic, or a class name
 * Perl would take as one (class_of_name). */
static HV *plain_invocant_class(pTHX)
{
    SV **args = PL_stack_base + *PL_markstack_ptr;
    SV *invocant, *object;
    HV *stash;
    if (PL_stack_sp <= args)
        return NULL;
    invocant = args[1];
    if (SvGMAGICAL(invocant))
        return NULL;
    if (!SvROK(invocant)) {
        stash = class_of_name(aTHX_ invocant);
        return stash && SvOOK(stash) ? stash : NULL;
    }
    object = SvRV(invocant);
    if (!SvOBJECT(object))
        return NULL;
    stash = SvSTASH(object);
    return stash && SvOOK(stash) ? stash : NULL;
}

static int is_defined(CV *cv)
{
    return CvROOT(cv) || CvXSUB(cv);
}

/* pagi-rs's own XSUBs that Future::AsyncAwait calls on every await, which
 * answer from their argument alone: they push nothing on the save stack
 * and free no temporaries, so the scope an XSUB call opens has nothing to
 * undo for them, and they run without it (a fifth of what the call cost). */
static int answers_without_scope(XSUBADDR_t body)
{
    return body == xs_sent_yes || body == xs_sent_no || body == xs_sent_nothing ||
           body == xs_pending_is_ready || body == xs_pending_is_cancelled;
}

/* Run the XSUB `cv` on the arguments the caller pushed after its mark, as
 * pp_entersub runs an XSUB for call_sv, without call_sv's fake op and its
 * entersub: what an XSUB can see is the same (its arguments, the context,
 * a scope of its own and the scalar-context fix-up of its results).  For
 * plain calls only: the caller checked that `flags` asks for nothing but a
 * context and that no debugger wants to see the call. */
static I32 call_xsub(pTHX_ CV *cv, I32 flags)
{
    SSize_t markix = TOPMARK;
    SV **arg = PL_stack_base + markix;
    OP *caller_op = PL_op;
    I32 want = flags & G_WANT ? flags & G_WANT : G_SCALAR;
    int scoped = !answers_without_scope(CvXSUB(cv));
    if (scoped) {
        ENTER;
        SAVETMPS;
    }
    /* pp_entersub's rule: an XSUB may keep what it is given, so a pad
     * temporary (which the caller's next statement reuses) is copied. */
    while (arg < PL_stack_sp) {
        arg++;
        if (*arg && SvPADTMP(*arg))
            *arg = sv_mortalcopy(*arg);
    }
    /* GIMME_V reads the context from PL_op, so a scoped XSUB runs under an
     * op that holds the one the caller wants.  A call_sv inside the XSUB
     * (pending.c's REDIRECT, a tie's FETCH) saves PL_op on the save stack,
     * and LEAVE puts that op back: so PL_op is the caller's again only
     * after LEAVE.  The scope-free XSUBs never ask for the context; they
     * run under the caller's own op, so that whatever saves PL_op while
     * they run saves the caller's. */
    if (scoped)
        PL_op = &context_ops[want];
    CvXSUB(cv)(aTHX_ cv);
    if (want == G_SCALAR) {
        SV **result = PL_stack_base + markix + 1;
        if (result != PL_stack_sp) {
            *result = result > PL_stack_sp ? &PL_sv_undef : *PL_stack_sp;
            PL_stack_sp = result;
        }
    }
    if (scoped)
        LEAVE;
    PL_op = caller_op;
    return (I32)(PL_stack_sp - (PL_stack_base + markix));
}

/* Run the cached method `cv`: an XSUB directly when the call is a plain
 * one, anything else through call_sv. */
static I32 call_cached(pTHX_ CV *cv, I32 flags)
{
    if (CvISXSUB(cv) && !(flags & ~G_WANT) && !PERLDB_SUB && !PL_curcopdb)
        return call_xsub(aTHX_ cv, flags);
    return call_sv((SV *)cv, flags);
}

/* Let go of what `entry` holds, if anything, and leave it empty.  Released
 * at the caller's next FREETMPS rather than now: the old CV may be the one
 * running further up this very call chain. */
static void release_entry(pTHX_ cached_method *entry)
{
    if (entry->stash) {
        sv_2mortal((SV *)entry->stash);
        sv_2mortal((SV *)entry->cv);
        entry->stash = NULL;
    }
}

I32 Perl_call_method(pTHX_ const char *methname, I32 flags)
{
    method_cache *cache;
    cached_method *pair, *entry;
    int way;
    struct mro_meta *meta;
    HV *stash;
    GV *gv;
    CV *cv;
    size_t len;
    if (!cache_enabled || (flags & G_METHOD_NAMED) || PL_phase == PERL_PHASE_DESTRUCT)
        return call_uncached(aTHX_ methname, flags);
    cache = cache_of(aTHX);
    stash = plain_invocant_class(aTHX);
    if (!cache || !stash)
        return call_uncached(aTHX_ methname, flags);
    meta = HvMROMETA(stash);
    pair = &cache->entries[(((uintptr_t)stash >> 4) ^ ((uintptr_t)methname >> 2) ^
                            ((uintptr_t)methname >> 8)) &
                           (CACHED_METHODS - 2)];
    /* The entry this class and name already have, current or not; else
     * NULL. */
    entry = NULL;
    for (way = 0; way < 2; way++) {
        if (pair[way].stash == stash && strcmp(pair[way].name, methname) == 0) {
            entry = &pair[way];
            break;
        }
    }
    if (entry && entry->sub_generation == PL_sub_generation && entry->pkg_gen == meta->pkg_gen &&
        entry->cache_gen == meta->cache_gen && is_defined(entry->cv)) {
        cache->hits++;
        return call_cached(aTHX_ entry->cv, flags);
    }
    len = strlen(methname);
    if (len > CACHED_NAME_MAX || memchr(methname, ':', len) || memchr(methname, '\'', len))
        return call_uncached(aTHX_ methname, flags);
    gv = gv_fetchmeth_pvn(stash, methname, len, 0, 0);
    if (!gv || !isGV(gv) || !(cv = GvCV(gv)) || !is_defined(cv))
        return call_uncached(aTHX_ methname, flags);
    cache->misses++;
    /* Where the answer goes: over this class and name's stale entry; else
     * into an empty entry; else the newer of the pair moves over the older
     * and the answer takes its place. */
    if (!entry) {
        if (!pair[0].stash) {
            entry = &pair[0];
        } else if (!pair[1].stash) {
            entry = &pair[1];
        } else {
            release_entry(aTHX_ &pair[1]);
            pair[1] = pair[0];
            pair[0].stash = NULL;
            entry = &pair[0];
        }
    }
    release_entry(aTHX_ entry);
    /* The lookup may have run code (a class's MRO plugin): read the counters
     * after it, as they stand for the answer it gave. */
    meta = HvMROMETA(stash);
    entry->stash = (HV *)SvREFCNT_inc_simple_NN((SV *)stash);
    entry->cv = (CV *)SvREFCNT_inc_simple_NN((SV *)cv);
    entry->sub_generation = PL_sub_generation;
    entry->pkg_gen = meta->pkg_gen;
    entry->cache_gen = meta->cache_gen;
    memcpy(entry->name, methname, len + 1);
    return call_cached(aTHX_ cv, flags);
}

/* PAGI::RS::_method_cache_stats(): (enabled, hits, misses) of this
 * interpreter's cache, for t/ and for anyone asking whether it works. */
XS(xs_method_cache_stats)
{
    dXSARGS;
    method_cache *cache = cache_of(aTHX);
    PERL_UNUSED_VAR(items);
    SP -= items;
    EXTEND(SP, 3);
    mPUSHi(cache_enabled);
    mPUSHu(cache ? cache->hits : 0);
    mPUSHu(cache ? cache->misses : 0);
    XSRETURN(3);
}

/* PAGI::RS::_call_method($invocant, $name, @args): call_method from C, as
 * XS modules call it, with the name copied into a buffer on this C stack, so
 * that successive calls pass different names at the same address (t/).
 * Returns the method's result in scalar context. */
XS(xs_call_method)
{
    dXSARGS;
    char name[CACHED_NAME_MAX + 16];
    STRLEN len;
    const char *given;
    I32 i, count;
    SV *result;
    if (items < 2)
        croak_xs_usage(cv, "invocant, name, ...");
    given = SvPV(ST(1), len);
    if (len >= sizeof name || memchr(given, '\0', len))
        croak("PAGI::RS::_call_method: the name must be under %d bytes, without NUL",
              (int)sizeof name);
    memcpy(name, given, len);
    name[len] = '\0';
    ENTER;
    SAVETMPS;
    PUSHMARK(SP);
    XPUSHs(ST(0));
    for (i = 2; i < items; i++)
        XPUSHs(ST(i));
    PUTBACK;
    count = call_method(name, G_SCALAR);
    SPAGAIN;
    result = count > 0 ? newSVsv(POPs) : newSV(0);
    PUTBACK;
    FREETMPS;
    LEAVE;
    ST(0) = sv_2mortal(result);
    XSRETURN(1);
}
