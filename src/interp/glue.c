/*
 * The thin C layer between the Rust core and the embedded Perl interpreter.
 *
 * Perl's API is mostly macros (dSP, ENTER/LEAVE, XPUSHs, ERRSV ...), which Rust
 * cannot call directly, so everything that touches Perl data structures lives
 * here.  The layer holds no policy: each XS function converts its Perl
 * arguments into plain C values, then calls one `pagi_rs_*` function exported by
 * Rust (src/interp/exports.rs).  Rules that keep the two unwinding models apart:
 *
 *   - every entry from Rust into Perl goes through call_sv/eval with G_EVAL, so a
 *     Perl `die` never longjmps across Rust frames;
 *   - an XS function does everything that can croak *before* it calls Rust, and
 *     Rust never calls back into Perl from those exports;
 *   - $@ is localised around our own evals so the application's $@ survives.
 */
#define PERL_NO_GET_CONTEXT
#include <EXTERN.h>
#include <perl.h>
#include <XSUB.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    const char *ptr;
    size_t len;
} pagi_str;

/* A message from the network core, filled in by Rust; see exports.rs. */
typedef struct {
    int kind;
    uint64_t id;
    int64_t num[4];
    pagi_str str[12];
    size_t nstr;
    uint32_t utf8_mask;    /* bit i set: str[i] is UTF-8 text, not bytes */
    const pagi_str *headers; /* 2 * nheaders entries: name, value, ... */
    size_t nheaders;
    int has_headers;
} pagi_msg;

/* Slots of the per-request object, PAGI::RS::HTTP (the layout belongs to
 * perl/PAGI/RS/Connection.pm and HTTP.pm; keep these in step). */
#define SLOT_ID 0
#define SLOT_CONNECTED 1
#define SLOT_STARTED 3
#define SLOT_COMPLETE 4
#define SLOT_WANTS_END 17
#define SLOT_RECV_WAIT 19
#define SLOT_BODY 22
#define SLOT_TRAILERS 26
#define SLOT_COUNT 32

static SV *new_sender(pTHX_ AV *req);
static pagi_str text_arg(pTHX_ SV *sv, int *has);

/* SSE.pm's slot for the stream's state, and its "streaming" value. */
#define SLOT_SSE_STREAM 28
#define SSE_STREAMING 1

/* Scope kinds (ScopeKind in scope.rs). */
#define SCOPE_HTTP 0
#define SCOPE_SSE 1
#define SCOPE_WEBSOCKET 2

/* Implemented in Rust (src/interp/exports.rs). */
extern int pagi_rs_next_message(pagi_msg *out);
extern int pagi_rs_wake_ack(void);
extern int pagi_rs_response_start(uint64_t id, int64_t status, const pagi_str *hdrs, size_t nhdrs,
                                  int trailers, pagi_str *err);
extern int pagi_rs_response_body(uint64_t id, const char *ptr, size_t len, int more, pagi_str *err);
extern int pagi_rs_response_file(uint64_t id, const char *path, size_t plen, int64_t offset,
                                 int64_t length, pagi_str *err);
extern int pagi_rs_response_fd(uint64_t id, int fd, int64_t offset, int64_t length, pagi_str *err);
extern int pagi_rs_response_trailers(uint64_t id, const pagi_str *hdrs, size_t nhdrs, pagi_str *err);
extern int pagi_rs_fullflush(uint64_t id, pagi_str *err);
extern void pagi_rs_want_body(uint64_t id);
extern int pagi_rs_finish(uint64_t id, const char *err, size_t errlen, int has_err, int interested);
extern void pagi_rs_release(uint64_t id);
extern int64_t pagi_rs_query(uint64_t id, int what);
extern int pagi_rs_lifespan_event(int kind, const char *msg, size_t len);
extern void pagi_rs_log(int level, const char *msg, size_t len);
extern int pagi_rs_embedded_source(const char *name, size_t len, pagi_str *out);
extern int pagi_rs_sse_start(uint64_t id, int64_t status, const pagi_str *hdrs, size_t nhdrs,
                             pagi_str *err);
extern int pagi_rs_sse_event(uint64_t id, const char *ev, size_t evlen, int has_ev, const char *data,
                             size_t dlen, const char *eid, size_t eidlen, int has_eid, int64_t retry,
                             pagi_str *err);
extern int pagi_rs_sse_comment(uint64_t id, const char *ptr, size_t len, pagi_str *err);
extern int pagi_rs_sse_keepalive(uint64_t id, int64_t interval_ms, const char *ptr, size_t len);
extern int pagi_rs_sse_close(uint64_t id, const char *ptr, size_t len, int has, pagi_str *err);
extern int pagi_rs_ws_accept(uint64_t id, const char *sub, size_t sublen, int has_sub,
                             const pagi_str *hdrs, size_t nhdrs, pagi_str *err);
extern int pagi_rs_ws_send(uint64_t id, int text, const char *ptr, size_t len, pagi_str *err);
extern int pagi_rs_ws_close(uint64_t id, int64_t code, const char *ptr, size_t len, pagi_str *err);
extern int pagi_rs_ws_keepalive(uint64_t id, int64_t interval_ms, int64_t timeout_ms, pagi_str *err);
extern void pagi_rs_ws_overflow(uint64_t id, int64_t limit, int in_bytes);
extern int pagi_rs_end_state(uint64_t id, pagi_msg *out);
extern int pagi_rs_abort(uint64_t id, const char *detail, size_t len, int has);
extern int pagi_rs_ws_finish(uint64_t id, const char *err, size_t len, int has_err);

EXTERN_C void boot_DynaLoader(pTHX_ CV *cv);

/* ---- helpers ------------------------------------------------------------ */

/* Bytes of an SV without touching the caller's scalar.  SvPVbyte would
 * downgrade the application's own string in place; a string holding wide
 * characters cannot be bytes at all, and we report that instead of croaking. */
static int sv_to_bytes(pTHX_ SV *sv, pagi_str *out)
{
    STRLEN len;
    const char *p;
    if (!SvOK(sv)) {
        out->ptr = "";
        out->len = 0;
        return 1;
    }
    if (SvUTF8(sv)) {
        SV *copy = sv_2mortal(newSVsv(sv));
        if (!sv_utf8_downgrade(copy, TRUE))
            return 0;
        p = SvPV(copy, len);
    } else {
        p = SvPV(sv, len);
    }
    out->ptr = p;
    out->len = len;
    return 1;
}

static SV *bytes_sv(pTHX_ pagi_str s, int utf8)
{
    SV *sv = newSVpvn(s.ptr ? s.ptr : "", s.len);
    if (utf8)
        SvUTF8_on(sv);
    return sv;
}

/* Flatten [[name, value], ...] into 2n pagi_str entries held in a mortal buffer.
 * Returns NULL and sets *why on a malformed list. */
static pagi_str *headers_from_sv(pTHX_ SV *sv, size_t *n_out, const char **why)
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

/* XS functions return either (code) or (code, message); a negative code means
 * the send failed and the message says why. */
#define PUSH_RESULT(rc, err)                                                   \
    do {                                                                       \
        XPUSHs(sv_2mortal(newSViv(rc)));                                       \
        if ((rc) < 0)                                                          \
            XPUSHs(sv_2mortal(newSVpvn((err).ptr ? (err).ptr : "", (err).len))); \
    } while (0)

/* ---- XS functions ------------------------------------------------------- */

static SV *headers_av(pTHX_ const pagi_msg *m)
{
    AV *av = newAV();
    size_t i;
    av_extend(av, (SSize_t)m->nheaders);
    for (i = 0; i < m->nheaders; i++) {
        AV *pair = newAV();
        av_extend(pair, 1);
        av_push(pair, bytes_sv(aTHX_ m->headers[2 * i], 0));
        av_push(pair, bytes_sv(aTHX_ m->headers[2 * i + 1], 0));
        av_push(av, newRV_noinc((SV *)pair));
    }
    return newRV_noinc((SV *)av);
}

static SV *host_port(pTHX_ pagi_str host, int64_t port)
{
    AV *av = newAV();
    av_extend(av, 1);
    av_push(av, bytes_sv(aTHX_ host, 0));
    av_push(av, newSViv((IV)port));
    return newRV_noinc((SV *)av);
}


/* ---- per-interpreter lookups ---------------------------------------------
 * Names used on every request: package variables and hash keys.  Looking a
 * package variable up by name, or hashing a constant key, costs a hash
 * lookup each time; these are resolved once.  Each interpreter runs on its
 * own thread for its whole life, so a thread-local cache is a
 * per-interpreter cache.  The keys are shared-HEK strings, so stores and
 * fetches with them reuse the precomputed hash and skip the string table. */
enum {
    K_TYPE, K_PAGI, K_VERSION, K_SPEC_VERSION, K_FULLFLUSH, K_HTTP_VERSION,
    K_METHOD, K_SCHEME, K_PATH, K_RAW_PATH, K_QUERY_STRING, K_ROOT_PATH,
    K_HEADERS, K_CLIENT, K_SERVER, K_STATE, K_EXTENSIONS, K_CONNECTION,
    K_TRANSPORT, K_BODY, K_MORE, K_FILE, K_FH, K_STATUS, K_TRAILERS,
    K_DATA, K_EVENT, K_ID, K_RETRY, K_TEXT, K_BYTES,
    K_COUNT
};

static const char *const key_names[K_COUNT] = {
    "type", "pagi", "version", "spec_version", "fullflush", "http_version",
    "method", "scheme", "path", "raw_path", "query_string", "root_path",
    "headers", "client", "server", "state", "extensions", "pagi.connection",
    "pagi.transport", "body", "more", "file", "fh", "status", "trailers",
    "data", "event", "id", "retry", "text", "bytes",
};

typedef struct {
    PerlInterpreter *owner;
    SV *core_version; /* $PAGI::RS::Bridge::CORE_VERSION, e.g. "0.5" */
    SV *www_version;  /* $PAGI::RS::Bridge::SPEC_VERSION, e.g. "0.6" */
    int legacy_www;   /* Www 0.3: the websocket.http.response extension */
    GV *state_gv;    /* %PAGI::RS::Bridge::STATE */
    GV *requests_gv; /* %PAGI::RS::Bridge::REQUESTS */
    GV *done_gv;     /* $PAGI::RS::HTTP::DONE */
    HV *http_stash;  /* PAGI::RS::HTTP */
    HV *sse_stash;   /* PAGI::RS::SSE */
    HV *ws_stash;    /* PAGI::RS::WebSocket */
    SV *keys[K_COUNT];
} interp_lookups;

static __thread interp_lookups lookups;

static interp_lookups *the_lookups(pTHX)
{
    size_t i;
    if (lookups.owner == aTHX)
        return &lookups;
    /* GVs rather than their HV/SV: `local %STATE` swaps the slot, not the glob. */
    lookups.state_gv = gv_fetchpvs("PAGI::RS::Bridge::STATE", GV_ADD, SVt_PVHV);
    lookups.requests_gv = gv_fetchpvs("PAGI::RS::Bridge::REQUESTS", GV_ADD, SVt_PVHV);
    lookups.done_gv = gv_fetchpvs("PAGI::RS::HTTP::DONE", GV_ADD, SVt_PV);
    lookups.http_stash = gv_stashpvs("PAGI::RS::HTTP", GV_ADD);
    lookups.sse_stash = gv_stashpvs("PAGI::RS::SSE", GV_ADD);
    lookups.ws_stash = gv_stashpvs("PAGI::RS::WebSocket", GV_ADD);
    /* Set once by Bridge::init, before any request exists. */
    lookups.core_version = newSVsv(get_sv("PAGI::RS::Bridge::CORE_VERSION", GV_ADD));
    lookups.www_version = newSVsv(get_sv("PAGI::RS::Bridge::SPEC_VERSION", GV_ADD));
    lookups.legacy_www = strEQ(SvPV_nolen(lookups.www_version), "0.3");
    for (i = 0; i < K_COUNT; i++)
        lookups.keys[i] = newSVpvn_share(key_names[i], (I32)strlen(key_names[i]), 0);
    lookups.owner = aTHX;
    return &lookups;
}

#define KEY(L, k) ((L)->keys[k])
#define STORE(hv, L, k, val) ((void)hv_store_ent((hv), KEY(L, k), (val), 0))

/* The http scope hash for a REQUEST message (see Spec/Www.pod).  Built here
 * rather than in Perl because it is on every request's path; the Perl side
 * adds the pagi.connection and pagi.transport objects.  String order is
 * fixed by exports.rs. */
static SV *request_scope(pTHX_ interp_lookups *L, const pagi_msg *m, int kind)
{
    HV *scope = newHV();
    HV *pagi = newHV();
    HV *ext = newHV();
    HV *state = GvHVn(L->state_gv);
    /* Sized for its ~20 keys up front: growing splits the table twice. */
    hv_ksplit(scope, 32);
    STORE(pagi, L, K_VERSION, newSVsv(L->core_version));
    STORE(pagi, L, K_SPEC_VERSION, newSVsv(L->www_version));
    switch (kind) {
    case SCOPE_SSE:
        STORE(scope, L, K_TYPE, newSVpvs("sse"));
        break;
    case SCOPE_WEBSOCKET:
        STORE(scope, L, K_TYPE, newSVpvs("websocket"));
        /* Gone in Www 0.6: refusals are ordinary http.response.* events. */
        if (L->legacy_www)
            (void)hv_stores(ext, "websocket.http.response", newRV_noinc((SV *)newHV()));
        break;
    default:
        STORE(scope, L, K_TYPE, newSVpvs("http"));
        STORE(ext, L, K_FULLFLUSH, newRV_noinc((SV *)newHV()));
    }
    STORE(scope, L, K_PAGI, newRV_noinc((SV *)pagi));
    STORE(scope, L, K_HTTP_VERSION, bytes_sv(aTHX_ m->str[0], 0));
    STORE(scope, L, K_METHOD, bytes_sv(aTHX_ m->str[1], 0));
    STORE(scope, L, K_SCHEME, bytes_sv(aTHX_ m->str[2], 0));
    STORE(scope, L, K_PATH, bytes_sv(aTHX_ m->str[3], (m->utf8_mask >> 3) & 1));
    STORE(scope, L, K_RAW_PATH, bytes_sv(aTHX_ m->str[4], 0));
    STORE(scope, L, K_QUERY_STRING, bytes_sv(aTHX_ m->str[5], 0));
    STORE(scope, L, K_ROOT_PATH, bytes_sv(aTHX_ m->str[6], (m->utf8_mask >> 6) & 1));
    STORE(scope, L, K_HEADERS, headers_av(aTHX_ m));
    STORE(scope, L, K_CLIENT, host_port(aTHX_ m->str[7], m->num[0]));
    STORE(scope, L, K_SERVER, host_port(aTHX_ m->str[8], m->num[1]));
    /* A shallow copy: top-level keys private to the request, values shared. */
    STORE(scope, L, K_STATE, newRV_noinc((SV *)newHVhv(state)));
    STORE(scope, L, K_EXTENSIONS, newRV_noinc((SV *)ext));
    return newRV_noinc((SV *)scope);
}

/* Writes `n` in decimal at the end of buf; returns the digit count.  The
 * request registry is keyed this way, as Perl stringifies the id. */
static int decimal(char *buf, size_t size, uint64_t n)
{
    int len = 0;
    do {
        buf[size - 1 - (size_t)len++] = (char)('0' + n % 10);
        n /= 10;
    } while (n);
    return len;
}

/* _next() returns the next message as a list:
 *   REQUEST: (kind, $request, \%scope, $send)
 *   others:  (kind, id, num0, num1, num2, num3, headers_or_undef, strings...) */
#define PAGI_MSG_REQUEST 1
#define PAGI_MSG_STREAM_REQUEST 12 /* MSG_STREAM_REQUEST in Bridge.pm */

XS(xs_next_message)
{
    dXSARGS;
    pagi_msg m;
    size_t i;
    PERL_UNUSED_VAR(items);
    SP -= items;
    memset(&m, 0, sizeof m);
    if (!pagi_rs_next_message(&m))
        XSRETURN_EMPTY;
    if (m.kind == PAGI_MSG_REQUEST) {
        /* Everything a request needs before the app runs, built here since
         * every request pays for it: the request object (also the scope's
         * pagi.connection and pagi.transport), its entry in
         * %PAGI::RS::Bridge::REQUESTS, the scope, and $send. */
        interp_lookups *L = the_lookups(aTHX);
        int kind = (int)m.num[3];
        AV *req = newAV();
        SV *self, *scope;
        HV *scope_hv, *requests;
        char key[24];
        int klen;
        av_extend(req, SLOT_COUNT);
        av_store(req, SLOT_ID, newSVuv((UV)m.id));
        av_store(req, SLOT_CONNECTED, newSViv(1));
        av_store(req, SLOT_BODY, newSViv((IV)m.num[2]));
        self = newRV_noinc((SV *)req);
        sv_bless(self, kind == SCOPE_HTTP        ? L->http_stash
                       : kind == SCOPE_SSE       ? L->sse_stash
                                                 : L->ws_stash);
        requests = GvHVn(L->requests_gv);
        klen = decimal(key, sizeof key, m.id);
        (void)hv_store(requests, key + sizeof key - klen, klen, newRV_inc((SV *)req), 0);
        scope = request_scope(aTHX_ L, &m, kind);
        scope_hv = (HV *)SvRV(scope);
        STORE(scope_hv, L, K_CONNECTION, newRV_inc((SV *)req));
        STORE(scope_hv, L, K_TRANSPORT, newRV_inc((SV *)req));
        EXTEND(SP, 4);
        /* sse and websocket requests come as their own kind, so that the
         * dispatch loop need not look at the object's class. */
        mPUSHi(kind == SCOPE_HTTP ? m.kind : PAGI_MSG_STREAM_REQUEST);
        mPUSHs(self);
        mPUSHs(scope);
        mPUSHs(new_sender(aTHX_ req));
        PUTBACK;
        return;
    }
    EXTEND(SP, 8 + (SSize_t)m.nstr);
    mPUSHi(m.kind);
    mPUSHu((UV)m.id);
    for (i = 0; i < 4; i++)
        mPUSHi((IV)m.num[i]);
    if (m.has_headers)
        mPUSHs(headers_av(aTHX_ & m));
    else
        PUSHs(&PL_sv_undef);
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
    XSRETURN_IV(pagi_rs_wake_ack());
}

/* _start($id, $status, $headers, $trailers) */
XS(xs_response_start)
{
    dXSARGS;
    uint64_t id;
    IV status;
    size_t n = 0;
    const char *why = NULL;
    pagi_str *hdrs;
    pagi_str err = {0, 0};
    int rc;
    if (items != 4)
        croak_xs_usage(cv, "id, status, headers, trailers");
    id = (uint64_t)SvUV(ST(0));
    if (!SvOK(ST(1)) || !looks_like_number(ST(1))) {
        SP -= items;
        err.ptr = "http.response.start requires a numeric 'status'";
        err.len = strlen(err.ptr);
        PUSH_RESULT(-1, err);
        PUTBACK;
        return;
    }
    status = SvIV(ST(1));
    hdrs = headers_from_sv(aTHX_ ST(2), &n, &why);
    SP -= items;
    if (!hdrs) {
        err.ptr = why;
        err.len = strlen(why);
        PUSH_RESULT(-1, err);
        PUTBACK;
        return;
    }
    rc = pagi_rs_response_start(id, (int64_t)status, hdrs, n, SvTRUE(ST(3)) ? 1 : 0, &err);
    PUSH_RESULT(rc, err);
    PUTBACK;
}

/* _body($id, $bytes, $more) */
XS(xs_response_body)
{
    dXSARGS;
    uint64_t id;
    pagi_str body;
    pagi_str err = {0, 0};
    int more, rc;
    if (items != 3)
        croak_xs_usage(cv, "id, body, more");
    id = (uint64_t)SvUV(ST(0));
    more = SvTRUE(ST(2)) ? 1 : 0;
    if (!sv_to_bytes(aTHX_ ST(1), &body)) {
        SP -= items;
        err.ptr = "body contains wide characters; PAGI bodies are bytes, encode it first "
                  "(e.g. Encode::encode_utf8)";
        err.len = strlen(err.ptr);
        PUSH_RESULT(-1, err);
        PUTBACK;
        return;
    }
    SP -= items;
    rc = pagi_rs_response_body(id, body.ptr, body.len, more, &err);
    PUSH_RESULT(rc, err);
    PUTBACK;
}

/* _file($id, $path, $offset, $length_or_-1) */
XS(xs_response_file)
{
    dXSARGS;
    uint64_t id;
    pagi_str path;
    pagi_str err = {0, 0};
    int64_t offset, length;
    int rc;
    if (items != 4)
        croak_xs_usage(cv, "id, path, offset, length");
    id = (uint64_t)SvUV(ST(0));
    offset = (int64_t)SvIV(ST(2));
    length = (int64_t)SvIV(ST(3));
    if (!sv_to_bytes(aTHX_ ST(1), &path)) {
        /* A path with wide characters: hand Perl's UTF-8 encoding to the OS,
         * which is what Perl's own open() does with such a name. */
        STRLEN len;
        path.ptr = SvPVutf8(sv_2mortal(newSVsv(ST(1))), len);
        path.len = len;
    }
    SP -= items;
    rc = pagi_rs_response_file(id, path.ptr, path.len, offset, length, &err);
    PUSH_RESULT(rc, err);
    PUTBACK;
}

/* _fd($id, $fd, $offset_or_-1, $length_or_-1) */
XS(xs_response_fd)
{
    dXSARGS;
    uint64_t id;
    pagi_str err = {0, 0};
    int rc;
    if (items != 4)
        croak_xs_usage(cv, "id, fd, offset, length");
    id = (uint64_t)SvUV(ST(0));
    {
        int fd = (int)SvIV(ST(1));
        int64_t offset = (int64_t)SvIV(ST(2));
        int64_t length = (int64_t)SvIV(ST(3));
        SP -= items;
        rc = pagi_rs_response_fd(id, fd, offset, length, &err);
    }
    PUSH_RESULT(rc, err);
    PUTBACK;
}

/* _trailers($id, $headers) */
XS(xs_response_trailers)
{
    dXSARGS;
    uint64_t id;
    size_t n = 0;
    const char *why = NULL;
    pagi_str *hdrs;
    pagi_str err = {0, 0};
    int rc;
    if (items != 2)
        croak_xs_usage(cv, "id, headers");
    id = (uint64_t)SvUV(ST(0));
    hdrs = headers_from_sv(aTHX_ ST(1), &n, &why);
    SP -= items;
    if (!hdrs) {
        err.ptr = why;
        err.len = strlen(why);
        PUSH_RESULT(-1, err);
        PUTBACK;
        return;
    }
    rc = pagi_rs_response_trailers(id, hdrs, n, &err);
    PUSH_RESULT(rc, err);
    PUTBACK;
}

/* What fast_send sent, for the caller's bookkeeping (mirrored in HTTP.pm). */
#define SEND_KIND_START 1
#define SEND_KIND_START_TRAILERS 2
#define SEND_KIND_BODY_MORE 3
#define SEND_KIND_BODY_END 4

static SV *hv_value(pTHX_ HV *hv, SV *key)
{
    HE *he = hv_fetch_ent(hv, key, 0, 0);
    return he ? HeVAL(he) : NULL;
}

/* Send an http.response.start or a byte body straight to the core.
 * Returns the core's code (>= 0) with *kind saying what was sent, -1 with
 * *err on failure, or -2 when the event needs the Perl path (anything else,
 * file/fh bodies, malformed or tied events). */
static int fast_send(pTHX_ uint64_t id, SV *ev_sv, int *kind, pagi_str *err)
{
    interp_lookups *L = the_lookups(aTHX);
    HV *ev;
    SV *type_sv;
    STRLEN tlen;
    const char *type;
    if (!SvROK(ev_sv) || SvTYPE(SvRV(ev_sv)) != SVt_PVHV || SvRMAGICAL(SvRV(ev_sv)))
        return -2;
    ev = (HV *)SvRV(ev_sv);
    type_sv = hv_value(aTHX_ ev, KEY(L, K_TYPE));
    if (!type_sv || !SvPOK(type_sv))
        return -2;
    type = SvPV(type_sv, tlen);
    if (tlen == 18 && memEQ(type, "http.response.body", 18)) {
        SV *body = hv_value(aTHX_ ev, KEY(L, K_BODY));
        SV *more = hv_value(aTHX_ ev, KEY(L, K_MORE));
        SV *file = hv_value(aTHX_ ev, KEY(L, K_FILE));
        SV *fh = hv_value(aTHX_ ev, KEY(L, K_FH));
        pagi_str b;
        int more_flag;
        if ((file && SvOK(file)) || (fh && SvOK(fh)))
            return -2;
        if (!sv_to_bytes(aTHX_ body ? body : &PL_sv_undef, &b))
            return -2; /* wide characters: the Perl path words the error */
        more_flag = more && SvTRUE(more) ? 1 : 0;
        *kind = more_flag ? SEND_KIND_BODY_MORE : SEND_KIND_BODY_END;
        return pagi_rs_response_body(id, b.ptr, b.len, more_flag, err);
    }
    if (tlen == 19 && memEQ(type, "http.response.start", 19)) {
        SV *status = hv_value(aTHX_ ev, KEY(L, K_STATUS));
        SV *hdrs = hv_value(aTHX_ ev, KEY(L, K_HEADERS));
        SV *trailers = hv_value(aTHX_ ev, KEY(L, K_TRAILERS));
        size_t n = 0;
        const char *why = NULL;
        pagi_str *pairs;
        int want_trailers;
        if (!status || !SvOK(status) || !looks_like_number(status))
            return -2;
        pairs = headers_from_sv(aTHX_ hdrs ? hdrs : &PL_sv_undef, &n, &why);
        if (!pairs)
            return -2;
        want_trailers = trailers && SvTRUE(trailers) ? 1 : 0;
        *kind = want_trailers ? SEND_KIND_START_TRAILERS : SEND_KIND_START;
        return pagi_rs_response_start(id, (int64_t)SvIV(status), pairs, n, want_trailers, err);
    }
    return -2;
}

/* sse.send straight to the core, for an SSE request that is streaming and
 * an event whose fields need no checks beyond these; anything else (and
 * every error message) is left to SSE.pm (-2). */
static int fast_sse_send(pTHX_ uint64_t id, AV *req, SV *ev_sv, int *kind, pagi_str *err)
{
    interp_lookups *L = the_lookups(aTHX);
    HV *ev;
    SV *type_sv, *data, *event, *eid, *retry, **state;
    STRLEN tlen;
    const char *type;
    pagi_str ev_s, data_s, eid_s;
    int has_ev, has_data, has_eid;
    int64_t retry_n = -1;
    if (!SvROK(ev_sv) || SvTYPE(SvRV(ev_sv)) != SVt_PVHV || SvRMAGICAL(SvRV(ev_sv)))
        return -2;
    state = av_fetch(req, SLOT_SSE_STREAM, 0);
    if (!state || !SvIOK(*state) || SvIV(*state) != SSE_STREAMING)
        return -2;
    ev = (HV *)SvRV(ev_sv);
    type_sv = hv_value(aTHX_ ev, KEY(L, K_TYPE));
    if (!type_sv || !SvPOK(type_sv))
        return -2;
    type = SvPV(type_sv, tlen);
    if (tlen != 8 || !memEQ(type, "sse.send", 8))
        return -2;
    data = hv_value(aTHX_ ev, KEY(L, K_DATA));
    event = hv_value(aTHX_ ev, KEY(L, K_EVENT));
    eid = hv_value(aTHX_ ev, KEY(L, K_ID));
    retry = hv_value(aTHX_ ev, KEY(L, K_RETRY));
    if (!data || !SvOK(data) || SvROK(data) || (event && SvROK(event)) || (eid && SvROK(eid)))
        return -2;
    if (retry && SvOK(retry)) {
        if (!SvIOK(retry) || SvIV(retry) < 0)
            return -2;
        retry_n = (int64_t)SvIV(retry);
    }
    ev_s = text_arg(aTHX_ event ? event : &PL_sv_undef, &has_ev);
    data_s = text_arg(aTHX_ data, &has_data);
    eid_s = text_arg(aTHX_ eid ? eid : &PL_sv_undef, &has_eid);
    *kind = SEND_KIND_BODY_MORE;
    return pagi_rs_sse_event(id, ev_s.ptr, ev_s.len, has_ev, data_s.ptr, data_s.len, eid_s.ptr,
                             eid_s.len, has_eid, retry_n, err);
}

/* websocket.send straight to the core: exactly one of text/bytes, plain
 * scalars.  Everything else, and every error message, is WebSocket.pm's. */
static int fast_ws_send(pTHX_ uint64_t id, SV *ev_sv, int *kind, pagi_str *err)
{
    interp_lookups *L = the_lookups(aTHX);
    HV *ev;
    SV *type_sv, *text, *bytes;
    STRLEN tlen;
    const char *type;
    pagi_str payload;
    int has;
    if (!SvROK(ev_sv) || SvTYPE(SvRV(ev_sv)) != SVt_PVHV || SvRMAGICAL(SvRV(ev_sv)))
        return -2;
    ev = (HV *)SvRV(ev_sv);
    type_sv = hv_value(aTHX_ ev, KEY(L, K_TYPE));
    if (!type_sv || !SvPOK(type_sv))
        return -2;
    type = SvPV(type_sv, tlen);
    if (tlen != 14 || !memEQ(type, "websocket.send", 14))
        return -2;
    text = hv_value(aTHX_ ev, KEY(L, K_TEXT));
    bytes = hv_value(aTHX_ ev, KEY(L, K_BYTES));
    if (text && !SvOK(text))
        text = NULL;
    if (bytes && !SvOK(bytes))
        bytes = NULL;
    if (!text == !bytes || (text && SvROK(text)) || (bytes && SvROK(bytes)))
        return -2;
    if (text) {
        payload = text_arg(aTHX_ text, &has);
    } else if (!sv_to_bytes(aTHX_ bytes, &payload)) {
        return -2;
    }
    *kind = SEND_KIND_BODY_MORE;
    return pagi_rs_ws_send(id, text ? 1 : 0, payload.ptr, payload.len, err);
}

/* ---- the application's $send ----------------------------------------------
 * An XS closure rather than a Perl one: it is called for every response
 * event, and the common case (start, or a body, an SSE event or a
 * WebSocket message that fits under the high-water mark) needs no Perl
 * code at all.  The request object it belongs
 * to hangs off the CV as magic; it updates that object's SLOT_* fields. */
#define CODE_SENT 0
#define CODE_CLOSED 3
/* Not a core code: CLOSED, news to the Perl side (HTTP.pm's CLOSED_UNSEEN). */
#define CODE_CLOSED_UNSEEN 5

static MGVTBL sender_vtbl; /* marks our magic; no callbacks */

static int slot_true(pTHX_ AV *req, SSize_t slot)
{
    SV **v = av_fetch(req, slot, 0);
    return v && SvTRUE(*v);
}

XS(xs_sender)
{
    dXSARGS;
    MAGIC *mg = mg_findext((SV *)cv, PERL_MAGIC_ext, &sender_vtbl);
    SV *self, *ev;
    AV *req;
    SV **idp;
    pagi_str err = {0, 0};
    int rc, kind = 0, handled = 0, is_http;
    interp_lookups *L = the_lookups(aTHX);
    HV *stash;
    if (!mg || !mg->mg_obj || !SvROK(mg->mg_obj))
        croak("pagi-rs: this send() no longer belongs to a request");
    self = mg->mg_obj;
    req = (AV *)SvRV(self);
    stash = SvSTASH((SV *)req);
    is_http = stash == L->http_stash;
    ev = items > 0 ? ST(0) : &PL_sv_undef;
    idp = av_fetch(req, SLOT_ID, 0);
    if (!idp)
        rc = -2;
    else if (is_http)
        rc = fast_send(aTHX_(uint64_t) SvUV(*idp), ev, &kind, &err);
    else if (stash == L->sse_stash)
        rc = fast_sse_send(aTHX_(uint64_t) SvUV(*idp), req, ev, &kind, &err);
    else
        rc = fast_ws_send(aTHX_(uint64_t) SvUV(*idp), ev, &kind, &err);
    /* A send the core answers "closed" while this object still believes
     * the scope open goes to Perl, which brings its facts up to date. */
    if (rc == CODE_CLOSED && slot_true(aTHX_ req, SLOT_CONNECTED))
        rc = CODE_CLOSED_UNSEEN;
    if (rc == CODE_SENT || rc == CODE_CLOSED) {
        switch (kind) {
        case SEND_KIND_START:
        case SEND_KIND_START_TRAILERS:
            if (rc == CODE_SENT) {
                av_store(req, SLOT_STARTED, newSViv(1));
                av_store(req, SLOT_TRAILERS, newSViv(kind == SEND_KIND_START_TRAILERS));
            }
            handled = 1;
            break;
        case SEND_KIND_BODY_MORE:
            handled = 1;
            break;
        case SEND_KIND_BODY_END:
            if (!is_http)
                break;
            if (rc == CODE_CLOSED || slot_true(aTHX_ req, SLOT_TRAILERS)) {
                handled = 1;
            } else if (!slot_true(aTHX_ req, SLOT_WANTS_END)) {
                /* The scope ends here; with someone waiting to hear it,
                 * HTTP.pm's _response_complete notifies them. */
                SV **wait = av_fetch(req, SLOT_RECV_WAIT, 0);
                if (!wait || !SvOK(*wait)) {
                    av_store(req, SLOT_COMPLETE, newSViv(1));
                    handled = 1;
                }
            }
            break;
        }
    }
    if (handled) {
        ST(0) = GvSVn(the_lookups(aTHX)->done_gv);
        XSRETURN(1);
    }
    /* Everything else (waits, errors, other events): the Perl side finishes
     * the job.  No G_EVAL: its exceptions belong to the application. */
    {
        int count;
        SV *ret;
        PUSHMARK(SP);
        EXTEND(SP, 4);
        PUSHs(self);
        PUSHs(ev);
        mPUSHi(rc);
        if (rc == -1)
            mPUSHs(newSVpvn(err.ptr ? err.ptr : "", err.len));
        else
            mPUSHi(kind);
        PUTBACK;
        count = call_pv(is_http                 ? "PAGI::RS::HTTP::_after_send"
                        : stash == L->sse_stash ? "PAGI::RS::SSE::_after_send"
                                                : "PAGI::RS::WebSocket::_after_send",
                        G_SCALAR);
        SPAGAIN;
        ret = count > 0 ? POPs : &PL_sv_undef;
        PUTBACK;
        ST(0) = ret;
        XSRETURN(1);
    }
}

/* The coderef the application gets as $send, bound to request `req`. */
static SV *new_sender(pTHX_ AV *req)
{
    CV *sender = newXS_flags(NULL, xs_sender, __FILE__, NULL, 0);
    SV *self = sv_2mortal(newRV_inc((SV *)req));
    /* The magic holds its own reference to the request (MGf_REFCOUNTED). */
    sv_magicext((SV *)sender, self, PERL_MAGIC_ext, &sender_vtbl, NULL, 0);
    return newRV_noinc((SV *)sender);
}

XS(xs_fullflush)
{
    dXSARGS;
    pagi_str err = {0, 0};
    int rc;
    if (items != 1)
        croak_xs_usage(cv, "id");
    {
        uint64_t id = (uint64_t)SvUV(ST(0));
        SP -= items;
        rc = pagi_rs_fullflush(id, &err);
    }
    PUSH_RESULT(rc, err);
    PUTBACK;
}

XS(xs_want_body)
{
    dXSARGS;
    if (items != 1)
        croak_xs_usage(cv, "id");
    pagi_rs_want_body((uint64_t)SvUV(ST(0)));
    XSRETURN_EMPTY;
}

/* _finish($id, $error_or_undef, $interested) */
XS(xs_finish)
{
    dXSARGS;
    uint64_t id;
    pagi_str e = {0, 0};
    int has_err, interested, rc;
    if (items != 3)
        croak_xs_usage(cv, "id, error, interested");
    id = (uint64_t)SvUV(ST(0));
    /* Errors are text; send Perl's UTF-8 form so nothing croaks. */
    e = text_arg(aTHX_ ST(1), &has_err);
    interested = SvTRUE(ST(2)) ? 1 : 0;
    rc = pagi_rs_finish(id, e.ptr, e.len, has_err, interested);
    XSRETURN_IV(rc);
}

XS(xs_release)
{
    dXSARGS;
    if (items != 1)
        croak_xs_usage(cv, "id");
    pagi_rs_release((uint64_t)SvUV(ST(0)));
    XSRETURN_EMPTY;
}

XS(xs_query)
{
    dXSARGS;
    int64_t v;
    if (items != 2)
        croak_xs_usage(cv, "id, what");
    v = pagi_rs_query((uint64_t)SvUV(ST(0)), (int)SvIV(ST(1)));
    if (v < 0)
        XSRETURN_UNDEF;
    XSRETURN_IV((IV)v);
}

XS(xs_lifespan_event)
{
    dXSARGS;
    STRLEN len = 0;
    const char *msg = "";
    int rc;
    if (items != 2)
        croak_xs_usage(cv, "kind, message");
    if (SvOK(ST(1)))
        msg = SvPVutf8(sv_2mortal(newSVsv(ST(1))), len);
    rc = pagi_rs_lifespan_event((int)SvIV(ST(0)), msg, len);
    XSRETURN_IV(rc);
}

XS(xs_log)
{
    dXSARGS;
    STRLEN len;
    const char *msg;
    if (items != 2)
        croak_xs_usage(cv, "level, message");
    msg = SvPVutf8(sv_2mortal(newSVsv(ST(1))), len);
    pagi_rs_log((int)SvIV(ST(0)), msg, len);
    XSRETURN_EMPTY;
}

XS(xs_embedded_source)
{
    dXSARGS;
    STRLEN len;
    const char *name;
    pagi_str src = {0, 0};
    if (items != 1)
        croak_xs_usage(cv, "path");
    name = SvPV(ST(0), len);
    if (!pagi_rs_embedded_source(name, len, &src))
        XSRETURN_UNDEF;
    ST(0) = sv_2mortal(newSVpvn(src.ptr, src.len));
    XSRETURN(1);
}

/* exit() inside an application would end the whole server (or longjmp across
 * Rust frames).  Every OP_EXIT compiled after install_exit_guard() croaks
 * instead, which the bridge turns into an ordinary application error. */
/* ---- SSE and WebSocket sends ------------------------------------------------
 * Sequencing and type checks live in Perl (SSE.pm, WebSocket.pm); these only
 * carry the values over.  Text fields are characters: they are UTF-8 encoded
 * here, on a copy, never in the application's own scalar. */

/* UTF-8 bytes of a text argument; *has = 0 for undef. */
static pagi_str text_arg(pTHX_ SV *sv, int *has)
{
    pagi_str out = {"", 0};
    STRLEN len;
    SV *copy;
    *has = SvOK(sv) ? 1 : 0;
    if (!*has)
        return out;
    /* ASCII is its own UTF-8: no copy (the common case, and numbers). */
    if (!SvUTF8(sv) && !SvGMAGICAL(sv) && !SvROK(sv)) {
        const char *p = SvPV_nomg(sv, len);
        if (is_utf8_invariant_string((const U8 *)p, len)) {
            out.ptr = p;
            out.len = len;
            return out;
        }
    }
    copy = sv_2mortal(newSVsv(sv));
    sv_utf8_encode(copy);
    out.ptr = SvPV(copy, len);
    out.len = len;
    return out;
}

/* Finish an XS send: (code) or (code, message). */
#define RETURN_RESULT(rc, err)                                                 \
    do {                                                                       \
        SP -= items;                                                           \
        PUSH_RESULT(rc, err);                                                  \
        PUTBACK;                                                               \
        return;                                                                \
    } while (0)

/* _sse_start($id, $status, $headers) */
XS(xs_sse_start)
{
    dXSARGS;
    size_t n = 0;
    const char *why = NULL;
    pagi_str *hdrs;
    pagi_str err = {0, 0};
    int rc;
    if (items != 3)
        croak_xs_usage(cv, "id, status, headers");
    hdrs = headers_from_sv(aTHX_ ST(2), &n, &why);
    if (!hdrs) {
        err.ptr = why;
        err.len = strlen(why);
        RETURN_RESULT(-1, err);
    }
    rc = pagi_rs_sse_start((uint64_t)SvUV(ST(0)), (int64_t)SvIV(ST(1)), hdrs, n, &err);
    RETURN_RESULT(rc, err);
}

/* _sse_event($id, $event, $data, $event_id, $retry_or_undef) */
XS(xs_sse_event)
{
    dXSARGS;
    pagi_str ev, data, eid, err = {0, 0};
    int has_ev, has_data, has_eid, rc;
    if (items != 5)
        croak_xs_usage(cv, "id, event, data, event_id, retry");
    ev = text_arg(aTHX_ ST(1), &has_ev);
    data = text_arg(aTHX_ ST(2), &has_data);
    eid = text_arg(aTHX_ ST(3), &has_eid);
    rc = pagi_rs_sse_event((uint64_t)SvUV(ST(0)), ev.ptr, ev.len, has_ev, data.ptr, data.len,
                           eid.ptr, eid.len, has_eid, SvOK(ST(4)) ? (int64_t)SvIV(ST(4)) : -1,
                           &err);
    RETURN_RESULT(rc, err);
}

/* _sse_comment($id, $comment) */
XS(xs_sse_comment)
{
    dXSARGS;
    pagi_str text, err = {0, 0};
    int has, rc;
    if (items != 2)
        croak_xs_usage(cv, "id, comment");
    text = text_arg(aTHX_ ST(1), &has);
    rc = pagi_rs_sse_comment((uint64_t)SvUV(ST(0)), text.ptr, text.len, &err);
    RETURN_RESULT(rc, err);
}

/* _sse_keepalive($id, $interval_ms, $comment) */
XS(xs_sse_keepalive)
{
    dXSARGS;
    pagi_str text;
    int has;
    if (items != 3)
        croak_xs_usage(cv, "id, interval_ms, comment");
    text = text_arg(aTHX_ ST(2), &has);
    XSRETURN_IV(pagi_rs_sse_keepalive((uint64_t)SvUV(ST(0)), (int64_t)SvIV(ST(1)), text.ptr,
                                      text.len));
}

/* _sse_close($id, $reason_or_undef) */
XS(xs_sse_close)
{
    dXSARGS;
    pagi_str text, err = {0, 0};
    int has, rc;
    if (items != 2)
        croak_xs_usage(cv, "id, reason");
    text = text_arg(aTHX_ ST(1), &has);
    rc = pagi_rs_sse_close((uint64_t)SvUV(ST(0)), text.ptr, text.len, has, &err);
    RETURN_RESULT(rc, err);
}

/* _ws_accept($id, $subprotocol_or_undef, $headers) */
XS(xs_ws_accept)
{
    dXSARGS;
    size_t n = 0;
    const char *why = NULL;
    pagi_str *hdrs, sub, err = {0, 0};
    int has_sub, rc;
    if (items != 3)
        croak_xs_usage(cv, "id, subprotocol, headers");
    sub = text_arg(aTHX_ ST(1), &has_sub);
    hdrs = headers_from_sv(aTHX_ ST(2), &n, &why);
    if (!hdrs) {
        err.ptr = why;
        err.len = strlen(why);
        RETURN_RESULT(-1, err);
    }
    rc = pagi_rs_ws_accept((uint64_t)SvUV(ST(0)), sub.ptr, sub.len, has_sub, hdrs, n, &err);
    RETURN_RESULT(rc, err);
}

/* _ws_send($id, $is_text, $payload): text is encoded, bytes must be bytes. */
XS(xs_ws_send)
{
    dXSARGS;
    pagi_str data, err = {0, 0};
    int is_text, has, rc;
    if (items != 3)
        croak_xs_usage(cv, "id, is_text, payload");
    is_text = SvTRUE(ST(1)) ? 1 : 0;
    if (is_text) {
        data = text_arg(aTHX_ ST(2), &has);
    } else if (!sv_to_bytes(aTHX_ ST(2), &data)) {
        err.ptr = "websocket.send 'bytes' contains wide characters; encode it first";
        err.len = strlen(err.ptr);
        RETURN_RESULT(-1, err);
    }
    rc = pagi_rs_ws_send((uint64_t)SvUV(ST(0)), is_text, data.ptr, data.len, &err);
    RETURN_RESULT(rc, err);
}

/* _ws_close($id, $code, $reason) */
XS(xs_ws_close)
{
    dXSARGS;
    pagi_str reason, err = {0, 0};
    int has, rc;
    if (items != 3)
        croak_xs_usage(cv, "id, code, reason");
    reason = text_arg(aTHX_ ST(2), &has);
    rc = pagi_rs_ws_close((uint64_t)SvUV(ST(0)), (int64_t)SvIV(ST(1)), reason.ptr, reason.len,
                          &err);
    RETURN_RESULT(rc, err);
}

/* _ws_keepalive($id, $interval_ms, $timeout_ms) */
XS(xs_ws_keepalive)
{
    dXSARGS;
    pagi_str err = {0, 0};
    int rc;
    if (items != 3)
        croak_xs_usage(cv, "id, interval_ms, timeout_ms");
    rc = pagi_rs_ws_keepalive((uint64_t)SvUV(ST(0)), (int64_t)SvIV(ST(1)), (int64_t)SvIV(ST(2)),
                              &err);
    RETURN_RESULT(rc, err);
}

/* _ws_overflow($id, $limit, $in_bytes): the limit is in messages, or in
 * bytes when $in_bytes is true. */
XS(xs_ws_overflow)
{
    dXSARGS;
    if (items != 3)
        croak_xs_usage(cv, "id, limit, in_bytes");
    pagi_rs_ws_overflow((uint64_t)SvUV(ST(0)), (int64_t)SvIV(ST(1)), SvTRUE(ST(2)) ? 1 : 0);
    XSRETURN_EMPTY;
}

/* _end_state($id): (state, reason, detail, peer_code, peer_reason,
 * websocket_code); state is
 * -1 (forgotten), 0 (active), 1 (clean) or 2 (abnormal); the rest undef
 * where absent.  Text comes as characters. */
XS(xs_end_state)
{
    dXSARGS;
    pagi_msg m;
    int state, i;
    if (items != 1)
        croak_xs_usage(cv, "id");
    memset(&m, 0, sizeof m);
    state = pagi_rs_end_state((uint64_t)SvUV(ST(0)), &m);
    SP -= items;
    EXTEND(SP, 6);
    mPUSHi(state);
    for (i = 0; i < 2; i++) {
        if (m.str[i].ptr)
            mPUSHs(bytes_sv(aTHX_ m.str[i], 1));
        else
            PUSHs(&PL_sv_undef);
    }
    if (m.num[0] >= 0)
        mPUSHi((IV)m.num[0]);
    else
        PUSHs(&PL_sv_undef);
    if (m.str[2].ptr)
        mPUSHs(bytes_sv(aTHX_ m.str[2], 1));
    else
        PUSHs(&PL_sv_undef);
    if (m.num[1] >= 0)
        mPUSHi((IV)m.num[1]);
    else
        PUSHs(&PL_sv_undef);
    PUTBACK;
}

/* _abort($id, $detail_or_undef): 1 when it ended the scope. */
XS(xs_abort)
{
    dXSARGS;
    pagi_str detail;
    int has;
    if (items != 2)
        croak_xs_usage(cv, "id, detail");
    detail = text_arg(aTHX_ ST(1), &has);
    XSRETURN_IV(pagi_rs_abort((uint64_t)SvUV(ST(0)), detail.ptr, detail.len, has));
}

/* _ws_finish($id, $error_or_undef) */
XS(xs_ws_finish)
{
    dXSARGS;
    pagi_str e = {0, 0};
    int has_err;
    if (items != 2)
        croak_xs_usage(cv, "id, error");
    e = text_arg(aTHX_ ST(1), &has_err);
    XSRETURN_IV(pagi_rs_ws_finish((uint64_t)SvUV(ST(0)), e.ptr, e.len, has_err));
}

static OP *pagi_pp_exit(pTHX)
{
    Perl_croak(aTHX_ "exit() called by the application; pagi-rs does not let an app end the server\n");
    return NULL; /* not reached */
}

static void xs_init(pTHX)
{
    static const char file[] = __FILE__;
    newXS("DynaLoader::boot_DynaLoader", boot_DynaLoader, file);
    newXS("PAGI::RS::_next", xs_next_message, file);
    newXS("PAGI::RS::_wake_ack", xs_wake_ack, file);
    newXS("PAGI::RS::_start", xs_response_start, file);
    newXS("PAGI::RS::_body", xs_response_body, file);
    newXS("PAGI::RS::_file", xs_response_file, file);
    newXS("PAGI::RS::_fd", xs_response_fd, file);
    newXS("PAGI::RS::_trailers", xs_response_trailers, file);
    newXS("PAGI::RS::_fullflush", xs_fullflush, file);
    newXS("PAGI::RS::_want_body", xs_want_body, file);
    newXS("PAGI::RS::_finish", xs_finish, file);
    newXS("PAGI::RS::_release", xs_release, file);
    newXS("PAGI::RS::_query", xs_query, file);
    newXS("PAGI::RS::_lifespan_event", xs_lifespan_event, file);
    newXS("PAGI::RS::_log", xs_log, file);
    newXS("PAGI::RS::_embedded_source", xs_embedded_source, file);
    newXS("PAGI::RS::_sse_start", xs_sse_start, file);
    newXS("PAGI::RS::_sse_event", xs_sse_event, file);
    newXS("PAGI::RS::_sse_comment", xs_sse_comment, file);
    newXS("PAGI::RS::_sse_keepalive", xs_sse_keepalive, file);
    newXS("PAGI::RS::_sse_close", xs_sse_close, file);
    newXS("PAGI::RS::_ws_accept", xs_ws_accept, file);
    newXS("PAGI::RS::_ws_send", xs_ws_send, file);
    newXS("PAGI::RS::_ws_close", xs_ws_close, file);
    newXS("PAGI::RS::_ws_keepalive", xs_ws_keepalive, file);
    newXS("PAGI::RS::_ws_overflow", xs_ws_overflow, file);
    newXS("PAGI::RS::_ws_finish", xs_ws_finish, file);
    newXS("PAGI::RS::_end_state", xs_end_state, file);
    newXS("PAGI::RS::_abort", xs_abort, file);
}

/* ---- interpreter lifecycle (called from Rust) ----------------------------- */

static int sys_argc = 1;
static char *sys_argv_storage[] = {"pagi-rs", NULL};
static char **sys_argv = sys_argv_storage;

void pagi_sys_init(void)
{
    char **env = NULL;
    PERL_SYS_INIT3(&sys_argc, &sys_argv, &env);
}

void pagi_sys_term(void)
{
    PERL_SYS_TERM();
}

/* argv must be writable and outlive the interpreter ($0 writes into it). */
PerlInterpreter *pagi_interp_new(int argc, char **argv)
{
    PerlInterpreter *my_perl = perl_alloc();
    if (!my_perl)
        return NULL;
    PERL_SET_CONTEXT(my_perl);
    perl_construct(my_perl);
    PL_exit_flags |= PERL_EXIT_DESTRUCT_END;
    /* NULL env: a custom array would replace the whole process environment. */
    if (perl_parse(my_perl, xs_init, argc, argv, NULL) != 0) {
        perl_destruct(my_perl);
        perl_free(my_perl);
        return NULL;
    }
    if (perl_run(my_perl) != 0) {
        perl_destruct(my_perl);
        perl_free(my_perl);
        return NULL;
    }
    return my_perl;
}

void pagi_interp_set_context(PerlInterpreter *my_perl)
{
    PERL_SET_CONTEXT(my_perl);
}

void pagi_interp_free(PerlInterpreter *my_perl)
{
    PERL_SET_CONTEXT(my_perl);
    PL_perl_destruct_level = 0;
    perl_destruct(my_perl);
    perl_free(my_perl);
}

/* ---- signals --------------------------------------------------------------
 * Perl's C signal handler needs an interpreter on the current thread.  Once
 * an app sets $SIG{USR1} (say), the process-wide handler is Perl's, and the
 * kernel may run it on a tokio thread, which has none: it would crash.  Our
 * replacement forwards such a signal to an interpreter thread, where Perl's
 * own handler queues it for the app as usual. */
#include <pthread.h>
#include <signal.h>

static pthread_t signal_target;
static volatile sig_atomic_t have_signal_target = 0;

static Signal_t pagi_csighandler3(int sig, Siginfo_t *info, void *uap)
{
    if (PERL_GET_THX == NULL) {
        if (have_signal_target)
            pthread_kill(signal_target, sig);
        return;
    }
    Perl_csighandler3(sig, info, uap);
}

static Signal_t pagi_csighandler1(int sig)
{
    if (PERL_GET_THX == NULL) {
        if (have_signal_target)
            pthread_kill(signal_target, sig);
        return;
    }
    Perl_csighandler1(sig);
}

/* Called on the main thread before any interpreter exists. */
void pagi_install_signal_forwarding(void)
{
    PL_csighandlerp = (Sighandler_t)pagi_csighandler3;
    PL_csighandler3p = pagi_csighandler3;
    PL_csighandler1p = pagi_csighandler1;
}

/* Called on the interpreter thread that should receive forwarded signals. */
void pagi_set_signal_target(void)
{
    if (!have_signal_target) {
        signal_target = pthread_self();
        have_signal_target = 1;
    }
}

/* PL_ppaddr is shared by every interpreter in the process; install once. */
void pagi_install_exit_guard(void)
{
    PL_ppaddr[OP_EXIT] = pagi_pp_exit;
}

/* Call the Perl sub `name` with string arguments in list context, under
 * G_EVAL, with $@ localised.  On success returns 1 and stores the stringified
 * first return value (if any) in *result (valid until the next call); on a
 * Perl exception returns 0 and stores the error text in *result. */
static SV *last_result = NULL;

/* Keep a copy of `sv` (a return value or $@) until the next call, and point
 * `result` at its UTF-8 text. */
static void keep_result(pTHX_ SV *sv, pagi_str *result)
{
    STRLEN len = 0;
    const char *p = "";
    if (last_result)
        SvREFCNT_dec(last_result);
    last_result = newSVsv(sv);
    if (SvOK(last_result))
        p = SvPVutf8(last_result, len);
    result->ptr = p;
    result->len = len;
}

int pagi_call(PerlInterpreter *my_perl, const char *name, const pagi_str *args, size_t nargs,
              pagi_str *result)
{
    int count, ok;
    size_t i;
    dSP;

    ENTER;
    SAVETMPS;
    save_scalar(PL_errgv);
    PUSHMARK(SP);
    EXTEND(SP, (SSize_t)nargs);
    for (i = 0; i < nargs; i++)
        mPUSHs(newSVpvn(args[i].ptr, args[i].len));
    PUTBACK;
    count = call_pv(name, G_EVAL | G_SCALAR);
    SPAGAIN;
    ok = !SvTRUE(ERRSV);
    keep_result(aTHX_ ok ? (count > 0 ? POPs : &PL_sv_undef) : ERRSV, result);
    if (!ok && count > 0)
        (void)POPs;
    PUTBACK;
    FREETMPS;
    LEAVE;
    return ok;
}

/* Evaluate Perl source (the bootstrap); same error contract as pagi_call. */
int pagi_eval(PerlInterpreter *my_perl, const char *code, pagi_str *result)
{
    SV *ret;
    int ok;
    dSP;
    PERL_UNUSED_VAR(sp);
    ENTER;
    SAVETMPS;
    save_scalar(PL_errgv);
    ret = eval_pv(code, FALSE);
    ok = !SvTRUE(ERRSV);
    keep_result(aTHX_ ok ? ret : ERRSV, result);
    FREETMPS;
    LEAVE;
    return ok;
}
