/*
 * Signal forwarding between threads: a signal reaches the thread of an
 * interpreter whose app set a handler for it.
 */
#include "glue.h"
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

/* ---- signals --------------------------------------------------------------
 * Perl's C signal handler needs an interpreter on the current thread, and
 * that interpreter must be one whose app set a handler for the signal
 * (Perl exits on a signal it has no handler for).  Once an app sets
 * $SIG{USR1} (say), the process-wide handler is Perl's, and the kernel may
 * run it on any thread: a tokio thread, which has no interpreter, or
 * another interpreter's.  Our replacement delivers the signal on this
 * thread when its interpreter has a handler, and otherwise forwards it
 * (tgkill) to the thread of an interpreter that has one, where Perl's own
 * handler queues it for the app as usual.
 *
 * Interpreters are registered here while they may receive signals.  A
 * thread is addressed by its kernel thread id, not a pthread_t: a signal
 * for a thread that has just exited then fails with ESRCH instead of being
 * undefined behaviour.  An interpreter is removed before it is destroyed,
 * and the removal waits until no handler is reading the table, so a handler
 * never reads a freed interpreter. */

#define MAX_SIGNAL_TARGETS 64

typedef struct {
    atomic_int live; /* 1 while it may receive signals */
    pid_t tid;
    PerlInterpreter *perl;
    int wake_fd; /* the eventfd its loop watches, or -1 */
} signal_target;

static signal_target signal_targets[MAX_SIGNAL_TARGETS];
static atomic_int signal_target_count;
static atomic_int signal_handlers_reading;

/* How well `perl` can take signal `sig`: 2 with a code or glob handler,
 * 1 with a handler named by a string, 0 with none ('DEFAULT' and 'IGNORE'
 * are none).  Only reads: a pointer in its %SIG table, the flags of an SV
 * head (arena memory, valid while the interpreter lives) and a name. */
static int handler_rank(PerlInterpreter *my_perl, int sig)
{
    SV **handlers = PL_psig_ptr;
    SV *h;
    if (!handlers || sig <= 0 || sig >= SIG_SIZE)
        return 0;
    h = handlers[sig];
    if (!h)
        return 0;
    if (SvROK(h) || isGV_with_GP(h))
        return 2;
    if (SvPOK(h) && SvCUR(h) > 0) {
        const char *name = SvPVX(h);
        if (strEQ(name, "DEFAULT") || strEQ(name, "IGNORE"))
            return 0;
        return 1;
    }
    return 0;
}

/* The target for `sig` received on a thread running `here` (NULL: none).
 * Returns 0 to deliver here, a thread id to forward to, or -1 for nobody
 * (no live interpreter has a handler: the signal is dropped).  The caller
 * holds signal_handlers_reading.  *here_wake_fd is `here`'s wake-up fd. */
static pid_t choose_signal_target(int sig, PerlInterpreter *here, int *here_wake_fd)
{
    int i, n, best_rank = 0, here_rank = -1;
    pid_t best = -1;
    *here_wake_fd = -1;
    n = atomic_load(&signal_target_count);
    if (n > MAX_SIGNAL_TARGETS)
        n = MAX_SIGNAL_TARGETS;
    for (i = 0; i < n; i++) {
        signal_target *t = &signal_targets[i];
        int rank;
        if (!atomic_load(&t->live))
            continue;
        rank = handler_rank(t->perl, sig);
        if (t->perl == here) {
            here_rank = rank;
            *here_wake_fd = t->wake_fd;
        }
        if (rank > best_rank) {
            best_rank = rank;
            best = t->tid;
        }
    }
    if (here_rank > 0 && here_rank >= best_rank)
        return 0;
    return best;
}

/* Where `sig`, received on this thread, goes (as choose_signal_target).
 * When it is to be delivered here, the interpreter's loop is woken too.
 * Perl only marks the signal pending; the app's handler runs at the next
 * op, and an interpreter that was about to enter poll(2) when the signal
 * came (past its last check, not yet in the system call, so there is no
 * EINTR) would sleep on with it pending until something else woke it.  A
 * readable eventfd makes that poll return at once.  The write is made
 * while the table is being read, so that the fd cannot be closed under it
 * (signal_target_remove waits for readers). */
static pid_t take_signal(int sig, PerlInterpreter *here)
{
    pid_t target;
    int wake_fd;
    atomic_fetch_add(&signal_handlers_reading, 1);
    target = choose_signal_target(sig, here, &wake_fd);
    if (target == 0 && wake_fd >= 0) {
        uint64_t one = 1;
        (void)write(wake_fd, &one, sizeof one);
    }
    atomic_fetch_sub(&signal_handlers_reading, 1);
    return target;
}

static void forward_signal(pid_t tid, int sig)
{
    if (tid > 0)
        (void)syscall(SYS_tgkill, (long)getpid(), (long)tid, (long)sig);
}

/* ---- the server's own signals ----------------------------------------------
 * The server stops on TERM and INT (and a master acts on HUP, TTIN, ...)
 * through its own handler, which writes the signal's number to a pipe.
 * When an app sets $SIG{TERM}, Perl installs its handler in the server's
 * place; that handler is ours (below), and it tells the server as well, so
 * that the app's handler runs and the server still stops gracefully.  The
 * pipe and the set of signals are the process's (a forked worker sets its
 * own); writing one byte to a non-blocking pipe is async-signal-safe. */
static atomic_int server_signal_fd = -1;
static _Atomic uint64_t server_signal_mask;

void pagi_set_server_signals(int fd, uint64_t mask)
{
    atomic_store(&server_signal_mask, mask);
    atomic_store(&server_signal_fd, fd);
}

static void notify_server(int sig)
{
    int fd = atomic_load(&server_signal_fd);
    if (fd >= 0 && sig > 0 && sig < 64 && (atomic_load(&server_signal_mask) >> sig) & 1) {
        unsigned char byte = (unsigned char)sig;
        (void)write(fd, &byte, 1);
    }
}

static Signal_t pagi_csighandler3(int sig, Siginfo_t *info, void *uap);
static Signal_t pagi_csighandler1(int sig);

/* Whether `handler` (a sigaction's handler) is Perl's, i.e. ours below. */
int pagi_is_perl_signal_handler(void *handler)
{
    return handler == (void *)pagi_csighandler3 || handler == (void *)pagi_csighandler1;
}

static Signal_t pagi_csighandler3(int sig, Siginfo_t *info, void *uap)
{
    int saved_errno = errno;
    pid_t target;
    notify_server(sig);
    target = take_signal(sig, (PerlInterpreter *)PERL_GET_THX);
    errno = saved_errno;
    if (target == 0)
        Perl_csighandler3(sig, info, uap);
    else
        forward_signal(target, sig);
    errno = saved_errno;
}

static Signal_t pagi_csighandler1(int sig)
{
    int saved_errno = errno;
    pid_t target;
    notify_server(sig);
    target = take_signal(sig, (PerlInterpreter *)PERL_GET_THX);
    errno = saved_errno;
    if (target == 0)
        Perl_csighandler1(sig);
    else
        forward_signal(target, sig);
    errno = saved_errno;
}

/* Called on the main thread before any interpreter exists. */
void pagi_install_signal_forwarding(void)
{
    PL_csighandlerp = (Sighandler_t)pagi_csighandler3;
    PL_csighandler3p = pagi_csighandler3;
    PL_csighandler1p = pagi_csighandler1;
}

/* Called on an interpreter's own thread once it is built: signals for
 * which its app sets a handler may now be delivered to it, and wake its
 * loop through `wake_fd` (-1: none). */
void pagi_add_signal_target(PerlInterpreter *my_perl, int wake_fd)
{
    int i = atomic_fetch_add(&signal_target_count, 1);
    if (i >= MAX_SIGNAL_TARGETS)
        return; /* signals then reach only the first MAX_SIGNAL_TARGETS */
    signal_targets[i].tid = (pid_t)syscall(SYS_gettid);
    signal_targets[i].perl = my_perl;
    signal_targets[i].wake_fd = wake_fd;
    atomic_store(&signal_targets[i].live, 1);
}

void signal_target_remove(PerlInterpreter *my_perl)
{
    int i, n = atomic_load(&signal_target_count);
    if (n > MAX_SIGNAL_TARGETS)
        n = MAX_SIGNAL_TARGETS;
    for (i = 0; i < n; i++)
        if (signal_targets[i].perl == my_perl)
            atomic_store(&signal_targets[i].live, 0);
    /* A handler that saw it live is still reading: let it finish. */
    while (atomic_load(&signal_handlers_reading) != 0)
        sched_yield();
}

/* Perl installs the process's handler for a signal only when the first
 * ("parent") interpreter sets $SIG{...}: with ithreads, Perl_rsignal
 * refuses every other interpreter.  When the app of another interpreter
 * sets a handler, install ours here, as Perl would have, so that the signal
 * reaches it.  Called where the app has just run: before each $send goes
 * to the core (so a handler set while answering a request is in place
 * before the answer leaves) and on each wake-up of the loop.  Once
 * installed it stays: %SIG is process-wide, and a signal no interpreter
 * has a handler for is dropped (choose_signal_target).
 *
 * Every send of every interpreter but the first passes here, so a scan of
 * all 65 entries happens only when the table of handler scalars changed
 * since the last one (about 40 ns per SSE event on the second interpreter).
 * Between scans, only the entries that held no handler to adopt (DEFAULT,
 * IGNORE) are looked at again: assigning to $SIG{...} changes that entry's
 * scalar in place, without a new pointer in the table. */
static __thread unsigned char signals_adopted[SIG_SIZE];
static __thread SV *handlers_scanned[SIG_SIZE];
static __thread unsigned char not_adopted[SIG_SIZE];
static __thread int n_not_adopted;

void adopt_signal_handlers(pTHX)
{
    int sig, i;
    SV **handlers = PL_psig_ptr;
    if (PL_curinterp == aTHX || !handlers)
        return;
    if (memcmp(handlers, handlers_scanned, sizeof handlers_scanned) == 0) {
        for (i = 0; i < n_not_adopted; i++)
            if (handler_rank(aTHX, not_adopted[i]) > 0)
                break;
        if (i == n_not_adopted)
            return;
    }
    n_not_adopted = 0;
    for (sig = 1; sig < SIG_SIZE; sig++) {
        if (!handlers[sig] || signals_adopted[sig])
            continue;
        if (handler_rank(aTHX, sig) > 0) {
            struct sigaction act;
            memset(&act, 0, sizeof act);
            act.sa_handler = (void (*)(int))PL_csighandlerp; /* as Perl_rsignal does */
            sigemptyset(&act.sa_mask);
            if (sigaction(sig, &act, NULL) == 0) {
                signals_adopted[sig] = 1;
                continue;
            }
        }
        /* Not adopted (yet): looked at again at every call. */
        not_adopted[n_not_adopted++] = (unsigned char)sig;
    }
    memcpy(handlers_scanned, handlers, sizeof handlers_scanned);
}

/* For tests: where a signal received on a thread without an interpreter
 * would go (a thread id, or -1), and this thread's interpreter context. */
int pagi_signal_target_for(int sig)
{
    int wake_fd, target;
    atomic_fetch_add(&signal_handlers_reading, 1);
    target = (int)choose_signal_target(sig, NULL, &wake_fd);
    atomic_fetch_sub(&signal_handlers_reading, 1);
    return target;
}

/* For tests: take `sig` as if the kernel had delivered it on this thread
 * (the handler Perl installs for a %SIG entry, which is ours). */
void pagi_take_signal_here(int sig)
{
    pagi_csighandler1(sig);
}

void *pagi_current_context(void)
{
    return PERL_GET_THX;
}
