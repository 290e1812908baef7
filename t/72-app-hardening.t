use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;
use PagiRS::SSE;
use PagiRS::WS;
use File::Temp qw(tempdir);
use JSON::PP;
use Time::HiRes qw(time sleep);

# What apps do that the bridge must survive, over real sockets:
# - concurrent sends on one scope (http, sse, websocket; the C fast path and
#   the Perl path): a send made while another is in flight waits its turn,
#   the bytes never interleave, and every Future settles;
# - fh bodies from pipes and sockets stream to EOF, bytes Perl had buffered
#   go first, and a regular file's handle keeps its offset;
# - a body chunk that arrived before the end is received before
#   http.disconnect, even when the app learned of the end first;
# - a response status outside 100-599, or a fraction, fails the $send;
# - a body send waiting for the drain of a 204 or 304 (no body on the wire)
#   settles, and so do sends still waiting when the app returns; such a
#   response ends the scope with its head (a waiting receive hears it).

my $dir = tempdir( CLEANUP => 1 );
my $J   = JSON::PP->new->canonical;

my $A = 'a' x 300_000;
my $B = 'b' x 300_000;
for ( [ A => $A ], [ B => $B ] ) {
    open my $fh, '>', "$dir/$_->[0]" or die $!;
    print $fh $_->[1];
    close $fh;
}
my $PATTERN = join '', map { sprintf "%07d\n", $_ } 0 .. 12_499;    # 100_000 bytes
{
    open my $fh, '>', "$dir/pattern" or die $!;
    print $fh $PATTERN;
    close $fh;
}

my $app_src = <<'APP';
use strict; use warnings; use Future::AsyncAwait; use Future::IO; use JSON::PP;
use Socket; use Scalar::Util qw(blessed);
my $dir = '__DIR__';
# In the server $^X is the pagi-rs binary: run the test's perl instead.
my $perl = '__PERL__';
my $J = JSON::PP->new->canonical;
sub rec {
    my ($case, %what) = @_;
    open my $fh, '>>', "$dir/results" or die "open: $!";
    print $fh $J->encode({ case => $case, %what }), "\n";
    close $fh;
}
sub state_of {
    my ($f) = @_;
    return 'done' if $f->is_done;
    return 'failed: ' . ($f->failure // '') if $f->is_failed;
    return 'cancelled' if $f->is_cancelled;
    return 'pending';
}
# Wait (bounded) until every Future settles; their states, in order.
async sub settled {
    my @f = @_;
    await Future->wait_any(
        Future->wait_all(map { $_->without_cancel } @f),
        Future::IO->sleep(5),
    );
    return [ map { state_of($_) } @f ];
}
my $text = [['content-type', 'text/plain']];
my $BIG = 1_000_000;
my %h;

$h{'/two-files'} = async sub {
    my ($send) = @_;
    await $send->({ type => 'http.response.start', status => 200, headers => $text });
    my $f1 = $send->({ type => 'http.response.body', file => "$dir/A" });
    my $f2 = $send->({ type => 'http.response.body', file => "$dir/B" });
    rec('two-files', states => await settled($f1, $f2));
};
$h{'/body-after-file'} = async sub {
    my ($send) = @_;
    await $send->({ type => 'http.response.start', status => 200, headers => $text });
    my $f1 = $send->({ type => 'http.response.body', file => "$dir/A" });
    my $f2 = $send->({ type => 'http.response.body', body => 'TAIL', more => 0 });
    rec('body-after-file', states => await settled($f1, $f2));
};
$h{'/cancelled-file'} = async sub {
    my ($send) = @_;
    await $send->({ type => 'http.response.start', status => 200, headers => $text });
    my $f1 = $send->({ type => 'http.response.body', file => "$dir/A" });
    $f1->cancel;    # the app gives up waiting; the file is still streaming
    my $f2 = $send->({ type => 'http.response.body', body => 'TAIL', more => 0 });
    rec('cancelled-file', states => await settled($f2));
};
$h{'/bodies'} = async sub {
    my ($send) = @_;
    await $send->({ type => 'http.response.start', status => 200, headers => $text });
    # Far above the high-water mark, and the client reads nothing until
    # all three are made: the first two wait for the buffer to drain.
    my @f = (
        $send->({ type => 'http.response.body', body => 'x' x $BIG, more => 1 }),
        $send->({ type => 'http.response.body', body => 'y' x $BIG, more => 1 }),
        $send->({ type => 'http.response.body', body => 'z', more => 0 }),
    );
    rec('bodies-sent');
    rec('bodies', states => await settled(@f));
};

# The app gives up on a send waiting for the drain (it holds that Future
# itself), then goes on sending: the bytes still go out in order, and the
# later sends wait for the drain and settle.
$h{'/cancelled-drain'} = async sub {
    my ($send) = @_;
    await $send->({ type => 'http.response.start', status => 200, headers => $text });
    my $f1 = $send->({ type => 'http.response.body', body => 'x' x $BIG, more => 1 });
    my $waited = $f1->is_ready ? 'ready' : 'pending';
    $f1->cancel;
    my $f2 = $send->({ type => 'http.response.body', body => 'y' x $BIG, more => 1 });
    my $f3 = $send->({ type => 'http.response.body', body => 'z', more => 0 });
    rec('cancelled-drain-sent', first => $waited);
    rec('cancelled-drain', states => await settled($f2, $f3));
};

# ---- fh bodies ---------------------------------------------------------------

$h{'/fh-pipe'} = async sub {
    my ($send) = @_;
    open my $fh, '-|', $perl, '-e', 'print "p" x 100_000' or die "pipe: $!";
    await $send->({ type => 'http.response.start', status => 200, headers => $text });
    await $send->({ type => 'http.response.body', fh => $fh });
    close $fh;
};
$h{'/fh-pipe-readline'} = async sub {
    my ($send) = @_;
    open my $fh, '-|', $perl, '-e', 'print "first line\n", "0123456789" x 10_000' or die "pipe: $!";
    my $first = <$fh>;    # Perl reads ahead: most of the rest is in its buffer
    rec('fh-pipe-readline', first => $first);
    await $send->({ type => 'http.response.start', status => 200, headers => $text });
    await $send->({ type => 'http.response.body', fh => $fh });
    close $fh;
};
$h{'/fh-pipe-length'} = async sub {
    my ($send) = @_;
    open my $fh, '-|', $perl, '-e', 'print "0123456789" x 10' or die "pipe: $!";
    await $send->({ type => 'http.response.start', status => 200, headers => $text });
    await $send->({ type => 'http.response.body', fh => $fh, length => 7 });
    close $fh;
};
$h{'/fh-pipe-offset'} = async sub {
    my ($send) = @_;
    open my $fh, '-|', $perl, '-e', 'print "0123456789"' or die "pipe: $!";
    await $send->({ type => 'http.response.start', status => 200, headers => $text });
    my $ok = eval { await $send->({ type => 'http.response.body', fh => $fh, offset => 3 }); 1 };
    my $err = $ok ? '' : "$@";
    close $fh;
    await $send->({ type => 'http.response.body', body => "refused: $err" });
};
$h{'/fh-socket'} = async sub {
    my ($send) = @_;
    socketpair(my $r, my $w, AF_UNIX, SOCK_STREAM, PF_UNSPEC) or die "socketpair: $!";
    binmode $w;
    print $w "s" x 50_000;
    close $w;
    await $send->({ type => 'http.response.start', status => 200, headers => $text });
    await $send->({ type => 'http.response.body', fh => $r });
    close $r;
};
$h{'/fh-file-offset'} = async sub {
    my ($send) = @_;
    open my $fh, '<', "$dir/pattern" or die $!;
    read($fh, my $head, 10);
    my $os_before = sysseek($fh, 0, 1);
    await $send->({ type => 'http.response.start', status => 200, headers => $text });
    await $send->({ type => 'http.response.body', fh => $fh });
    my $os_after = sysseek($fh, 0, 1);
    my $rest = do { local $/; <$fh> };
    rec('fh-file-offset', head => $head, os_before => $os_before, os_after => $os_after,
        rest_length => length $rest, rest_ok => ($rest eq substr(do { open my $p, '<', "$dir/pattern"; local $/; <$p> }, 10) ? 1 : 0));
};
$h{'/fh-silent-pipe'} = async sub {
    my ($send) = @_;
    my $pid = open my $fh, '-|', $perl, '-e', 'sleep 30' or die "pipe: $!";
    await $send->({ type => 'http.response.start', status => 200, headers => $text });
    my $f = $send->({ type => 'http.response.body', fh => $fh });
    rec('fh-silent-pipe-started', writer => $pid);
    my $states = await settled($f);
    rec('fh-silent-pipe', states => $states);
    kill 'KILL', $pid;
    close $fh;
};

# ---- response status -----------------------------------------------------------

$h{'/status'} = async sub {
    my ($send, $scope) = @_;
    # The status as the query spells it ("200.5", "-1"); with "&nv" as a
    # number rather than a string.
    my ($status, $nv) = $scope->{query_string} =~ /\A(-?[0-9.]+(?:e[0-9]+)?)(&nv)?\z/;
    $status += 0 if $nv;
    my $ok = eval { await $send->({ type => 'http.response.start', status => $status, headers => $text }); 1 };
    if ($ok) {
        await $send->({ type => 'http.response.body', body => "accepted $status" });
        return;
    }
    my $err = "$@";
    await $send->({ type => 'http.response.start', status => 200, headers => $text });
    await $send->({ type => 'http.response.body', body => "refused: $err" });
};

# A 204 or 304 has no body on the wire: a body send that waits for the drain
# (its first body event, which releases the head, is far above the mark) is
# released when hyper drops the body, not left pending for ever.
$h{'/bodiless'} = async sub {
    my ($send, $scope) = @_;
    my ($status) = $scope->{query_string} =~ /(\d+)/;
    await $send->({ type => 'http.response.start', status => $status, headers => [] });
    my $f = $send->({ type => 'http.response.body', body => 'x' x $BIG, more => 1 });
    rec("bodiless-$status", states => await settled($f));
};
# The app returns with its sends still waiting (for the drain, for the
# flush): they settle as the network takes the bytes, though the app's
# call is over.
my %kept;
$h{'/return-while-waiting'} = async sub {
    my ($send) = @_;
    await $send->({ type => 'http.response.start', status => 200, headers => $text });
    my @f = (
        $send->({ type => 'http.response.body', body => 'w' x $BIG, more => 0 }),
        $send->({ type => 'http.fullflush' }),
    );
    $kept{waiting} = Future->wait_all(@f)->on_ready(sub {
        rec('return-while-waiting', states => [ map { state_of($_) } @f ]);
        delete $kept{waiting};
    });
    return;
};
# The same response with the app waiting for the end, its body event not
# yet the last: a 204, a 304 or a HEAD response is whole once its head is
# out, and a receive waiting for the disconnect hears the end.
$h{'/bodiless-waits'} = async sub {
    my ($send, $scope, $receive) = @_;
    my ($status) = $scope->{query_string} =~ /(\d+)/;
    await $send->({ type => 'http.response.start', status => $status, headers => [] });
    await $send->({ type => 'http.response.body', body => 'x', more => 1 });
    my $first = await $receive->();
    my $end = await Future->wait_any($receive->(),
        Future::IO->sleep(5)->then(sub { Future->done({ type => 'still waiting' }) }));
    rec("bodiless-waits-$scope->{method}-$status", events => [ $first->{type}, $end->{type} ]);
};
$h{'/plain'} = async sub {
    my ($send) = @_;
    await $send->({ type => 'http.response.start', status => 200, headers => [['content-length', 3]] });
    await $send->({ type => 'http.response.body', body => "ok\n" });
};

# ---- body chunks before http.disconnect ----------------------------------------

$h{'/order'} = async sub {
    my ($send, $scope, $receive) = @_;
    my $conn = $scope->{'pagi.connection'};
    my @seen;
    my $ev = await $receive->();
    push @seen, "$ev->{type}:" . ($ev->{body} // '');
    rec('order-first', seen => \@seen);
    # Busy for a while (no loop turn): meanwhile the client's next chunk
    # is read, and --request-timeout ends the request.
    select(undef, undef, undef, 2.5);
    push @seen, 'connected:' . $conn->is_connected;
    while (1) {
        my $ev = await Future->wait_any($receive->(), Future::IO->sleep(3)->then(sub { Future->done({ type => 'timeout' }) }));
        push @seen, "$ev->{type}:" . ($ev->{body} // '');
        last if $ev->{type} ne 'http.request';
    }
    rec('order', seen => \@seen);
};

my $app = async sub {
    my ($scope, $receive, $send) = @_;
    return if $scope->{type} eq 'lifespan';
    my $path = $scope->{path};
    if ($scope->{type} eq 'sse') {
        await $send->({ type => 'sse.start' });
        my @f = (
            $send->({ type => 'sse.send', data => 'x' x $BIG }),
            $send->({ type => 'sse.send', data => 'y' x $BIG }),
            $send->({ type => 'sse.close' }),
        );
        rec('sse-sent');
        rec('sse', states => await settled(@f));
        return;
    }
    if ($scope->{type} eq 'websocket') {
        my $c = await $receive->();
        await $send->({ type => 'websocket.accept' });
        my @f = (
            $send->({ type => 'websocket.send', text => 'x' x $BIG }),
            $send->({ type => 'websocket.send', text => 'y' x $BIG }),
            $send->({ type => 'websocket.close', code => 1000 }),
        );
        rec('websocket-sent');
        rec('websocket', states => await settled(@f));
        while (1) { my $e = await $receive->(); last if $e->{type} eq 'websocket.disconnect' }
        return;
    }
    my $handler = $h{$path} or die "no route $path";
    await $handler->($send, $scope, $receive);
};
$app;
APP
$app_src =~ s/__DIR__/$dir/g;
$app_src =~ s/__PERL__/$^X/g;
my $server = start_server( write_app($app_src) );
my $port   = $server->port;

# The app's record for $case (waits for it up to $timeout seconds).
sub result {
    my ( $case, $timeout ) = @_;
    my $line = wait_file_line( "$dir/results", qr/"case":"\Q$case\E"/, $timeout // 8 );
    return $line ? $J->decode($line) : {};
}

sub get {
    my ( $path, %o ) = @_;
    return http_request( $port, 'GET', $path, timeout => 10, %o );
}

# ---- 7. concurrent sends ---------------------------------------------------------

subtest 'two un-awaited file sends: the second waits its turn' => sub {
    my $res = get('/two-files');
    is $res->{status}, 200, 'answered';
    ok $res->{body} eq $A, 'the body is the first file, whole, with no byte of the second'
      or diag 'body: ' . length( $res->{body} ) . ' bytes, ' . ( $res->{body} =~ tr/b// ) . " b's";
    my $r = result('two-files');
    is $r->{states}[0], 'done', 'the first send settles';
    like $r->{states}[1] // '', qr/^failed: .*already complete/, 'the second, made in its turn, fails: the body was complete';
};

subtest 'a body send while a file send is in flight (the C fast path) waits its turn' => sub {
    my $res = get('/body-after-file');
    is $res->{status}, 200, 'answered';
    ok $res->{body} eq $A, 'the file bytes are not interleaved with the body event'
      or diag 'TAIL at ' . index( $res->{body}, 'TAIL' ) . ' of ' . length( $res->{body} );
    my $r = result('body-after-file');
    is $r->{states}[0], 'done', 'the file send settles';
    like $r->{states}[1] // '', qr/^failed: /, 'the body send fails in its turn (the file completed the body)';
};

subtest 'cancelling the pending Future does not let the next send jump the queue' => sub {
    my $res = get('/cancelled-file');
    ok $res->{body} eq $A, 'the file streams whole'
      or diag 'TAIL at ' . index( $res->{body} // '', 'TAIL' );
    like result('cancelled-file')->{states}[0] // '', qr/^failed: /, 'the next send waited for the file, then failed';
};

my $BIG = 1_000_000;

subtest 'un-awaited body sends above the high-water mark all settle, in order' => sub {
    my $sock = connect_port($port);
    $sock->syswrite("GET /bodies HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    ok result('bodies-sent'), 'the app made its three sends before the client read';
    my ($raw) = read_sock( $sock, undef, 15 );
    my $res = parse_response($raw) // {};
    ok $res->{body} eq ( 'x' x $BIG ) . ( 'y' x $BIG ) . 'z', 'the bytes, in order'
      or diag 'got ' . length( $res->{body} // '' ) . ' bytes';
    is_deeply result('bodies')->{states}, [qw(done done done)], 'every Future settles';
};

subtest 'a drain wait the app cancels: later sends keep their order and settle' => sub {
    my $sock = connect_port($port);
    $sock->syswrite("GET /cancelled-drain HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    my ($raw) = read_sock( $sock, undef, 15 );
    my $res = parse_response($raw) // {};
    is result('cancelled-drain-sent')->{first}, 'pending', 'the first send waited for the drain';
    ok $res->{body} eq ( 'x' x $BIG ) . ( 'y' x $BIG ) . 'z', 'the bytes, in order'
      or diag 'got ' . length( $res->{body} // '' ) . ' bytes';
    is_deeply result('cancelled-drain')->{states}, [qw(done done)], 'the later sends settle';
};

subtest 'un-awaited sse.send events above the high-water mark all settle' => sub {
    my $c = PagiRS::SSE->open( $port, '/sse' );
    is $c->status, 200, 'stream opened';
    ok result('sse-sent'), 'the app made its sends before the client read';
    my @events = $c->all_events(15);
    is_deeply [ map { length $_->{data} } @events ], [ $BIG, $BIG ], 'both events, in order';
    is_deeply result('sse')->{states}, [qw(done done done)], 'every Future settles';
};

subtest 'un-awaited websocket.send messages above the high-water mark all settle' => sub {
    my $ws = PagiRS::WS->connect( $port, path => '/ws' );
    ok $ws->upgraded, 'upgraded';
    ok result('websocket-sent'), 'the app made its sends before the client read';
    my $m1 = $ws->recv_message(15);
    my $m2 = $ws->recv_message(15);
    ok( ( $m1->{data} // '' ) eq 'x' x $BIG, 'first message whole' );
    ok( ( $m2->{data} // '' ) eq 'y' x $BIG, 'second message after it' );
    is scalar $ws->wait_close(8), 1000, 'then the close';
    is_deeply result('websocket')->{states}, [qw(done done done)], 'every Future settles';
};

# ---- 8. fh bodies from pipes and sockets ----------------------------------------------

subtest 'an fh body from a pipe streams until EOF' => sub {
    my $res = get('/fh-pipe');
    is $res->{status}, 200, 'answered';
    ok !$res->{incomplete}, 'complete';
    is length( $res->{body} // '' ), 100_000, 'every byte';
    ok $res->{body} eq 'p' x 100_000, 'the pipe output';
};

subtest 'bytes Perl had already buffered from a pipe go first' => sub {
    my $res = get('/fh-pipe-readline');
    is result('fh-pipe-readline')->{first}, "first line\n", 'the app read its first line';
    ok $res->{body} eq '0123456789' x 10_000, 'the body is the rest of the pipe, exactly'
      or diag 'got ' . length( $res->{body} // '' ) . ' bytes';
};

subtest 'length limits a pipe' => sub {
    is get('/fh-pipe-length')->{body}, '0123456', 'seven bytes';
};

subtest 'an offset on a pipe fails the send with a clear error' => sub {
    like get('/fh-pipe-offset')->{body}, qr/^refused: .*offset.*regular file/, 'refused, saying why';
};

subtest 'an fh body from a socket streams until EOF' => sub {
    my $body = get('/fh-socket')->{body} // '';
    ok $body eq 's' x 50_000, 'the socket data' or diag 'got ' . length($body) . ' bytes';
};

subtest "a regular file is read by position: the app's handle keeps its offset" => sub {
    my $res = get('/fh-file-offset');
    ok $res->{body} eq substr( $PATTERN, 10 ), 'the body starts where Perl had read to'
      or diag 'got ' . length( $res->{body} // '' ) . ' bytes';
    my $r = result('fh-file-offset');
    is $r->{head}, substr( $PATTERN, 0, 10 ), 'the app had read ten bytes';
    is $r->{os_after}, $r->{os_before}, 'the descriptor offset did not move';
    is $r->{rest_length}, 100_000 - 10, 'the app still reads the rest of the file from its handle';
    is $r->{rest_ok}, 1, 'byte for byte';
};

subtest 'a silent pipe stops streaming when the client leaves' => sub {
    my $sock = connect_port($port);
    $sock->syswrite("GET /fh-silent-pipe HTTP/1.1\r\nHost: x\r\n\r\n");
    ok result('fh-silent-pipe-started')->{writer}, 'the app started the send';
    # A reset: a plain FIN before any response byte reads as a half-close,
    # which is answered (t/45-framing-hardening.t).
    abort_close($sock);
    is_deeply result('fh-silent-pipe')->{states}, ['done'], 'the send settles once the client is gone';
};

# ---- 13. response status ------------------------------------------------------------

subtest 'a status outside 100-599, or not an integer, fails the $send' => sub {
    for my $status ( 600, 999, 1000, 99, -1 ) {
        my $res = get("/status?$status");
        is $res->{status}, 200, "$status: the app answered after the failure";
        like $res->{body}, qr/^refused: .*status \Q$status\E is outside 100-599/, "$status: a clear error";
    }
    like get('/status?101')->{body}, qr/^refused: .*informational/, '1xx is not a final status';
    for my $q ( '200.5', '200.5&nv', '404.25' ) {
        like get("/status?$q")->{body}, qr/^refused: .*integer 'status'/, "$q: a fraction is no status (not truncated)";
    }
    for my $q ( '201.0', '201.0&nv', '2.01e2' ) {
        is get("/status?$q")->{status}, 201, "$q: a number whose value is an integer is that status";
    }
    my $res = get('/status?599');
    is $res->{status}, 599, '599 is accepted';
};

subtest 'a body send held by the drain on a 204 or 304 settles' => sub {
    for my $status ( 204, 304 ) {
        # A request pipelined behind it is answered meanwhile: the
        # connection has finished with the bodiless response.
        my $raw = raw_request( $port,
            "GET /bodiless?$status HTTP/1.1\r\nHost: x\r\n\r\nGET /plain HTTP/1.1\r\nHost: x\r\n\r\n",
            until => qr/\r\n\r\nok\n\z/ );
        like $raw, qr{^HTTP/1\.1 $status .*\r\n\r\nHTTP/1\.1 200 .*\r\n\r\nok\n\z}s,
          "$status: no body bytes, then the pipelined answer";
        is_deeply result("bodiless-$status")->{states}, ['done'], "$status: the waiting body send settles";
    }
};

subtest 'a response with no body on the wire ends the scope with its head' => sub {
    for my $case ( [ GET => 204 ], [ GET => 304 ], [ HEAD => 200 ] ) {
        my ( $method, $status ) = @$case;
        my $res = http_request( $port, $method, "/bodiless-waits?$status", timeout => 10 );
        is $res->{status}, $status, "$method $status: answered";
        is_deeply result("bodiless-waits-$method-$status")->{events}, [ 'http.request', 'http.disconnect' ],
          "$method $status: the receive waiting for the end hears it";
    }
};

subtest 'sends still waiting when the app returns settle' => sub {
    my $res = get('/return-while-waiting');
    is length( $res->{body} // '' ), 1_000_000, 'the whole body arrives';
    is_deeply result('return-while-waiting')->{states}, [ 'done', 'done' ],
      'the body send and the flush settle after the app returned';
};

is $server->stop('TERM'), 0, 'server exits 0';

# ---- 12. body chunks before http.disconnect ---------------------------------------------

subtest 'a body chunk that arrived before the end is received before http.disconnect' => sub {
    my $s = start_server( '--request-timeout', 1, write_app($app_src) );
    my $sock = connect_port( $s->port );
    $sock->syswrite("POST /order HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\naaaaa");
    ok result('order-first'), 'the app received the first chunk';
    $sock->syswrite('bbb');    # the request stays incomplete: 8 of 10 bytes
    my $r = result( 'order', 12 );
    is_deeply $r->{seen}, [ 'http.request:aaaaa', 'connected:0', 'http.request:bbb', 'http.disconnect:' ],
      'the second chunk, then the disconnect'
      or diag explain $r;
    close $sock;
    is $s->stop('TERM'), 0, 'server exits 0';
};

done_testing;
