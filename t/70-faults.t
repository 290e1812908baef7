use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;
use File::Temp qw(tempdir);
use IO::Select;
use POSIX qw(WNOHANG _exit);
use Time::HiRes qw(time sleep);

# Application faults: invalid events, dying/exiting/leaking apps, dying
# timers.  Each must fail only the request (or the send) concerned; the
# server keeps serving, which a control request to a healthy route checks
# during and after every fault.

my $dir = tempdir( CLEANUP => 1 );

my $app = write_app( <<"APP" );
use strict; use warnings; use Future::AsyncAwait; use Future::IO; use IO::Async::Loop;
my \$dir = '$dir';
sub rec {
    my (\$file, \@f) = \@_;
    open my \$fh, '>>', "\$dir/\$file" or die "open \$dir/\$file: \$!";
    print \$fh join(' ', \@f), "\\n";
    close \$fh;
}
my \$plain = [['content-type', 'text/plain']];
our \@LEAK;
our \@KEEP;
my %bad = (
    crlf => ['x-note', "fine\\r\\nX-Injected: evil"],
    lf   => ['x-note', "fine\\nX-Injected: evil"],
    nul  => ['x-note', "fine\\0X-Injected: evil"],
    name => ['x injected', 'evil'],
);
my \$app = async sub {
    my (\$scope, \$receive, \$send) = \@_;
    return if \$scope->{type} eq 'lifespan';
    my \$path = \$scope->{path};
    my \$c = \$scope->{'pagi.connection'};
    my \$reply = async sub {
        my (\$body, \@h) = \@_;
        await \$send->({ type => 'http.response.start', status => 200, headers => [\@\$plain, \@h] });
        await \$send->({ type => 'http.response.body', body => \$body, more => 0 });
    };

    if (\$path eq '/ok') {
        await \$reply->('ok');
        return;
    }
    if (\$path =~ m{^/inject/(\\w+)\$}) {
        my \$ok = eval {
            await \$send->({ type => 'http.response.start', status => 200, headers => [\@\$plain, \$bad{\$1}] });
            1;
        };
        my \$err = \$ok ? 'NO ERROR' : "\$@";
        await \$reply->("caught: \$err", ['x-caught', 'yes']);
        return;
    }
    if (\$path eq '/bogus-event') {
        my \$ok = eval { await \$send->({ type => 'http.response.bogus', body => 'x' }); 1 };
        await \$reply->(\$ok ? 'NO ERROR' : "caught: \$@");
        return;
    }
    if (\$path eq '/die-before-start') {
        die "fault-test-die-before-start\\n";
    }
    if (\$path eq '/no-response') {
        return;
    }
    if (\$path eq '/die-late') {
        rec('late', 'started');
        await Future::IO->sleep(0.5);
        rec('late', 'dying', \$c->is_connected, \$c->disconnect_reason // 'undef');
        die "fault-test-late-death\\n";
    }
    if (\$path eq '/exit') {
        rec('exit', 'calling exit');
        exit(3);
    }
    if (\$path eq '/timer-watch') {
        IO::Async::Loop->new->watch_time(after => 0.2, code => sub { die "fault-test-timer-death-watch\\n" });
        await \$reply->('timer armed');
        return;
    }
    if (\$path eq '/timer-delay') {
        my \$f = IO::Async::Loop->new->delay_future(after => 0.2);
        \$f->on_done(sub { die "fault-test-timer-death-delay\\n" });
        push \@KEEP, \$f;
        await \$reply->('timer armed');
        return;
    }
    if (\$path eq '/wide') {
        await \$send->({ type => 'http.response.start', status => 200, headers => \$plain });
        my \$ok = eval { await \$send->({ type => 'http.response.body', body => "smile \\x{263A}", more => 0 }); 1 };
        my \$err = \$ok ? 'NO ERROR' : "\$@";
        \$err =~ s/[^\\x00-\\x7f]/?/g;
        await \$send->({ type => 'http.response.body', body => "caught: \$err", more => 0 });
        return;
    }
    if (\$path eq '/leak') {
        push \@LEAK, 'L' x (1024 * 1024);
        await \$reply->(scalar \@LEAK);
        return;
    }
    await \$send->({ type => 'http.response.start', status => 404, headers => \$plain });
    await \$send->({ type => 'http.response.body', body => 'not found', more => 0 });
};
\$app;
APP

# The lines the app recorded in $dir/$name; wait for one matching $re.
sub slurp_lines   { file_lines("$dir/$_[0]") }
sub wait_for_line { my ( $name, @wait ) = @_; wait_file_line( "$dir/$name", @wait ) }

my $server = start_server( '--no-access-log', $app );
my $port   = $server->port;

# Read a response.  Stops when the peer closes, at $timeout, or (unless
# $want_close) as soon as one complete response has arrived.
sub read_response {
    my ( $sock, $timeout, $want_close ) = @_;
    my $buf = '';
    my $sel = IO::Select->new($sock);
    my $deadline = time + $timeout;
    my $closed = 0;
    while ( time < $deadline ) {
        if ( !$want_close ) {
            my $r = parse_response($buf);
            last if $r && !$r->{incomplete} && ( $r->{complete} || !exists $r->{trailers} );
        }
        last unless $sel->can_read( $deadline - time );
        my $n = $sock->sysread( $buf, 65536, length $buf );
        if ( !$n ) { $closed = 1; last }
    }
    return ( $buf, $closed );
}

sub control_ok {
    my ($label) = @_;
    my $res = http_request( $port, 'GET', '/ok', timeout => 5 );
    is( ( $res->{status} // 0 ) . ' ' . ( $res->{body} // '' ), '200 ok', "control request $label succeeds" );
}

# Send a keep-alive request for $path; while it is in flight, run a control
# request on another connection; then read the faulty response (with
# want_close, until the server closes the connection).  Returns (parsed, raw, closed).
sub fault {
    my ( $path, $label, %o ) = @_;
    my $sock = connect_port($port);
    $sock->syswrite("GET $path HTTP/1.1\r\nHost: 127.0.0.1:$port\r\n\r\n");
    control_ok("in parallel with $label");
    my ( $raw, $closed ) = read_response( $sock, $o{timeout} // 3, $o{want_close} );
    control_ok("after $label");
    return ( parse_response($raw) // { status => 0 }, $raw, $closed );
}

sub head_of { my ($raw) = @_; my $i = index( $raw, "\r\n\r\n" ); $i < 0 ? $raw : substr( $raw, 0, $i ) }

# ---------------------------------------------------------------------------
# Header injection: the send fails, nothing reaches the wire.
for my $kind (qw(crlf lf nul name)) {
    my ( $res, $raw ) = fault( "/inject/$kind", "header injection ($kind)" );
    my $head = head_of($raw);
    is $res->{status}, 200, "inject $kind: the app's second, valid http.response.start went out (200)";
    is $res->{headers}{'x-caught'}[0], 'yes', "inject $kind: the response is the one from the second start";
    like $res->{body} // '', qr/^caught: \S/, "inject $kind: the bad send failed and the app caught it with eval"
      or diag "body: " . ( $res->{body} // '' );
    unlike $res->{body} // '', qr/NO ERROR/, "inject $kind: the bad send did not succeed";
    unlike $head, qr/x-injected|evil/i, "inject $kind: the injected header never reached the wire";
    unlike $head, qr/^x-note:/mi, "inject $kind: nothing of the failed start was written";
}

# ---------------------------------------------------------------------------
# Unknown event type.
{
    my ($res) = fault( '/bogus-event', 'unknown event type' );
    is $res->{status}, 200, 'unknown event: the app could still respond';
    like $res->{body} // '', qr/^caught: .*Unrecognised event type/s,
      'unknown event: the send failed with "Unrecognised event type"'
      or diag "body: " . ( $res->{body} // '' );
}

# ---------------------------------------------------------------------------
# The app dies before starting a response.
{
    my ( $res, $raw, $closed ) = fault( '/die-before-start', 'app dying before start', want_close => 1 );
    is $res->{status}, 500, 'die before start: 500';
    is $res->{headers}{'content-type'}[0], 'text/plain', 'die before start: text/plain';
    is $res->{body}, 'Internal Server Error', 'die before start: body "Internal Server Error"';
    ok $closed, 'die before start: the server closed the (keep-alive) connection';
    ok $server->wait_output( qr/PAGI application error: fault-test-die-before-start/, 3 ),
      'die before start: stderr has "PAGI application error: <message>"';
}

# ---------------------------------------------------------------------------
# The app returns without responding.
{
    my ( $res, $raw, $closed ) = fault( '/no-response', 'app returning without a response', want_close => 1 );
    is $res->{status}, 500, 'no response: 500';
    is $res->{body}, 'Internal Server Error', 'no response: body "Internal Server Error"';
    ok $closed, 'no response: the server closed the connection';
    ok $server->wait_output( qr/returned without starting a response/, 3 ),
      'no response: stderr says "returned without starting a response"';
}

# ---------------------------------------------------------------------------
# The app dies after the client has gone: no 500, no error log.
{
    my $sock = connect_port($port);
    $sock->syswrite("GET /die-late HTTP/1.1\r\nHost: 127.0.0.1:$port\r\n\r\n");
    ok defined wait_for_line( 'late', qr/^started/, 5 ), 'die after disconnect: the app started';
    abort_close($sock);    # a FIN alone would be a half-close (t/45-framing-hardening.t)
    control_ok('while the app of a vanished client sleeps');
    my $line = wait_for_line( 'late', qr/^dying/, 5 );
    is $line, 'dying 0 client_closed', 'die after disconnect: the app saw the disconnect before dying';
    sleep 0.5;
    unlike $server->output, qr/fault-test-late-death/,
      'die after disconnect: no "PAGI application error" (nor anything) logged for that death';
    control_ok('after an app died for a vanished client');
}

# ---------------------------------------------------------------------------
# exit() inside a request.
{
    my ( $res, $raw, $closed ) = fault( '/exit', 'app calling exit(3)' );
    is $res->{status}, 500, 'exit: the client gets a 500';
    ok defined wait_for_line( 'exit', qr/calling exit/, 2 ), 'exit: the app really called exit';
    ok $server->is_running, 'exit: the server is still running';
    my $again = http_request( $port, 'GET', '/ok' );
    is $again->{status}, 200, 'exit: the next request is fine';
}

# ---------------------------------------------------------------------------
# A timer callback that dies.
for my $kind (qw(watch delay)) {
    my ($res) = fault( "/timer-$kind", "a dying timer ($kind)" );
    is $res->{status}, 200, "timer $kind: the request that armed the timer got 200";
    ok $server->wait_output( qr/fault-test-timer-death-$kind/, 3 ), "timer $kind: stderr mentions the die";
    sleep 0.2;
    ok $server->is_running, "timer $kind: the server is still running";
    control_ok("after a dying timer ($kind) fired");
}
like $server->output, qr/Uncaught exception in an event loop callback/,
  'timers: the die is logged as an uncaught exception in an event loop callback';

# ---------------------------------------------------------------------------
# Wide characters in a body.
{
    my ($res) = fault( '/wide', 'a wide-character body' );
    is $res->{status}, 200, 'wide: 200 (the start went out)';
    like $res->{body} // '', qr/^caught: .*wide char/is, 'wide: the send failed with a message about wide characters'
      or diag "body: " . ( $res->{body} // '' );
    unlike $res->{body} // '', qr/smile/, 'wide: nothing of the failed body was written';
}

# ---------------------------------------------------------------------------
# A leaking app keeps serving; concurrent requests succeed.
{
    my @kids;
    for my $k ( 1 .. 2 ) {
        my $pid = fork // die "fork: $!";
        if ( !$pid ) {
            my $fail = 0;
            for ( 1 .. 100 ) {
                my $r = eval { http_request( $port, 'GET', '/leak', timeout => 10 ) };
                $fail++ unless $r && ( $r->{status} // 0 ) == 200 && ( $r->{body} // '' ) =~ /^\d+$/;
            }
            _exit( $fail > 250 ? 250 : $fail );
        }
        push @kids, $pid;
    }
    my ( $ctl_ok, $ctl_fail ) = ( 0, 0 );
    my %status;
    my $deadline = time + 40;
    while ( @kids && time < $deadline ) {
        my $r = http_request( $port, 'GET', '/ok', timeout => 5 );
        ( ( $r->{status} // 0 ) == 200 && ( $r->{body} // '' ) eq 'ok' ) ? $ctl_ok++ : $ctl_fail++;
        for my $pid (@kids) {
            if ( waitpid( $pid, WNOHANG ) == $pid ) { $status{$pid} = $? >> 8 }
        }
        @kids = grep { !exists $status{$_} } @kids;
        sleep 0.02;
    }
    kill 'KILL', @kids if @kids;
    waitpid( $_, 0 ) for @kids;
    ok !@kids, 'leak: both leaking clients finished in time';
    is join( ',', sort values %status ), '0,0', 'leak: all 200 leaking requests succeeded (failures per client)';
    cmp_ok $ctl_ok, '>', 0, "leak: control requests ran concurrently ($ctl_ok)";
    is $ctl_fail, 0, 'leak: no concurrent control request failed';
    my $r = http_request( $port, 'GET', '/leak' );
    cmp_ok $r->{body} // 0, '>=', 201, 'leak: the app really leaked (its global array holds every MB)';
    control_ok('after the leak');
}

ok $server->is_running, 'the server survived every fault';
is $server->stop('TERM'), 0, 'server exits 0 on SIGTERM';

done_testing;
