/*
 * The core's messages handed to Perl (_next): a new request becomes its
 * request object, its entry in the registry, its scope hash and its $send;
 * every other message a plain list.  With _wake_ack, the loop's side of the
 * wake-up.
 */
#include "glue.h"

/* \[a, b], taking the references to `a` and `b`: made at its size and
 * filled in place (newAV_alloc_x), without av_extend's and av_push's
 * checks, a few hundred instructions for each of a request's headers. */
static SV *pair_ref(pTHX_ SV *a, SV *b)
{
    AV *av = newAV_alloc_x(2);
    AvARRAY(av)[0] = a;
    AvARRAY(av)[1] = b;
    AvFILLp(av) = 1;
    return newRV_noinc((SV *)av);
}

/* [[name, value], ...], the outer array filled in place too. */
static SV *headers_av(pTHX_ interp_lookups *L, const pagi_msg *m)
{
    AV *av;
    size_t i;
    if (m->nheaders == 0)
        return newRV_noinc((SV *)newAV());
    av = newAV_alloc_x((SSize_t)m->nheaders);
    for (i = 0; i < m->nheaders; i++) {
        AvARRAY(av)[i] = pair_ref(aTHX_ interned_sv(aTHX_ L, INTERNED_NAMES, m->headers[2 * i]),
                                  interned_sv(aTHX_ L, INTERNED_VALUES, m->headers[2 * i + 1]));
        AvFILLp(av) = (SSize_t)i;
    }
    return newRV_noinc((SV *)av);
}

/* [host, port]; a negative port is undef: [path, undef] for a Unix socket. */
static SV *host_port(pTHX_ interp_lookups *L, pagi_str host, int64_t port)
{
    return pair_ref(aTHX_ interned_sv(aTHX_ L, INTERNED_NAMES, host),
                    port < 0 ? newSV(0) : newSViv((IV)port));
}

/* The scope's headers under K_HEADERS: written into the arrays a kept
 * scope kept (spare_scope.c checked them: plain, and nobody else's), a
 * pair for a pair, or new ones. */
static void store_headers(pTHX_ HV *scope, interp_lookups *L, const pagi_msg *m)
{
    SV *kept = scope_kept_value(aTHX_ scope, L, K_HEADERS);
    AV *av;
    SSize_t have, want = (SSize_t)m->nheaders, i;
    if (!kept) {
        scope_store(aTHX_ scope, L, K_HEADERS, headers_av(aTHX_ L, m));
        return;
    }
    av = (AV *)SvRV(kept);
    /* Pairs beyond this request's headers go (plain: no code runs). */
    for (have = AvFILLp(av) + 1; have > want; have--) {
        SV *surplus = AvARRAY(av)[have - 1];
        AvARRAY(av)[have - 1] = NULL;
        AvFILLp(av) = have - 2;
        SvREFCNT_dec(surplus);
    }
    if (want > AvMAX(av) + 1)
        av_extend(av, want - 1);
    for (i = 0; i < want; i++) {
        pagi_str name = m->headers[2 * i], value = m->headers[2 * i + 1];
        if (i < have) {
            AV *pair = (AV *)SvRV(AvARRAY(av)[i]);
            interned_into(aTHX_ L, INTERNED_NAMES, name, AvARRAY(pair)[0]);
            interned_into(aTHX_ L, INTERNED_VALUES, value, AvARRAY(pair)[1]);
        } else {
            AvARRAY(av)[i] = pair_ref(aTHX_ interned_sv(aTHX_ L, INTERNED_NAMES, name),
                                      interned_sv(aTHX_ L, INTERNED_VALUES, value));
            AvFILLp(av) = i;
        }
    }
}

/* [host, port] under key k, into the pair a kept scope kept, or new. */
static void store_host_port(pTHX_ HV *scope, interp_lookups *L, int k, pagi_str host, int64_t port)
{
    SV *kept = scope_kept_value(aTHX_ scope, L, k);
    AV *pair;
    SV *old_port;
    if (!kept) {
        scope_store(aTHX_ scope, L, k, host_port(aTHX_ L, host, port));
        return;
    }
    pair = (AV *)SvRV(kept);
    interned_into(aTHX_ L, INTERNED_NAMES, host, AvARRAY(pair)[0]);
    old_port = AvARRAY(pair)[1];
    if (port >= 0 && SvTYPE(old_port) == SVt_IV) {
        sv_setiv(old_port, (IV)port);
    } else if (port >= 0 || SvTYPE(old_port) != SVt_NULL) {
        AvARRAY(pair)[1] = port < 0 ? newSV(0) : newSViv((IV)port);
        SvREFCNT_dec(old_port);
    }
}

/* The http scope hash for a REQUEST message (see Spec/Www.pod).  Built here
 * rather than in Perl because it is on every request's path; the Perl side
 * adds the pagi.connection and pagi.transport objects.  String order is
 * fixed by exports.rs. */
static SV *undef_or_str(pTHX_ pagi_str s, int utf8)
{
    return s.ptr ? bytes_sv(aTHX_ s, utf8) : newSV(0);
}

static SV *undef_or_number(pTHX_ int32_t n)
{
    return n < 0 ? newSV(0) : newSViv((IV)n);
}

/* The tls extension: only on TLS connections, every key present. */
static SV *tls_extension(pTHX_ const pagi_tls *t)
{
    HV *tls = newHV();
    AV *chain = newAV();
    size_t i;
    av_extend(chain, (SSize_t)t->nclient_cert_chain);
    for (i = 0; i < t->nclient_cert_chain; i++)
        av_push(chain, bytes_sv(aTHX_ t->client_cert_chain[i], 0));
    (void)hv_stores(tls, "server_cert", undef_or_str(aTHX_ t->server_cert, 0));
    (void)hv_stores(tls, "client_cert_chain", newRV_noinc((SV *)chain));
    (void)hv_stores(tls, "client_cert_name", undef_or_str(aTHX_ t->client_cert_name, 1));
    /* A client certificate that does not verify fails the handshake
     * (tls.rs), so no connection ever carries a verification error. */
    (void)hv_stores(tls, "client_cert_error", newSV(0));
    (void)hv_stores(tls, "tls_version", undef_or_number(aTHX_ t->tls_version));
    (void)hv_stores(tls, "cipher_suite", undef_or_number(aTHX_ t->cipher_suite));
    return newRV_noinc((SV *)tls);
}

static SV *request_scope(pTHX_ interp_lookups *L, const pagi_msg *m, int kind)
{
    SV *rv;
    HV *scope = spare_scope_take(aTHX_ L, &rv);
    HV *pagi = scope ? scope_kept_nested(aTHX_ scope, L, K_PAGI) : NULL;
    HV *ext = scope ? scope_kept_nested(aTHX_ scope, L, K_EXTENSIONS) : NULL;
    HV *state = GvHVn(L->state_gv);
    int new_pagi = !pagi, new_ext = !ext;
    if (!scope) {
        scope = newHV();
        /* Sized for its 16 keys up front: growing splits the table twice. */
        hv_ksplit(scope, 32);
        rv = newRV_noinc((SV *)scope);
    }
    if (new_pagi)
        pagi = newHV();
    if (new_ext)
        ext = newHV();
    scope_store_kept_copy(aTHX_ pagi, L, K_VERSION, L->core_version);
    scope_store_kept_copy(aTHX_ pagi, L, K_SPEC_VERSION, L->www_version);
    switch (kind) {
    case SCOPE_SSE:
        scope_store_interned(aTHX_ scope, L, K_TYPE, PAGI_STR("sse"));
        scope_forget(aTHX_ ext, L, K_FULLFLUSH); /* a kept http scope's */
        break;
    case SCOPE_WEBSOCKET:
        scope_store_interned(aTHX_ scope, L, K_TYPE, PAGI_STR("websocket"));
        scope_forget(aTHX_ ext, L, K_FULLFLUSH);
        /* Gone in Www 0.6: refusals are ordinary http.response.* events. */
        if (L->legacy_www)
            (void)hv_stores(ext, "websocket.http.response", newRV_noinc((SV *)newHV()));
        break;
    default:
        scope_store_interned(aTHX_ scope, L, K_TYPE, PAGI_STR("http"));
        if (!scope_keeps_empty_hash(aTHX_ ext, L, K_FULLFLUSH))
            scope_store(aTHX_ ext, L, K_FULLFLUSH, newRV_noinc((SV *)newHV()));
    }
    if (m->tls)
        (void)hv_stores(ext, "tls", tls_extension(aTHX_ m->tls));
    if (new_pagi)
        scope_store(aTHX_ scope, L, K_PAGI, newRV_noinc((SV *)pagi));
    /* The fields whose values repeat are interned (interned.c); the path
     * and the query string seldom do, and would only push the others out. */
    scope_store_interned(aTHX_ scope, L, K_HTTP_VERSION, m->str[0]);
    scope_store_interned(aTHX_ scope, L, K_METHOD, m->str[1]);
    scope_store_interned(aTHX_ scope, L, K_SCHEME, m->str[2]);
    scope_store_bytes(aTHX_ scope, L, K_PATH, m->str[3], (m->utf8_mask >> 3) & 1);
    scope_store_bytes(aTHX_ scope, L, K_RAW_PATH, m->str[4], 0);
    scope_store_bytes(aTHX_ scope, L, K_QUERY_STRING, m->str[5], 0);
    if ((m->utf8_mask >> 6) & 1)
        scope_store_bytes(aTHX_ scope, L, K_ROOT_PATH, m->str[6], 1);
    else
        scope_store_interned(aTHX_ scope, L, K_ROOT_PATH, m->str[6]);
    store_headers(aTHX_ scope, L, m);
    /* No client host: a Unix socket's peer has no address, and the key is
     * left out (Www: client is optional), as the reference server does. */
    if (m->str[7].ptr)
        store_host_port(aTHX_ scope, L, K_CLIENT, m->str[7], m->num[0]);
    else
        scope_forget(aTHX_ scope, L, K_CLIENT); /* a kept scope's */
    store_host_port(aTHX_ scope, L, K_SERVER, m->str[8], m->num[1]);
    /* A shallow copy: top-level keys private to the request, values shared.
     * An empty state's kept empty copy will do. */
    if (HvTOTALKEYS(state) || !scope_keeps_empty_hash(aTHX_ scope, L, K_STATE))
        scope_store(aTHX_ scope, L, K_STATE, newRV_noinc((SV *)newHVhv(state)));
    if (new_ext)
        scope_store(aTHX_ scope, L, K_EXTENSIONS, newRV_noinc((SV *)ext));
    return rv;
}

/* Everything a request needs before the app runs, built here since every
 * request pays for it: the request object (also the scope's pagi.connection
 * and pagi.transport; returned), its entry in %PAGI::RS::Bridge::REQUESTS,
 * the scope and $send. */
static SV *new_request(pTHX_ interp_lookups *L, const pagi_msg *m, int kind, SV **scope, SV **send)
{
    /* Every slot allocated up front and empty (the Perl half fills the
     * others as the request goes); the first three stored in place. */
    AV *req = newAV_alloc_xz(SLOT_COUNT);
    SV *self;
    HV *scope_hv;
    char buf[REGISTRY_KEY_SIZE];
    const char *key;
    int klen;
    AvARRAY(req)[SLOT_ID] = newSVuv((UV)m->id);
    AvARRAY(req)[SLOT_CONNECTED] = newSViv(1);
    AvARRAY(req)[SLOT_BODY] = newSViv((IV)m->num[2]);
    AvFILLp(req) = MAX(SLOT_ID, MAX(SLOT_CONNECTED, SLOT_BODY));
    self = newRV_noinc((SV *)req);
    sv_bless(self, kind == SCOPE_HTTP        ? L->http_stash
                   : kind == SCOPE_SSE       ? L->sse_stash
                                             : L->ws_stash);
    klen = registry_key(buf, m->id, &key);
    (void)hv_store(GvHVn(L->requests_gv), key, klen, newRV_inc((SV *)req), 0);
    *scope = request_scope(aTHX_ L, m, kind);
    scope_hv = (HV *)SvRV(*scope);
    scope_store(aTHX_ scope_hv, L, K_CONNECTION, newRV_inc((SV *)req));
    scope_store(aTHX_ scope_hv, L, K_TRANSPORT, newRV_inc((SV *)req));
    *send = new_sender(aTHX_ req);
    return self;
}

/* _next() runs the application of each new http request itself
 * (http_app.c), and returns the next other message as a list:
 *   STREAM_REQUEST (sse, websocket): (kind, $request, \%scope, $send)
 *   others:  (kind, id, num0, num1, num2, num3, headers_or_undef, strings...)
 * or nothing once the inbox is empty. */

/* A DRAINED message for an http request with no on_drain callbacks:
 * Transport.pm's _on_drained, here instead of through Bridge.pm's dispatch
 * (about 50 Perl ops per drain; a streamed response has one per body send
 * that waited).  Returns 0 when it must go to Perl: another scope type,
 * on_drain callbacks, or a wait that is not a plain pending Future. */
static int settle_drain(pTHX_ interp_lookups *L, const pagi_msg *m)
{
    char buf[REGISTRY_KEY_SIZE];
    const char *key;
    int klen = registry_key(buf, m->id, &key);
    SV **entry = hv_fetch(GvHVn(L->requests_gv), key, klen, 0);
    AV *req;
    SV *wait, **busy, **ready;
    if (!entry)
        return 1; /* Perl forgot the request: nothing waits. */
    if (!SvROK(*entry) || SvTYPE(SvRV(*entry)) != SVt_PVAV || SvSTASH(SvRV(*entry)) != L->http_stash)
        return 0;
    req = (AV *)SvRV(*entry);
    if (slot_true(aTHX_ req, SLOT_ON_DRAIN))
        return 0;
    if (!m->num[0] || !slot_defined(aTHX_ req, SLOT_SEND_WAIT))
        return 1; /* News for on_drain only, and there is none. */
    wait = *request_slot(aTHX_ req, SLOT_SEND_WAIT);
    if (!SvROK(wait) || SvTYPE(SvRV(wait)) != SVt_PVHV)
        return 0;
    /* Own it before the slots let go: resolving it may free the request. */
    wait = sv_2mortal(newSVsv(wait));
    av_store(req, SLOT_SEND_WAIT, newSV(0));
    busy = request_slot(aTHX_ req, SLOT_SEND_BUSY);
    if (busy && SvROK(*busy) && SvRV(*busy) == SvRV(wait))
        av_store(req, SLOT_SEND_BUSY, newSV(0));
    ready = hv_fetchs((HV *)SvRV(wait), "ready", 0);
    if (!ready || !SvTRUE(*ready)) {
        dSP;
        PUSHMARK(SP);
        XPUSHs(wait);
        PUTBACK;
        call_method("done", G_DISCARD | G_VOID);
    }
    return 1;
}

/* The pending Future in `slot` of `req`: 1 with *wait set when it is a
 * plain pending one (a hash whose `ready` is false), 1 with *wait NULL when
 * the slot holds nothing pending, 0 when it holds something C does not
 * know (Perl's half decides). */
int pending_in_slot(pTHX_ AV *req, SSize_t slot, SV **wait)
{
    SV **v = av_fetch(req, slot, 0);
    SV **ready;
    *wait = NULL;
    if (!v || !SvOK(*v))
        return 1;
    if (!SvROK(*v) || SvTYPE(SvRV(*v)) != SVt_PVHV)
        return 0;
    ready = hv_fetchs((HV *)SvRV(*v), "ready", 0);
    if (!ready || !SvTRUE(*ready))
        *wait = *v;
    return 1;
}

/* What a receive returns when nothing is queued for it: a new pending
 * Future, left in the request's RECV_WAIT slot for the next event to
 * resolve.  NULL when Perl decides: a receive already waits there, the
 * slot holds what C does not know, or only Perl may make Futures now. */
SV *pending_receive(pTHX_ AV *req)
{
    SV *wait, *f;
    /* With one already waiting, this receive must get the event after
     * that one's: Pending.pm's after. */
    if (!pending_in_slot(aTHX_ req, SLOT_RECV_WAIT, &wait) || wait)
        return NULL;
    if (!(f = pending_new_on_bridge_loop(aTHX)))
        return NULL;
    av_store(req, SLOT_RECV_WAIT, newSVsv(f));
    return f;
}

/* Resolve `wait`, the pending Future in the request's RECV_WAIT slot, with
 * the event `evref`, emptying the slot first. */
void resolve_receive(pTHX_ AV *req, SV *wait, SV *evref)
{
    dSP;
    /* Own it before the slot lets go: resolving it may free the request. */
    wait = sv_2mortal(newSVsv(wait));
    av_store(req, SLOT_RECV_WAIT, newSV(0));
    PUSHMARK(SP);
    EXTEND(SP, 2);
    PUSHs(wait);
    PUSHs(evref);
    PUTBACK;
    call_method("done", G_DISCARD | G_VOID);
}

/* A BODY message for an http request: HTTP.pm's _on_body, here instead of
 * through Bridge.pm's dispatch (about 60 Perl ops per request-body
 * chunk).  The chunk resolves the receive waiting for it, or is queued for
 * the next one.  Returns 0 when it must go to Perl. */
static int deliver_body(pTHX_ interp_lookups *L, const pagi_msg *m)
{
    char buf[REGISTRY_KEY_SIZE];
    const char *key;
    int klen = registry_key(buf, m->id, &key);
    SV **entry = hv_fetch(GvHVn(L->requests_gv), key, klen, 0);
    int more = m->num[0] != 0;
    AV *req;
    HV *ev;
    SV *evref, *wait, **queue;
    if (!entry)
        return 1; /* Perl forgot the request: nobody will read it. */
    if (!SvROK(*entry) || SvTYPE(SvRV(*entry)) != SVt_PVAV || SvSTASH(SvRV(*entry)) != L->http_stash)
        return 0;
    req = (AV *)SvRV(*entry);
    /* Sent before the response completed: no receive will report it. */
    if (slot_true(aTHX_ req, SLOT_COMPLETE))
        return 1;
    if (!pending_in_slot(aTHX_ req, SLOT_RECV_WAIT, &wait))
        return 0;
    queue = request_slot(aTHX_ req, SLOT_QUEUE);
    if (!wait && queue && SvOK(*queue) && !(SvROK(*queue) && SvTYPE(SvRV(*queue)) == SVt_PVAV))
        return 0;
    ev = newHV();
    (void)hv_stores(ev, "type", newSVpvs("http.request"));
    (void)hv_stores(ev, "body", body_sv(aTHX_ m));
    (void)hv_stores(ev, "more", newSViv(more));
    evref = sv_2mortal(newRV_noinc((SV *)ev));
    if (!more)
        av_store(req, SLOT_BODY, newSViv(BODY_DONE));
    if (wait) {
        if (more)
            pagi_rs_want_body(m->id);
        resolve_receive(aTHX_ req, wait, evref);
        return 1;
    }
    if (!queue || !SvOK(*queue))
        av_store(req, SLOT_QUEUE, newRV_noinc((SV *)newAV()));
    av_push((AV *)SvRV(*request_slot(aTHX_ req, SLOT_QUEUE)), newSVsv(evref));
    return 1;
}

XS(xs_next_message)
{
    dXSARGS;
    pagi_msg m;
    size_t i;
    PERL_UNUSED_VAR(items);
    SP -= items;
    for (;;) {
        interp_lookups *L;
        int kind;
        SV *self, *scope, *send;
        memset(&m, 0, sizeof m);
        if (!pagi_rs_next_message(&m)) {
            /* The batch is over: free what the network has finished with. */
            release_returned_loans(aTHX);
            XSRETURN_EMPTY;
        }
        turn_begins();
        L = the_lookups(aTHX);
        if (m.kind == PAGI_MSG_DRAINED || m.kind == PAGI_MSG_BODY || m.kind == PAGI_MSG_WS_RECEIVE) {
            /* The messages a streamed body brings per chunk, handled here
             * for http scopes, and a WebSocket message a receive waits
             * for; anything else goes to Bridge.pm. */
            int handled;
            ENTER;
            SAVETMPS;
            PUTBACK;
            handled = m.kind == PAGI_MSG_DRAINED ? settle_drain(aTHX_ L, &m)
                      : m.kind == PAGI_MSG_BODY  ? deliver_body(aTHX_ L, &m)
                                                 : deliver_ws_message(aTHX_ L, &m);
            SPAGAIN;
            FREETMPS;
            LEAVE;
            if (handled)
                continue;
            break;
        }
        if (m.kind != PAGI_MSG_REQUEST)
            break;
        kind = (int)m.num[3];
        self = new_request(aTHX_ L, &m, kind, &scope, &send);
        if (kind != SCOPE_HTTP) {
            /* sse and websocket requests start in Perl (SSE.pm, WebSocket.pm). */
            EXTEND(SP, 4);
            mPUSHi(PAGI_MSG_STREAM_REQUEST);
            mPUSHs(self);
            mPUSHs(scope);
            mPUSHs(send);
            PUTBACK;
            return;
        }
        /* A request's temporaries go with it, not with the batch; its
         * scope, once they are gone, to the next request if it can. */
        ENTER;
        spare_scope_retire_at_leave(aTHX_ scope);
        SAVETMPS;
        sv_2mortal(self);
        bound_xsub_retire_at_leave(aTHX_ send);
        PUTBACK;
        run_http_app(aTHX_ L, self, scope, send);
        SPAGAIN;
        FREETMPS;
        LEAVE;
    }
    EXTEND(SP, 9 + (SSize_t)m.nstr);
    mPUSHi(m.kind);
    mPUSHu((UV)m.id);
    for (i = 0; i < 4; i++)
        mPUSHi((IV)m.num[i]);
    if (m.has_headers)
        mPUSHs(headers_av(aTHX_ the_lookups(aTHX), &m));
    else
        PUSHs(&PL_sv_undef);
    if (m.kind == PAGI_MSG_BODY)
        mPUSHs(body_sv(aTHX_ & m));
    for (i = 0; i < m.nstr; i++) {
        if (m.str[i].ptr == NULL)
            PUSHs(&PL_sv_undef);
        else
            mPUSHs(bytes_sv(aTHX_ m.str[i], (m.utf8_mask >> i) & 1));
    }
    PUTBACK;
}

XS(xs_wake_ack)
{
    dXSARGS;
    PERL_UNUSED_VAR(items);
    adopt_signal_handlers(aTHX);
    XSRETURN_IV(pagi_rs_wake_ack());
}
