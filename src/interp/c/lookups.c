/*
 * The per-interpreter cache of the names used on every request: package
 * variables, stashes and shared hash keys, resolved once per interpreter.
 */
#include "glue.h"

/* ---- per-interpreter lookups ---------------------------------------------
 * Names used on every request: package variables and hash keys.  Looking a
 * package variable up by name, or hashing a constant key, costs a hash
 * lookup each time; these are resolved once.  Each interpreter runs on its
 * own thread for its whole life, so a thread-local cache is a
 * per-interpreter cache.  The keys are shared-HEK strings, so stores and
 * fetches with them reuse the precomputed hash and skip the string table. */

static const char *const key_names[K_COUNT] = {
    "type", "pagi", "version", "spec_version", "fullflush", "http_version",
    "method", "scheme", "path", "raw_path", "query_string", "root_path",
    "headers", "client", "server", "state", "extensions", "pagi.connection",
    "pagi.transport", "body", "more", "file", "fh", "status", "trailers",
    "data", "event", "id", "retry", "text", "bytes",
    "ready", "failure", "cancelled", "callbacks", "result",
};

__thread interp_lookups pagi_lookups;

/* A version string every scope copies (interned.c). */
static SV *kept_version(pTHX_ const char *name)
{
    STRLEN len;
    const char *p = SvPV(get_sv(name, GV_ADD), len);
    return new_kept_sv(aTHX_ p, len);
}

interp_lookups *make_lookups(pTHX)
{
    size_t i;
    if (pagi_lookups.owner == aTHX)
        return &pagi_lookups;
    /* GVs rather than their HV/SV: `local %STATE` swaps the slot, not the glob. */
    pagi_lookups.state_gv = gv_fetchpvs("PAGI::RS::Bridge::STATE", GV_ADD, SVt_PVHV);
    pagi_lookups.requests_gv = gv_fetchpvs("PAGI::RS::Bridge::REQUESTS", GV_ADD, SVt_PVHV);
    /* Every request adds a key no other hash has (its id) and deletes it at
     * its end.  In a hash that shares its keys, each of the two walks
     * PL_strtab, a table of every key in the program, and misses the cache
     * twice: about 4 % of the interpreter at hello world (bench/README.md).
     * Perl turns sharing off itself for hashes it finds large; keys already
     * stored stay valid either way. */
    HvSHAREKEYS_off(GvHVn(pagi_lookups.requests_gv));
    pagi_lookups.done_gv = gv_fetchpvs("PAGI::RS::HTTP::DONE", GV_ADD, SVt_PV);
    pagi_lookups.http_stash = gv_stashpvs("PAGI::RS::HTTP", GV_ADD);
    pagi_lookups.sse_stash = gv_stashpvs("PAGI::RS::SSE", GV_ADD);
    pagi_lookups.ws_stash = gv_stashpvs("PAGI::RS::WebSocket", GV_ADD);
    pagi_lookups.app_gv = gv_fetchpvs("PAGI::RS::Bridge::APP", GV_ADD, SVt_PV);
    pagi_lookups.after_send_gv = gv_fetchpvs("PAGI::RS::HTTP::_after_send", GV_ADD, SVt_PVCV);
    pagi_lookups.receive_gv = gv_fetchpvs("PAGI::RS::HTTP::_receive", GV_ADD, SVt_PVCV);
    pagi_lookups.ws_receive_gv = gv_fetchpvs("PAGI::RS::WebSocket::_receive", GV_ADD, SVt_PVCV);
    pagi_lookups.app_returned_gv = gv_fetchpvs("PAGI::RS::HTTP::_app_returned", GV_ADD, SVt_PVCV);
    pagi_lookups.app_done_gv = gv_fetchpvs("PAGI::RS::HTTP::_app_done", GV_ADD, SVt_PVCV);
    pagi_lookups.app_ready_gv = gv_fetchpvs("PAGI::RS::HTTP::_app_ready", GV_ADD, SVt_PVCV);
    pagi_lookups.finished_gv = gv_fetchpvs("PAGI::RS::HTTP::_finished", GV_ADD, SVt_PVCV);
    pagi_lookups.yield_turn_gv = gv_fetchpvs("PAGI::RS::HTTP::_yield_turn", GV_ADD, SVt_PVCV);
    /* Held: every sub made takes its own reference, but between two of
     * them the glob could otherwise go with its stash entry. */
    pagi_lookups.anon_gv =
        (GV *)SvREFCNT_inc_simple_NN(gv_fetchpvs("PAGI::RS::HTTP::__ANON__", GV_ADDMULTI, SVt_PVCV));
    /* Set once by Bridge::init, before any request exists. */
    pagi_lookups.core_version = kept_version(aTHX_ "PAGI::RS::Bridge::CORE_VERSION");
    pagi_lookups.www_version = kept_version(aTHX_ "PAGI::RS::Bridge::SPEC_VERSION");
    pagi_lookups.legacy_www = strEQ(SvPV_nolen(pagi_lookups.www_version), "0.3");
    for (i = 0; i < K_COUNT; i++)
        pagi_lookups.keys[i] = newSVpvn_share(key_names[i], (I32)strlen(key_names[i]), 0);
    /* Another interpreter's strings, if any, went with it. */
    memset(pagi_lookups.interned, 0, sizeof pagi_lookups.interned);
    pagi_lookups.spare_scope = NULL;
    pagi_lookups.scopes_kept = pagi_lookups.scopes_reused = pagi_lookups.scope_values_kept = 0;
    pagi_lookups.bodies_adopted = 0;
    memset(pagi_lookups.spare_subs, 0, sizeof pagi_lookups.spare_subs);
    pagi_lookups.subs_kept = pagi_lookups.subs_reused = 0;
    pagi_lookups.owner = aTHX;
    return &pagi_lookups;
}

CV *sub_of(pTHX_ GV *gv)
{
    CV *sub = GvCV(gv);
    if (!sub)
        croak("pagi-rs: Undefined subroutine &%" SVf, SVfARG(sv_2mortal(newSVhek(GvNAME_HEK(gv)))));
    return sub;
}
