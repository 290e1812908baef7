use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;
use PagiRS::Workers;

# The interpreter's IO::Async loop: which class it is, and that it serves
# in one process and in every worker of -w N.
#
# IO::Async's own choice on Linux is IO::Async::Loop::Epoll whenever that is
# installed (`make test-deps` installs it, so these run in that setting).
# Two of its properties broke the server: a forked worker's Epoll loop
# renewed its epoll set without adding back the wake-up fd, so the worker
# never served (its clients hung), and a Linux::Epoll object crashes an
# ithread that clones it (t/18).  pagi-rs uses IO::Async's builtin poll
# loop unless IO_ASYNC_LOOP, IO::Async's own setting, names another, and
# renews a chosen Epoll loop properly in a forked worker (Bridge.pm).

my $have_epoll = eval { require IO::Async::Loop::Epoll; 1 };

# Answers "loop=CLASS pid=PID" after a timer on the loop has fired.
my $app = write_app( <<'PERL', 'loop_app.pl' );
use strict; use warnings; use Future::AsyncAwait; use Future::IO; use IO::Async::Loop;
async sub {
    my ($scope, $receive, $send) = @_;
    return if $scope->{type} eq 'lifespan';
    await Future::IO->sleep(0.01);
    my $body = sprintf 'loop=%s pid=%d', ref(IO::Async::Loop->new), $$;
    await $send->({ type => 'http.response.start', status => 200,
                     headers => [['content-type', 'text/plain']] });
    await $send->({ type => 'http.response.body', body => $body });
};
PERL

# GET / until `$want` distinct processes have answered (or 200 tries);
# returns ({ pid => loop class }, failed requests).
sub answers {
    my ( $server, $want ) = @_;
    my ( %loop_of, $failed );
    for ( 1 .. 200 ) {
        my $res = http_request( $server->port, 'GET', '/', timeout => 5 );
        if ( ( $res->{status} // 0 ) == 200 && $res->{body} =~ /^loop=(\S+) pid=(\d+)$/ ) {
            $loop_of{$2} = $1;
        }
        else {
            $failed++;
            last;
        }
        last if keys %loop_of >= $want;
    }
    return ( \%loop_of, $failed // 0 );
}

subtest 'by default the loop is the builtin poll loop' => sub {
    my $s = start_server($app);
    my ( $loops, $failed ) = answers( $s, 1 );
    is $failed, 0, 'answered';
    is_deeply [ values %$loops ], ['IO::Async::Loop::Poll'],
      'IO::Async::Loop->new is an IO::Async::Loop::Poll'
      . ( $have_epoll ? ' (IO::Async::Loop::Epoll is installed)' : '' );
    is $s->stop('TERM'), 0, 'stops cleanly';
};

subtest 'and in each worker (-w 2)' => sub {
    my $s = start_server( '-w', 2, $app );
    my ( $loops, $failed ) = answers( $s, 2 );
    is $failed, 0, 'every request answered';
    is scalar keys %$loops, 2, 'both workers answered';
    is_deeply [ sort values %$loops ], [ ('IO::Async::Loop::Poll') x 2 ], 'each on the poll loop';
    is $s->stop('TERM'), 0, 'stops cleanly';
};

SKIP: {
    skip 'IO::Async::Loop::Epoll is not installed (libio-async-loop-epoll-perl)', 2 unless $have_epoll;

    subtest 'IO_ASYNC_LOOP chooses the loop' => sub {
        local $ENV{IO_ASYNC_LOOP} = 'Epoll';
        my $s = start_server($app);
        my ( $loops, $failed ) = answers( $s, 1 );
        is $failed, 0, 'answered';
        is_deeply [ values %$loops ], ['IO::Async::Loop::Epoll'], 'an IO::Async::Loop::Epoll';
        is $s->stop('TERM'), 0, 'stops cleanly';
    };

    subtest 'an Epoll loop serves in every worker (-w 2)' => sub {
        local $ENV{IO_ASYNC_LOOP} = 'Epoll';
        my $s = start_server( '-w', 2, $app );
        is scalar wait_workers( $s->pid, 2, 5 ), 2, 'two workers';
        my ( $loops, $failed ) = answers( $s, 2 );
        is $failed, 0, 'every request answered (none left hanging by a deaf worker)';
        is scalar keys %$loops, 2, 'both workers answered';
        is_deeply [ sort values %$loops ], [ ('IO::Async::Loop::Epoll') x 2 ], 'each on its own Epoll loop';
        is $s->stop('TERM'), 0, 'stops cleanly';
    };
}

# -l/--loop BACKEND, the reference runner's option: the loop is
# IO::Async::Loop::BACKEND, named outright (it wins over IO_ASYNC_LOOP), and
# one that cannot be loaded stops the start before any port is bound.
subtest '-l BACKEND names the loop class' => sub {
    my $s = start_server( '-l', 'Select', $app );
    my ( $loops, $failed ) = answers( $s, 1 );
    is $failed, 0, 'answered';
    is_deeply [ values %$loops ], ['IO::Async::Loop::Select'], '-l Select: an IO::Async::Loop::Select';
    like $s->output, qr/\(pid \d+, interpreters: 1, loop: IO::Async::Loop::Select\)/, 'the startup line names it';
    is $s->stop('TERM'), 0, 'stops cleanly';

    local $ENV{IO_ASYNC_LOOP} = 'Select';
    $s = start_server( '--loop', 'Poll', $app );
    ( $loops, $failed ) = answers( $s, 1 );
    is_deeply [ values %$loops ], ['IO::Async::Loop::Poll'], '--loop Poll wins over IO_ASYNC_LOOP';
    is $s->stop('TERM'), 0, 'stops cleanly';
};

SKIP: {
    skip 'IO::Async::Loop::Epoll is not installed (libio-async-loop-epoll-perl)', 1 unless $have_epoll;
    subtest '-l Epoll, in each worker (-w 2)' => sub {
        my $s = start_server( '-w', 2, '-l', 'Epoll', $app );
        is scalar wait_workers( $s->pid, 2, 5 ), 2, 'two workers';
        my ( $loops, $failed ) = answers( $s, 2 );
        is $failed, 0, 'every request answered';
        is_deeply [ sort values %$loops ], [ ('IO::Async::Loop::Epoll') x 2 ], 'each on its own Epoll loop';
        like $s->output, qr/workers: 2, interpreters: 1, loop: IO::Async::Loop::Epoll\)/, 'the startup line names it';
        is $s->stop('TERM'), 0, 'stops cleanly';
    };
}

subtest '-l with a loop that cannot be used' => sub {
    my $port = free_port();
    my ( $code, $err ) = run_pagi( '-p', $port, '-l', 'NoSuchBackend', $app );
    is $code, 1, 'a loop that is not installed: exit 1';
    like $err, qr/^pagi-rs: cannot use the event loop 'NoSuchBackend' \(-l NoSuchBackend\): IO::Async::Loop::NoSuchBackend is not installed$/m,
      'named, without Perl\'s @INC list';
    unlike $err, qr/listening on|cannot load the application/, 'before serving, and not blamed on the app';

    my $broken = write_app( <<'PERL', 'BrokenLoop.pm' );
package IO::Async::Loop::BrokenLoop;
use parent 'IO::Async::Loop::Poll';
sub new { die "no kernel support here\n" }
1;
PERL
    my $inc = $broken =~ s{/[^/]+$}{}r;
    mkdir "$inc/IO"; mkdir "$inc/IO/Async"; mkdir "$inc/IO/Async/Loop";
    rename $broken, "$inc/IO/Async/Loop/BrokenLoop.pm" or die "rename: $!";
    ( $code, $err ) = run_pagi( '-p', $port, '-I', $inc, '-l', 'BrokenLoop', $app );
    is $code, 1, 'a loop whose constructor dies: exit 1';
    like $err, qr/cannot use the event loop 'BrokenLoop' \(-l BrokenLoop\): no kernel support here/, 'with its error';

    ( $code, $err ) = run_pagi( '-p', $port, '-l', 'Poll;die', $app );
    is $code, 2, 'not a class name: a usage error (exit 2)';
    like $err, qr/invalid value 'Poll;die' for '--loop <BACKEND>'/, 'named';
    ok !port_listening($port), 'nothing was left listening';
};

# IO::Async reports its work to Metrics::Any through a shared collector it
# tests twice per loop turn, each test an overloaded Perl sub.  Once the
# collector has settled on the Null adapter (no adapter configured) it is
# false for good, and Bridge.pm makes the shared variable undef, as it is
# without Metrics::Any.  With an adapter configured it must stay, and
# IO::Async's reports must arrive.
my $metrics_app = write_app( <<'PERL', 'metrics_app.pl' );
use strict; use warnings; use Future::AsyncAwait; use Scalar::Util qw(blessed);
async sub {
    my ($scope, $receive, $send) = @_;
    return if $scope->{type} eq 'lifespan';
    my $m = $IO::Async::Metrics::METRICS;
    my $body = 'metrics=' . ( blessed($m) // ( defined $m ? "plain:$m" : 'undef' ) );
    if ( $ENV{METRICS_ANY_ADAPTER} ) {
        my $reported = Metrics::Any::Adapter::Test->metrics;
        $body .= ' processing=' . ( $reported =~ /^io_async_processing/m ? 1 : 0 );
    }
    await $send->({ type => 'http.response.start', status => 200,
                     headers => [['content-type', 'text/plain']] });
    await $send->({ type => 'http.response.body', body => $body });
};
PERL

SKIP: {
    skip 'Metrics::Any is not installed', 2 unless eval { require Metrics::Any::Collector; 1 };

    subtest 'IO::Async metrics with no adapter: the collector is dropped once settled' => sub {
        my $s = start_server($metrics_app);
        my @seen = map { http_request( $s->port, 'GET', '/' )->{body} // '' } 1 .. 5;
        is $seen[-1], 'metrics=undef', 'after a few requests, $IO::Async::Metrics::METRICS is undef'
          or diag explain \@seen;
        is $s->stop('TERM'), 0, 'stops cleanly';
    };

    subtest 'IO::Async metrics with an adapter configured: kept, and reported' => sub {
        local $ENV{METRICS_ANY_ADAPTER} = 'Test';
        my $s = start_server($metrics_app);
        my @seen = map { http_request( $s->port, 'GET', '/' )->{body} // '' } 1 .. 5;
        is $seen[-1], 'metrics=Metrics::Any::Collector processing=1',
          'the collector stays, and IO::Async reports its processing time'
          or diag explain \@seen;
        is $s->stop('TERM'), 0, 'stops cleanly';
    };
}

done_testing;
