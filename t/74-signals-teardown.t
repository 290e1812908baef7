use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;
use File::Temp qw(tempdir);
use POSIX ();
use Time::HiRes qw(time sleep);

# Signals for which an app set %SIG: a signal reaches an interpreter whose
# app set the handler (with several interpreters, whichever thread the
# kernel picked), and none is sent to an interpreter thread that has been
# torn down (signals arriving while the server shuts down).

my $dir = tempdir( CLEANUP => 1 );

my $app_src = <<'APP';
use strict; use warnings; use Future::AsyncAwait; use Future::IO;
my $dir = '__DIR__';
# This interpreter, as distinct from the others in the process.
my $me = sprintf '%x', 0 + \%main::;
my $count = 0;
sub spit { my ($file, $text) = @_; open my $fh, '>', "$dir/$file" or return; print $fh $text; close $fh }
$SIG{USR1} = sub { $count++ } if $ENV{PAGI_TEST_SIG_AT_LOAD};
my %h;
$h{'/hold'} = async sub { spit('holding', $me); await Future::IO->sleep(4); $me };
$h{'/arm'} = async sub {
    $SIG{USR1} = sub { $count++; spit('usr1', "$count $me") };
    $me;
};
$h{'/'} = async sub { "$me count=$count" };
# Arms the handler, then ends a loop turn of its own a moment later (a
# timer) that no message from the core follows.
$h{'/arm-then-tick'} = async sub {
    $SIG{USR1} = sub { $count++; spit('usr1', "$count $me") };
    Future::IO->sleep(0.2)->on_done(sub { spit('ticked', $me) })->retain;
    $me;
};
# A handler that first says DEFAULT and becomes a sub after a send: the
# second interpreter must still take the signal for it.
$h{'/arm-later'} = async sub {
    my ($send) = @_;
    $SIG{WINCH} = 'DEFAULT';
    await $send->({ type => 'http.response.start', status => 200, headers => [['content-type', 'text/plain']] });
    $SIG{WINCH} = sub { spit('winch', $me) };
    await $send->({ type => 'http.response.body', body => $me });
    return;
};
my $app = async sub {
    my ($scope, $receive, $send) = @_;
    return if $scope->{type} eq 'lifespan';
    my $handler = $h{$scope->{path}} or die "no route";
    my $body = await $handler->($send);
    return unless defined $body;
    await $send->({ type => 'http.response.start', status => 200,
        headers => [['content-type', 'text/plain'], ['content-length', length $body]] });
    await $send->({ type => 'http.response.body', body => $body });
};
$app;
APP
$app_src =~ s/__DIR__/$dir/g;
my $app = write_app($app_src);

# A server with two interpreters whose first is kept busy (/hold), so that
# GET $path runs on the second.  Returns the server and the id of the
# interpreter $path ran on, or nothing (having failed a test) if it ran on
# the busy one.
sub arm_second_interpreter {
    my ($path) = @_;
    # A marker file of a server before must not stand for this one's.
    unlink "$dir/holding";
    my $s    = start_server( '--interpreters', 2, $app );
    my $hold = connect_port( $s->port );
    $hold->syswrite("GET /hold HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    my $holder = wait_file_line( "$dir/holding", qr/\w/, 5 );
    my $armed  = http_request( $s->port, 'GET', $path )->{body} // '';
    ok $holder && $armed && $holder ne $armed, "$path ran on the other interpreter ($armed, not $holder)"
      or return;
    return ( $s, $armed, $hold );
}

subtest 'a signal reaches the interpreter whose app set the handler' => sub {
    my ( $s, $armed, $hold ) = arm_second_interpreter('/arm') or return;
    for my $n ( 1 .. 10 ) {
        kill 'USR1', $s->pid;
        my $line = wait_file_line( "$dir/usr1", qr/^\Q$n\E /, 5 );
        is $line, "$n $armed", "signal $n ran the handler of the interpreter that set it"
          or last;
    }
    ok $s->is_running, 'the server survived';
    is $s->stop('TERM'), 0, 'and exits 0';
};

subtest 'a handler set after DEFAULT on the second interpreter takes the signal' => sub {
    my ( $s, $armed, $hold ) = arm_second_interpreter('/arm-later') or return;    # WINCH is ignored by default: without the handler it would pass unseen.
    kill 'WINCH', $s->pid;
    is wait_file_line( "$dir/winch", qr/\w/, 5 ), $armed, 'the handler ran';
    ok $s->is_running, 'the server survived';
    is $s->stop('TERM'), 0, 'and exits 0';
};

subtest 'a signal that comes as the loop is about to sleep still runs the handler' => sub {
    # Perl only marks a signal pending, for the app's loop to act on at its
    # next op; one that lands after the loop's last look and before it
    # blocks in poll(2) gets no EINTR.  A poll(2) made to start late
    # (LD_PRELOAD) holds that moment open for 600 ms after each loop turn;
    # the signal is sent inside it, after a turn no message follows (a
    # timer's), so that only the server's own wake-up can end the sleep.
    my $cc = ( grep { -x "$_/cc" } split /:/, $ENV{PATH} ) ? 'cc' : undef;
    plan skip_all => 'no C compiler' unless $cc;
    my $src = "$dir/slowpoll.c";
    open my $fh, '>', $src or die "$src: $!";
    print $fh <<'C';
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <poll.h>
#include <time.h>
int poll(struct pollfd *fds, nfds_t n, int timeout)
{
    static int (*real)(struct pollfd *, nfds_t, int);
    struct timespec left = {0, 600 * 1000 * 1000};
    int saved = errno;
    if (!real)
        real = (int (*)(struct pollfd *, nfds_t, int))dlsym(RTLD_NEXT, "poll");
    if (timeout != 0)
        while (nanosleep(&left, &left) != 0 && errno == EINTR)
            ;
    errno = saved;
    return real(fds, n, timeout);
}
C
    close $fh;
    system( $cc, '-shared', '-fPIC', '-o', "$dir/slowpoll.so", $src, '-ldl' ) == 0 or die "cc: $?";
    unlink "$dir/usr1", "$dir/ticked";
    my $s = do {
        local $ENV{LD_PRELOAD} = "$dir/slowpoll.so";
        start_server( '--no-access-log', $app );
    };
    my $armed = http_request( $s->port, 'GET', '/arm-then-tick' )->{body};
    ok wait_file_line( "$dir/ticked", qr/\w/, 10 ), 'the timer ended a loop turn';
    kill 'USR1', $s->pid;
    is wait_file_line( "$dir/usr1", qr/^1 /, 5 ), "1 $armed", 'the handler ran';
    ok $s->is_running, 'the server survived';
    is $s->stop('TERM'), 0, 'and exits 0';
};

subtest 'signals during shutdown reach no interpreter that is gone' => sub {
    local $ENV{PAGI_TEST_SIG_AT_LOAD} = 1;
    for my $round ( 1 .. 5 ) {
        my $s = start_server( '--no-access-log', $app );
        my $pid = $s->pid;
        my $flooder = fork // die "fork: $!";
        if ( !$flooder ) {
            while ( kill 'USR1', $pid ) { sleep 0.0002 }
            POSIX::_exit(0);
        }
        is http_request( $s->port, 'GET', '/' )->{status}, 200, "round $round: serving under a flood of USR1";
        my $code = $s->stop('TERM');
        kill 'KILL', $flooder;
        waitpid $flooder, 0;
        is $s->{exit_signal}, 0, "round $round: not killed by a signal";
        is $code, 0, "round $round: exits 0";
    }
};

done_testing;
