/*
 * Response bodies lent to the network without a copy (src/interp/lent.rs
 * keeps the loans): which bodies are lent, how, and freeing the scalars the
 * network gave back.
 */
#include "glue.h"

/* Below this a body is copied: a loan's bookkeeping (a scalar, a lock, a
 * later free) costs more than copying a few kilobytes. */
#define LEND_MIN (16 * 1024)

/* Send body `body` (already known to be bytes) for request `id` as a loan,
 * if it is a plain byte string of at least LEND_MIN bytes.  The loan is a
 * new scalar that shares body's buffer (copy-on-write), or that got its own
 * copy where Perl would not share it; either way nothing writes into that
 * buffer while the scalar lives, and the scalar is freed on this thread
 * once the network gives it back.  Returns 1 with *rc set if it was sent
 * this way, 0 for a body to send as a copy. */
int send_lent_body(pTHX_ uint64_t id, SV *body, int more, int *rc, pagi_str *err)
{
    SV *lent;
    if (!body || SvGMAGICAL(body) || !SvPOK(body) || SvUTF8(body) || SvCUR(body) < LEND_MIN)
        return 0;
    lent = newSV(0);
    /* The copy-on-write flags Perl's own assignments use (SV_DO_COW_SVSETSV
     * is 0 outside the core); NOSTEAL: the body stays the app's. */
    sv_setsv_flags(lent, body, SV_NOSTEAL | SV_COW_SHARED_HASH_KEYS | SV_COW_OTHER_PVS);
    /* A buffer it does not own (SvLEN 0: a shared key or foreign memory)
     * may go away with something else: copy instead. */
    if (!SvPOK(lent) || SvUTF8(lent) || SvLEN(lent) == 0 || SvCUR(lent) != SvCUR(body)) {
        SvREFCNT_dec(lent);
        return 0;
    }
    /* The reference passes to Rust, whatever the outcome. */
    *rc = pagi_rs_response_body_lent(id, lent, SvPVX(lent), SvCUR(lent), more, err);
    return 1;
}

/* Free the scalars the network gave back.  Called at the end of each batch
 * of messages: only this interpreter's thread may touch them. */
void release_returned_loans(pTHX)
{
    void *given_back[64];
    size_t n, i;
    while ((n = pagi_rs_take_returned_loans(given_back, 64)) > 0) {
        for (i = 0; i < n; i++)
            SvREFCNT_dec((SV *)given_back[i]);
    }
}
