use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;
use File::Temp qw(tempdir);
use File::Spec;
use IO::Socket::INET;
use IO::Select;
use JSON::PP;
use Time::Local qw(timegm);
use Time::HiRes qw(time sleep);

# The lifespan protocol: startup before serving, shared state (shallow copy
# per request), failures, declines, --lifespan modes, startup timeout, and
# shutdown on SIGTERM/SIGINT.

$ENV{PAGI_RS_BIN} = File::Spec->rel2abs( $ENV{PAGI_RS_BIN} ) if defined $ENV{PAGI_RS_BIN};
my $TMP = tempdir( CLEANUP => 1 );

sub get_json {
    my ( $port, $path ) = @_;
    my $res = http_request( $port, 'GET', $path );
    my $data = eval { decode_json( $res->{body} // '' ) };
    diag "bad response for $path: status $res->{status}: " . ( $res->{body} // $res->{raw} // '' ) unless $data;
    return $data // {};
}

# A full lifespan app.  Startup sleeps 1 s (Future::IO), fills state, then
# completes; shutdown writes a marker file.
my $marker = "$TMP/shutdown-marker";
my $state_app = write_app( <<"PERL", 'state_app.pl' );
use strict; use warnings; use Future::AsyncAwait; use Future::IO; use JSON::PP (); use Time::HiRes ();
my \$app = async sub {
    my (\$scope, \$receive, \$send) = \@_;
    if (\$scope->{type} eq 'lifespan') {
        while (1) {
            my \$ev = await \$receive->();
            if (\$ev->{type} eq 'lifespan.startup') {
                \$scope->{state}{startup_began_at} = Time::HiRes::time();
                await Future::IO->sleep(1);
                \$scope->{state}{greeting} = 'set-during-startup';
                \$scope->{state}{shared}   = { n => 0 };
                \$scope->{state}{startup_done_at} = Time::HiRes::time();
                await \$send->({ type => 'lifespan.startup.complete' });
            }
            elsif (\$ev->{type} eq 'lifespan.shutdown') {
                my \$file = \$ENV{PAGI_TEST_MARKER} // '$marker';
                open my \$fh, '>', \$file or die "marker: \$!";
                print \$fh "shutdown-ran greeting=\$scope->{state}{greeting} n=\$scope->{state}{shared}{n}";
                close \$fh;
                await \$send->({ type => 'lifespan.shutdown.complete' });
                return;
            }
        }
    }
    my \$st = \$scope->{state};
    if (\$scope->{path} eq '/add') {
        \$st->{added_by_request} = 'yes';
        \$st->{shared}{n}++;
    }
    my \$body = JSON::PP->new->canonical->encode({
        greeting         => \$st->{greeting},
        has_added        => exists \$st->{added_by_request} ? 1 : 0,
        n                => \$st->{shared}{n},
        startup_done_at  => \$st->{startup_done_at},
        handled_at       => Time::HiRes::time(),
    });
    await \$send->({ type => 'http.response.start', status => 200, headers => [['content-type', 'application/json']] });
    await \$send->({ type => 'http.response.body', body => \$body, more => 0 });
};
\$app;
PERL

sub tracing_epoch {
    my ($line) = @_;
    my ( $y, $mo, $d, $h, $mi, $s, $frac ) = $line =~ /\A(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(\.\d+)?Z/ or return undef;
    return timegm( $s, $mi, $h, $d, $mo - 1, $y ) + ( $frac // 0 );
}

subtest 'startup completes before the first connection is served' => sub {
    my $port = free_port();
    my $t0 = time;
    my $s = spawn_pagi( '-p', $port, $state_app );
    $s->{port} = $port;

    # Connect as early as possible and send a request at once.
    my ( $sock, $t_conn );
    while ( time - $t0 < 10 ) {
        $sock = IO::Socket::INET->new( PeerAddr => '127.0.0.1', PeerPort => $port, Proto => 'tcp', Timeout => 2 );
        if ($sock) { $t_conn = time; last }
        last unless $s->is_running;
        sleep 0.02;
    }
    ok $sock, 'connected' or return diag $s->output;
    $sock->syswrite("GET /first HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n");
    my $early_output = $s->output;

    sleep 0.5 if time - $t0 < 0.5;
    my $mid_output = $s->output;
    my $sel = IO::Select->new($sock);
    my $buf = '';
    my $deadline = time + 10;
    while ( time < $deadline ) {
        $sel->can_read( $deadline - time ) or last;
        $sock->sysread( $buf, 65536, length $buf ) or last;
    }
    my $t_resp = time;
    my $res = parse_response($buf) // {};
    is $res->{status}, 200, 'the early request got 200';
    my $data = eval { decode_json( $res->{body} ) } // {};
    is $data->{greeting}, 'set-during-startup', 'the request sees state set during startup';
    ok defined $data->{startup_done_at} && $data->{handled_at} >= $data->{startup_done_at},
      'the request was handled after startup completed';
    ok $t_resp - $t0 >= 0.9, sprintf( 'the response came after the 1 s startup (%.2f s)', $t_resp - $t0 );
    if ( $t_conn - $t0 < 0.8 ) {
        unlike $early_output, qr/listening on/, 'no startup line yet when the early connection was made';
    }
    unlike $mid_output, qr/listening on/, 'no startup line 0.5 s into the 1 s startup';
    ok $s->wait_output( qr/listening on/, 5 ), 'startup line printed eventually';
    my ($line) = grep { /listening on/ } split /\n/, $s->output;
    my $t_line = tracing_epoch( $line // '' );
    ok defined $t_line && defined $data->{startup_done_at} && $t_line >= $data->{startup_done_at} - 0.005,
      'the startup line is stamped after startup completed'
      or diag sprintf( "line at %s, startup done at %s", $t_line // '?', $data->{startup_done_at} // '?' );
    is $s->stop('TERM'), 0, 'exit 0';
};

# The lifespan scope's pagi hash, as the reference server gives it: the
# core version spoken, lifespan's sub-spec 0.3, and which worker this is.
my $scope_app = write_app( <<'PERL', 'scope_app.pl' );
use strict; use warnings; use Future::AsyncAwait; use JSON::PP ();
async sub {
    my ($scope, $receive, $send) = @_;
    if ($scope->{type} eq 'lifespan') {
        my $ev = await $receive->();
        $scope->{state}{lifespan_pagi} = { %{ $scope->{pagi} } };
        await $send->({ type => 'lifespan.startup.complete' });
        await $receive->();
        await $send->({ type => 'lifespan.shutdown.complete' });
        return;
    }
    my $body = JSON::PP->new->canonical->encode({ pid => $$, pagi => $scope->{state}{lifespan_pagi} });
    await $send->({ type => 'http.response.start', status => 200, headers => [] });
    await $send->({ type => 'http.response.body', body => $body });
};
PERL

subtest "the lifespan scope's pagi: core version, is_worker, worker_num" => sub {
    my $s    = start_server($scope_app);
    my $pagi = get_json( $s->port, '/' )->{pagi};
    is_deeply $pagi, { version => '0.5', spec_version => '0.3', is_worker => 0, worker_num => undef },
      'one process: core 0.5, lifespan 0.3, no worker';
    $s->stop('TERM');

    $s = start_server( '--spec-version', '0.3', $scope_app );
    is get_json( $s->port, '/' )->{pagi}{version}, '0.4', '--spec-version 0.3: core 0.4';
    $s->stop('TERM');

    $s = start_server( '-w', 2, $scope_app );
    my %num_of;
    for ( 1 .. 200 ) {
        my $got = get_json( $s->port, '/' );
        $num_of{ $got->{pid} } = $got->{pagi} if $got->{pid};
        last if keys %num_of == 2;
    }
    is scalar keys %num_of, 2, 'both workers answered';
    is_deeply [ sort map { $_->{worker_num} } values %num_of ], [ 1, 2 ], 'worker_num 1 and 2';
    ok( ( !grep { $_->{is_worker} != 1 } values %num_of ), 'is_worker 1 in each' );
    $s->stop('TERM');
};

subtest 'state is a shallow copy per request' => sub {
    local $ENV{PAGI_TEST_MARKER} = "$TMP/marker-state";
    my $s = start_server($state_app);
    my $port = $s->port;
    my $a1 = get_json( $port, '/add' );
    is $a1->{has_added}, 1, 'the request that added a top-level key sees it';
    is $a1->{n}, 1, 'and bumped the shared counter to 1';
    my $c = get_json( $port, '/check' );
    is $c->{has_added}, 0, 'the next request does not see the added top-level key';
    is $c->{n}, 1, 'but sees the nested hashref mutation (values are shared)';
    is $c->{greeting}, 'set-during-startup', 'startup keys are still there';
    my $a2 = get_json( $port, '/add' );
    is $a2->{n}, 2, 'a second mutation accumulates';
    is $s->stop('TERM'), 0, 'exit 0';
    like slurp("$TMP/marker-state") // '', qr/greeting=set-during-startup n=2/,
      'the lifespan scope sees top-level state it set and the shared mutations';
};

subtest 'lifespan.startup.failed' => sub {
    my $app = write_app( <<'PERL', 'startup_failed.pl' );
use strict; use warnings; use Future::AsyncAwait;
async sub {
    my ($scope, $receive, $send) = @_;
    if ($scope->{type} eq 'lifespan') {
        my $ev = await $receive->();
        await $send->({ type => 'lifespan.startup.failed', message => 'database-unreachable-9911' });
        return;
    }
    await $send->({ type => 'http.response.start', status => 200, headers => [] });
    await $send->({ type => 'http.response.body', body => 'should not serve', more => 0 });
};
PERL
    my $port = free_port();
    my ( $code, $err ) = run_pagi( '-p', $port, $app );
    is $code, 1, 'exit code 1';
    like $err, qr/lifespan startup failed: database-unreachable-9911/, 'stderr carries the message';
    unlike $err, qr/listening on/, 'no startup line';
    ok !IO::Socket::INET->new( PeerAddr => '127.0.0.1', PeerPort => $port, Timeout => 1 ), 'nothing listening afterwards';
};

for my $case ( [ 'raises', 'die "no lifespan here\n"' ], [ 'returns', 'return' ] ) {
    my ( $what, $code ) = @$case;
    subtest "app that $what on lifespan" => sub {
        my $app = write_app( <<"PERL", "decline_$what.pl" );
use strict; use warnings; use Future::AsyncAwait;
async sub {
    my (\$scope, \$receive, \$send) = \@_;
    if (\$scope->{type} eq 'lifespan') { $code; }
    await \$send->({ type => 'http.response.start', status => 200, headers => [['content-type', 'text/plain']] });
    await \$send->({ type => 'http.response.body', body => 'served-anyway', more => 0 });
};
PERL
        my $s = eval { start_server($app) };
        ok $s, 'server started' or return diag $@;
        like $s->output, qr/Lifespan not supported, continuing without it/, 'logs "Lifespan not supported"';
        my $res = http_request( $s->port, 'GET', '/' );
        is $res->{status}, 200, 'serving continues';
        is $res->{body}, 'served-anyway', 'with the app response';
        is $s->stop('TERM'), 0, 'exit 0 on TERM';

        my ( $rc, $err ) = run_pagi( '-p', free_port(), '--lifespan', 'on', $app );
        is $rc, 1, "--lifespan on: an app that $what exits 1";
        like $err, qr/lifespan/i, '--lifespan on: stderr mentions lifespan';
        unlike $err, qr/listening on/, '--lifespan on: no startup line';
    };
}

subtest '--lifespan off never calls the app with a lifespan scope' => sub {
    my $types = "$TMP/scope-types.txt";
    my $app = write_app( <<"PERL", 'lifespan_off.pl' );
use strict; use warnings; use Future::AsyncAwait;
async sub {
    my (\$scope, \$receive, \$send) = \@_;
    open my \$fh, '>>', '$types' or die; print \$fh "\$scope->{type}\\n"; close \$fh;
    if (\$scope->{type} eq 'lifespan') {
        await \$receive->();
        await \$send->({ type => 'lifespan.startup.failed', message => 'lifespan-must-not-run' });
        return;
    }
    await \$send->({ type => 'http.response.start', status => 200, headers => [] });
    await \$send->({ type => 'http.response.body', body => 'off-ok', more => 0 });
};
PERL
    my $s = eval { start_server( '--lifespan', 'off', $app ) };
    ok $s, 'started (the startup.failed it would send never happened)' or return diag $@;
    is http_request( $s->port, 'GET', '/' )->{body}, 'off-ok', 'serves';
    is $s->stop('TERM'), 0, 'exit 0';
    my @types = split /\n/, slurp($types) // '';
    is_deeply \@types, ['http'], 'the app only ever saw an http scope';
    unlike $s->output, qr/lifespan-must-not-run/, 'no lifespan message';
};

subtest '--lifespan-startup-timeout' => sub {
    my $app = write_app( <<'PERL', 'never_starts.pl' );
use strict; use warnings; use Future::AsyncAwait;
our $NEVER;
async sub {
    my ($scope, $receive, $send) = @_;
    if ($scope->{type} eq 'lifespan') {
        await $receive->();
        $NEVER = Future->new;
        await $NEVER;    # never completes startup
    }
    await $send->({ type => 'http.response.start', status => 200, headers => [] });
    await $send->({ type => 'http.response.body', body => 'x', more => 0 });
};
PERL
    my $port = free_port();
    my $t0 = time;
    my ( $code, $err ) = run_pagi( '-p', $port, '--lifespan-startup-timeout', 1, $app );
    my $took = time - $t0;
    ok $code != 0 && $code != -1, "exits non-zero (got $code)";
    ok $took < 3.5, sprintf( 'within ~3 s (%.2f s)', $took );
    ok $took >= 0.9, 'but only after the 1 s timeout';
    like $err, qr/time(?:d)? ?out/i, 'stderr says it timed out';
    unlike $err, qr/listening on/, 'no startup line';
};

subtest 'two receives waiting: the first gets lifespan.shutdown' => sub {
    my $mk  = "$TMP/marker-two-waiting";
    my $app = write_app( <<"PERL", 'two_waiting.pl' );
use strict; use warnings; use Future::AsyncAwait;
my \$app = async sub {
    my (\$scope, \$receive, \$send) = \@_;
    if (\$scope->{type} eq 'lifespan') {
        await \$receive->();
        await \$send->({ type => 'lifespan.startup.complete' });
        my \@waiting = (\$receive->(), \$receive->());
        my \$ev = await \$waiting[0];
        open my \$fh, '>', '$mk' or die "marker: \$!";
        print \$fh "first heard \$ev->{type}, second ready: " . (\$waiting[1]->is_ready ? 1 : 0);
        close \$fh;
        await \$send->({ type => 'lifespan.shutdown.complete' });
        return;
    }
    await \$send->({ type => 'http.response.start', status => 200, headers => [] });
    await \$send->({ type => 'http.response.body', body => 'ok' });
};
\$app;
PERL
    my $s = start_server($app);
    is http_request( $s->port, 'GET', '/' )->{status}, 200, 'started and serving';
    is $s->stop( 'TERM', 15 ), 0, 'exit 0 after SIGTERM';
    is slurp($mk), 'first heard lifespan.shutdown, second ready: 0',
      'the first receive got lifespan.shutdown; the second still waits for an event after it';
};

for my $sig (qw(TERM INT)) {
    subtest "SIG$sig runs lifespan.shutdown and exits 0" => sub {
        my $mk = "$TMP/marker-$sig";
        local $ENV{PAGI_TEST_MARKER} = $mk;
        my $s = start_server($state_app);
        is get_json( $s->port, '/add' )->{n}, 1, 'served a request';
        ok !-e $mk, 'no shutdown marker before the signal';
        my $code = $s->stop( $sig, 15 );
        is $code, 0, "exit code 0 after SIG$sig";
        like slurp($mk) // '', qr/\Ashutdown-ran/, 'the app handled lifespan.shutdown (marker written)';
        like $s->output, qr/Received $sig/, "stderr notes the $sig";
    };
}

done_testing;
