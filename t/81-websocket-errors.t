use strict;
use warnings;
use utf8;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;
use PagiRS::WS;
use File::Temp qw(tempdir);
use JSON::PP;
use Encode ();
use Time::HiRes qw(time sleep);

# WebSocket endings: every websocket.disconnect pairing (peer close codes,
# drops, protocol errors, invalid UTF-8, frame size and receive-queue limits,
# app returning without a close, server shutdown, idle timeout), the Close
# frame the server sends for each, the access log reason, and receive()
# after the end.

my $dir = tempdir( CLEANUP => 1 );
my $J   = JSON::PP->new->canonical->utf8->allow_nonref;

my $app = write_app( <<"APP" );
use strict; use warnings; use Future::AsyncAwait; use Future::IO;
use JSON::PP; use Time::HiRes qw(time);
my \$dir = '$dir';
my \$J = JSON::PP->new->canonical->utf8->allow_nonref;
sub rec {
    my (\$file, \$data) = \@_;
    open my \$fh, '>>', "\$dir/\$file" or die "open \$dir/\$file: \$!";
    print \$fh \$J->encode(\$data), "\\n";
    close \$fh;
}
sub query { my (\$s) = \@_; return { map { split /=/, \$_, 2 } split /&/, \$s->{query_string} // '' } }
async sub try_send {
    my (\$send, \$ev) = \@_;
    my \$ok = eval { await \$send->(\$ev); 1 };
    return \$ok ? 'ok' : 'fail: ' . \$@;
}
my \$app = async sub {
    my (\$scope, \$receive, \$send) = \@_;
    return if \$scope->{type} eq 'lifespan';
    my \$path = \$scope->{path};
    my \$q = query(\$scope);
    my \$name = \$q->{name} // 'x';
    my \$c = \$scope->{'pagi.connection'};

    if (\$path eq '/rec') {
        # Record every event until the end; then probe receive/send afterwards.
        \$c->on_disconnect(sub { rec("\$name.cb", { event => 'disconnect', reason => \$_[0] }) });
        \$c->on_complete(sub { rec("\$name.cb", { event => 'complete' }) });
        await \$receive->();
        await \$send->({ type => 'websocket.accept' });
        await \$send->({ type => 'websocket.send', text => 'ready' });
        await Future::IO->sleep(\$q->{sleep}) if \$q->{sleep};
        my \$end;
        while (1) {
            my \$ev = await \$receive->();
            rec("\$name.events", \$ev);
            if (\$ev->{type} eq 'websocket.disconnect') { \$end = \$ev; last }
            await try_send(\$send, { type => 'websocket.send', text => 'answer' }) if \$q->{answer};
        }
        my %a;
        \$a{is_connected} = \$c->is_connected ? 1 : 0;
        \$a{send_after_end}  = await try_send(\$send, { type => 'websocket.send', text => 'late' });
        \$a{close_after_end} = await try_send(\$send, { type => 'websocket.close', code => 1000 });
        # receive() after the end: copies of the same disconnect, then a failure.
        my (\$copies, \$same, \$failure) = (0, 0, undef);
        my \$prev = \$end;
        for my \$i (1 .. 110) {
            my \$f = \$receive->();
            if (!\$f->is_ready) { \$failure = 'pending'; last }
            if (\$f->is_failed) { (\$failure) = \$f->failure; last }
            my \$ev = \$f->get;
            \$copies++;
            \$same++ if \$J->encode(\$ev) eq \$J->encode(\$end) && \$ev != \$prev;
            \$ev->{code} = 'mutated';
            \$prev = \$ev;
        }
        \$a{copies} = \$copies;
        \$a{same} = \$same;
        \$a{failure} = \$failure;
        rec("\$name.after", \\%a);
        return;
    }
    if (\$path eq '/spin') {
        # Keep sending while the receive of the end is pending: once the
        # socket ends, the pending receive must be ready before the next send.
        await \$receive->();
        await \$send->({ type => 'websocket.accept' });
        my \$rf = \$receive->();
        my (\$i, \$after_end) = (0, 0);
        while (!\$rf->is_ready) {
            \$after_end++ unless \$c->is_connected;
            last if \$after_end > 200;
            await \$send->({ type => 'websocket.send', bytes => \$i++ . ('s' x 65536) });
        }
        rec("\$name.after", { sends => \$i, sends_after_end => \$after_end, receive_ready => \$rf->is_ready ? 1 : 0,
            end => \$rf->is_ready ? \$rf->get : undef });
        return;
    }
    if (\$path eq '/ticker') {
        await \$receive->();
        await \$send->({ type => 'websocket.accept' });
        for my \$k (1 .. \$q->{n}) {
            await Future::IO->sleep(0.4);
            await \$send->({ type => 'websocket.send', text => "tick\$k" });
        }
        await \$send->({ type => 'websocket.close' });
        rec("\$name.events", await \$receive->());
        return;
    }
    if (\$path eq '/close-code') {
        await \$receive->();
        await \$send->({ type => 'websocket.accept' });
        my \$r = await try_send(\$send, { type => 'websocket.close', code => \$q->{code} });
        await \$send->({ type => 'websocket.send', text => \$r }) if \$r ne 'ok';
        await \$send->({ type => 'websocket.close', code => 1000 }) if \$r ne 'ok';
        rec("\$name.events", await \$receive->());
        return;
    }
    if (\$path eq '/return-open') {
        await \$receive->();
        await \$send->({ type => 'websocket.accept' });
        await \$send->({ type => 'websocket.send', text => 'bye' });
        return;
    }
    if (\$path eq '/undecided') {
        # Waits on the client before deciding on the handshake: a client
        # that ends its side meanwhile has left, and the receive says so.
        rec("\$name.events", await \$receive->());
        my \$ev = await Future->wait_any(\$receive->(),
            Future::IO->sleep(5)->then(sub { Future->done({ type => 'still waiting' }) }));
        rec("\$name.events", \$ev);
        return;
    }
    if (\$path eq '/die-open') {
        await \$receive->();
        await \$send->({ type => 'websocket.accept' });
        await \$send->({ type => 'websocket.send', text => 'bye' });
        die "ws-open-die-marker-8181\\n";
    }
    await \$send->({ type => 'websocket.close' });
};
\$app;
APP

sub records {
    my ($name) = @_;
    return map { $J->decode($_) } file_lines("$dir/$name");
}

sub wait_records {
    my ( $name, $n, $timeout ) = @_;
    return map { $J->decode($_) } wait_file_lines( "$dir/$name", $n // 1, $timeout );
}

# The disconnect event the app recorded for connection $name.
sub app_end {
    my ($name) = @_;
    my @ev = wait_records( "$name.after", 1, 5 );
    my ($end) = grep { $_->{type} eq 'websocket.disconnect' } records("$name.events");
    return $end;
}

my $n = 0;
# A fresh /rec connection: (client, name).  Waits for the app's 'ready'.
sub rec_conn {
    my (%o) = @_;
    my $name  = 'c' . ++$n;
    my $query = "name=$name" . ( $o{sleep} ? "&sleep=$o{sleep}" : '' ) . ( delete $o{answer} ? '&answer=1' : '' );
    my $port  = delete $o{port};
    delete $o{sleep};
    my $ws = PagiRS::WS->connect( $port, path => "/rec?$query", %o );
    my $m  = $ws->recv_message(3);
    die "no ready from /rec" unless $m && $m->{type} eq 'text' && $m->{data} eq 'ready';
    return ( $ws, $name );
}

my $s    = start_server( '--max-ws-frame-size', 1024, '--max-receive-queue', 5, $app );
my $port = $s->port;

sub access_line {
    my ( $server, $name, $timeout ) = @_;
    $server->wait_output( qr{"GET /rec\?name=$name\b[^"]*" 101 [^\n]*\n}, $timeout // 3 );
    my ($l) = $server->output =~ m{("GET /rec\?name=$name\b[^"]*" 101 [^\n]*)\n};
    return $l // '';
}

# ---------------------------------------------------------------------------
# Peer closes and drops
# ---------------------------------------------------------------------------

subtest 'peer Close with a code => that code and reason' => sub {
    my ( $ws, $name ) = rec_conn( port => $port );
    $ws->close( 4000, "bye \x{2603}" );
    my ( $code, $reason ) = $ws->wait_close(3);
    is $code, 4000, 'server replies with the same code';
    ok $ws->eof_within(3), 'server closes TCP';
    is_deeply app_end($name), { type => 'websocket.disconnect', code => 4000, reason => "bye \x{2603}" },
      'app: 4000 and the (UTF-8) reason';
    like access_line( $s, $name ), qr/ reason=close_4000$/, 'access log reason=close_4000';
    is_deeply [ map { $_->{event} } records("$name.cb") ], ['complete'], 'pagi.connection: clean completion';
    my ($a) = records("$name.after");
    is $a->{is_connected}, 0, 'is_connected false after the end';

    ( $ws, $name ) = rec_conn( port => $port );
    $ws->close( 1001, '' );
    is scalar( $ws->wait_close(3) ), 1001, '1001 echoed';
    is_deeply app_end($name), { type => 'websocket.disconnect', code => 1001, reason => '' }, 'app: 1001 ""';
};

subtest 'peer Close with empty payload => 1005' => sub {
    my ( $ws, $name ) = rec_conn( port => $port );
    $ws->close();
    my ($code) = $ws->wait_close(3);
    ok defined $code, 'server answered with a Close frame';
    ok $ws->eof_within(3), 'server closes TCP';
    is_deeply app_end($name), { type => 'websocket.disconnect', code => 1005, reason => '' }, 'app: 1005 ""';
    like access_line( $s, $name ), qr/ reason=close_1005$/, 'access log reason=close_1005';
};

subtest 'TCP drop without Close => 1006 client_closed' => sub {
    for my $graceful ( 0, 1 ) {
        my ( $ws, $name ) = rec_conn( port => $port );
        $ws->disconnect( graceful => $graceful );
        my $what = $graceful ? 'FIN' : 'RST';
        is_deeply app_end($name), { type => 'websocket.disconnect', code => 1006, reason => 'client_closed' },
          "$what: app 1006 client_closed";
        like access_line( $s, $name ), qr/ reason=client_closed$/, "$what: access log reason=client_closed";
        is_deeply [ map { "$_->{event}:" . ( $_->{reason} // '' ) } records("$name.cb") ], ['disconnect:client_closed'],
          "$what: pagi.connection on_disconnect(client_closed)";
    }
    # Half-close: FIN after the handshake, the client still reading.
    my ( $ws, $name ) = rec_conn( port => $port );
    $ws->shutdown_write;
    is_deeply app_end($name), { type => 'websocket.disconnect', code => 1006, reason => 'client_closed' },
      'half-close: 1006 client_closed';
};

subtest 'a FIN while the app decides on the handshake => websocket.disconnect' => sub {
    for my $how (qw(close shutdown)) {
        my $name = "undecided-$how";
        my $sock = connect_port($port);
        $sock->syswrite( "GET /undecided?name=$name HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
              . "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
              . "Sec-WebSocket-Version: 13\r\n\r\n" );
        my ($connect) = wait_records( "$name.events", 1, 5 );
        is $connect->{type}, 'websocket.connect', "$how: the app has the handshake";
        # A WebSocket client cannot half-close: either way it has left.
        $how eq 'close' ? close $sock : shutdown( $sock, 1 );
        my ( undef, $end ) = wait_records( "$name.events", 2, 8 );
        is $end->{type}, 'websocket.disconnect', "$how: the waiting receive hears the client left"
          or diag explain $end;
        close $sock;
    }
};

subtest 'messages before the Close are delivered first' => sub {
    my ( $ws, $name ) = rec_conn( port => $port );
    $ws->send_text('one');
    $ws->send_binary('two');
    $ws->close( 1000, 'end' );
    $ws->wait_close(3);
    app_end($name);
    is_deeply [ records("$name.events") ],
      [
        { type => 'websocket.receive',    text  => 'one' },
        { type => 'websocket.receive',    bytes => 'two' },
        { type => 'websocket.disconnect', code  => 1000, reason => 'end' },
      ],
      'receive order: messages, then the disconnect';
    # Data after the peer's Close is not delivered.
    ( $ws, $name ) = rec_conn( port => $port );
    $ws->close( 1000, 'end' );
    $ws->send_text('after-close');
    $ws->wait_close(3);
    app_end($name);
    is_deeply [ map { $_->{type} } records("$name.events") ], ['websocket.disconnect'], 'a message after the peer\'s Close is dropped';
};

# The app's answer to one message can find the socket ended (the core knows
# at once) while the peer's next messages are still on their way to the
# interpreter: they must reach the app before the disconnect does.
subtest 'messages before the end reach an app that answers each one' => sub {
    for my $ending (qw(close fin)) {
        my @wrong;
        for my $round ( 1 .. 10 ) {
            my ( $ws, $name ) = rec_conn( port => $port, answer => 1 );
            my @frames = (
                { opcode => 'text',   payload => 'one' },
                { opcode => 'binary', payload => 'two' },
                { opcode => 'text',   payload => 'three' },
                $ending eq 'close' ? { opcode => 'close', payload => pack( 'n', 1000 ) . 'end' } : (),
            );
            $ws->send_raw( join '', map { $ws->build_frame(%$_) } @frames );
            $ws->shutdown_write;
            $ws->eof_within(3);
            app_end($name);
            my @events = map { $_->{type} eq 'websocket.receive' ? $_->{text} // $_->{bytes} : $_->{code} }
              records("$name.events");
            my $want = join ' ', 'one', 'two', 'three', $ending eq 'close' ? 1000 : 1006;
            push @wrong, "round $round: @events" if "@events" ne $want;
        }
        is_deeply \@wrong, [], "$ending: in ten rounds, every message and then the disconnect";
    }
};

subtest 'after the end: receive returns copies (bounded), sends are no-ops' => sub {
    my ( $ws, $name ) = rec_conn( port => $port );
    $ws->close( 1000, 'r' );
    $ws->wait_close(3);
    my $end = app_end($name);
    my ($a) = records("$name.after");
    is $a->{send_after_end},  'ok', 'websocket.send after the end resolves';
    is $a->{close_after_end}, 'ok', 'websocket.close after the end resolves';
    is $a->{copies}, 100, '100 more receives return the disconnect';
    is $a->{same}, 100, 'each a fresh copy with the same code and reason';
    like $a->{failure} // '', qr/not checking for websocket\.disconnect/, 'then receive fails';
    ok $s->wait_output( qr/receive\(\) called \d+ times after the scope ended/, 2 ), 'and it is logged';
};

# ---------------------------------------------------------------------------
# Protocol errors => Close 1002, app 1002 protocol_error
# ---------------------------------------------------------------------------

my @protocol = (
    [ 'unmasked frame', sub { $_[0]->send_frame( opcode => 'text', payload => 'hi', mask => 0 ) } ],
    [ 'RSV1 set',       sub { $_[0]->send_frame( opcode => 'text', payload => 'hi', rsv1 => 1 ) } ],
    [ 'RSV2 set',       sub { $_[0]->send_frame( opcode => 'binary', payload => 'hi', rsv2 => 1 ) } ],
    [ 'RSV3 on a ping', sub { $_[0]->send_frame( opcode => 'ping', payload => '', rsv3 => 1 ) } ],
    [ 'reserved data opcode 3',     sub { $_[0]->send_frame( opcode => 3,  payload => 'x' ) } ],
    [ 'reserved control opcode 11', sub { $_[0]->send_frame( opcode => 11, payload => 'x' ) } ],
    [ 'ping with 126 bytes',        sub { $_[0]->ping( 'p' x 126 ) } ],
    [ 'fragmented ping',            sub { $_[0]->send_frame( opcode => 'ping', fin => 0, payload => 'x' ) } ],
    [ 'continuation with no message', sub { $_[0]->send_frame( opcode => 'continuation', payload => 'x' ) } ],
    [ 'new message inside a fragmented one',
        sub { $_[0]->send_frame( opcode => 'text', fin => 0, payload => 'a' ); $_[0]->send_frame( opcode => 'text', payload => 'b' ) } ],
    [ 'close code 1004',     sub { $_[0]->close(1004) } ],
    [ 'close code 999',      sub { $_[0]->close(999) } ],
    [ 'close code 5000',     sub { $_[0]->close(5000) } ],
    [ 'close code 1005 on the wire', sub { $_[0]->close(1005) } ],
    [ 'close code 1006 on the wire', sub { $_[0]->close(1006) } ],
    [ 'close code 1015 on the wire', sub { $_[0]->close(1015) } ],
    [ '1-byte close payload',        sub { $_[0]->close_raw("\x03") } ],
    [ 'close frame with 126 bytes',  sub { $_[0]->close( 1000, 'r' x 124 ) } ],
);

subtest "protocol error: $_->[0]" => sub {
    my ( $label, $act ) = @$_;
    my ( $ws, $name ) = rec_conn( port => $port );
    $act->($ws);
    my ($code) = $ws->wait_close(3);
    is $code, 1002, 'server sends Close 1002';
    ok $ws->eof_within(3), 'and closes TCP';
    is_deeply app_end($name), { type => 'websocket.disconnect', code => 1002, reason => 'protocol_error' },
      'app: 1002 protocol_error';
    like access_line( $s, $name ), qr/ reason=protocol_error$/, 'access log reason=protocol_error';
} for @protocol;

# A client still sending when it broke a rule: the server reads nothing
# after the bad frame.  Had it closed the socket with those bytes unread,
# or arriving later, the socket would answer them with a reset, which can
# destroy the Close frame before the client reads it and fails the
# client's writes.  The server lingers instead, reading and dropping them
# until the client's FIN (up to two seconds).
subtest 'after a protocol error the server takes what the client still sends: no reset' => sub {
    # A client that does not answer the Close: it is still sending.
    my ( $ws, $name ) = rec_conn( port => $port, auto_close_reply => 0 );
    $ws->send_frame( opcode => 'text', payload => 'hi', mask => 0 );
    is scalar $ws->wait_close(3), 1002, 'the Close 1002 arrives';
    ok $ws->eof_within(3), "and the server's FIN";
    my @written;
    for ( 1 .. 3 ) {
        push @written, $ws->send_raw( "\0" x 65536, 3 ) // 'failed: ' . ( $ws->{write_error} // '?' );
        sleep 0.1;
    }
    is_deeply \@written, [ (65536) x 3 ], 'the bytes the client sends after it are taken, not reset';
    $ws->shutdown_write;
    is $ws->{read_error}, undef, 'no read error either';
    is_deeply app_end($name), { type => 'websocket.disconnect', code => 1002, reason => 'protocol_error' },
      'app: 1002 protocol_error';
};

# The app answers each message, and its answers reach the writer after the
# peer's Close: refused there, they must not keep the server's own Close
# (tungstenite's answer to an invalid code) from being sent.  A race, caught
# in about half the runs before the fix; websocket::connection's unit test
# holds the writer to it every time.
subtest 'a Close with an invalid code behind messages the app answers: Close 1002 every time' => sub {
    my @wrong;
    for my $round ( 1 .. 20 ) {
        my ( $ws, $name ) = rec_conn( port => $port, answer => 1 );
        $ws->send_raw( join '', ( map { $ws->build_frame( opcode => 'text', payload => "m$_" ) } 1 .. 5 ),
            $ws->build_frame( opcode => 'close', payload => pack( 'n', 999 ) ) );
        $ws->shutdown_write;
        my ($code) = $ws->wait_close(3);
        push @wrong, "round $round: " . ( $code // 'no Close' ) if ( $code // 0 ) != 1002;
        app_end($name);
    }
    is_deeply \@wrong, [], 'twenty rounds, each ended by a Close 1002';
};

# The app closes first; the client's answer carries a code no peer may
# send.  tungstenite checks the code of a Close that opens the handshake
# (the subtests above) but passes on that of an answer to ours unchecked:
# the app was given 999 as if the peer had said it.
subtest "an answer to the app's Close with an invalid code => 1002 protocol_error" => sub {
    for my $code ( 999, 1006, 5000 ) {
        my $name = 'answer' . $code;
        my $ws   = PagiRS::WS->connect( $port, path => "/ticker?n=0&name=$name", auto_close_reply => 0 );
        is scalar $ws->wait_close(3), 1000, "$code: the app's Close 1000 arrives";
        $ws->close($code);
        ok $ws->eof_within(3), "$code: the server closes TCP after the answer";
        my ($end) = wait_records( "$name.events", 1, 5 );
        is_deeply $end, { type => 'websocket.disconnect', code => 1002, reason => 'protocol_error' },
          "$code: app: 1002 protocol_error";
    }
};

subtest 'valid close codes are not protocol errors' => sub {
    # A close reason of 123 bytes makes the largest allowed control frame (125).
    my ( $w, $nm ) = rec_conn( port => $port );
    $w->close( 1000, 'r' x 123 );
    is scalar( $w->wait_close(3) ), 1000, '125-byte close frame accepted';
    is app_end($nm)->{reason}, 'r' x 123, 'app gets the 123-byte reason';
    for my $code ( 1000, 1003, 1007, 1011, 1012, 1013, 3000, 4999 ) {
        my ( $ws, $name ) = rec_conn( port => $port );
        $ws->close( $code, 'ok' );
        is scalar( $ws->wait_close(3) ), $code, "$code echoed";
        is app_end($name)->{code}, $code, "app: $code";
    }
};

# ---------------------------------------------------------------------------
# Invalid UTF-8 => Close 1007
# ---------------------------------------------------------------------------

my @utf8 = (
    [ 'text frame',               sub { $_[0]->send_frame( opcode => 'text', payload => "ok\xff\xfe" ) } ],
    [ 'overlong encoding',        sub { $_[0]->send_frame( opcode => 'text', payload => "\xc0\xaf" ) } ],
    [ 'surrogate',                sub { $_[0]->send_frame( opcode => 'text', payload => "\xed\xa0\x80" ) } ],
    [ 'fragmented text',          sub { $_[0]->send_fragmented( 'text', "ab\xe2\x98", "X", "cd" ) } ],
    [ 'truncated at the end of a fragmented text', sub { $_[0]->send_fragmented( 'text', "ab", "\xe2\x98" ) } ],
    [ 'close reason',             sub { $_[0]->close_raw( pack( 'n', 1000 ) . "bad\xff" ) } ],
);

subtest "invalid UTF-8: $_->[0]" => sub {
    my ( $label, $act ) = @$_;
    my ( $ws, $name ) = rec_conn( port => $port );
    $act->($ws);
    my ($code) = $ws->wait_close(3);
    is $code, 1007, 'server sends Close 1007';
    ok $ws->eof_within(3), 'and closes TCP';
    is_deeply app_end($name), { type => 'websocket.disconnect', code => 1007, reason => 'protocol_error' },
      'app: 1007 protocol_error';
    is_deeply [ grep { $_->{type} eq 'websocket.receive' } records("$name.events") ], [], 'no message delivered';
} for @utf8;

subtest 'binary frames are not UTF-8 checked' => sub {
    my ( $ws, $name ) = rec_conn( port => $port );
    $ws->send_binary("\xff\xfe");
    $ws->close(1000);
    is scalar( $ws->wait_close(3) ), 1000, 'clean close';
    is_deeply [ wait_records("$name.events", 1, 5) ]->[0], { type => 'websocket.receive', bytes => "\xff\xfe" }, 'bytes delivered';
};

# ---------------------------------------------------------------------------
# Limits
# ---------------------------------------------------------------------------

subtest '--max-ws-frame-size 1024 => Close 1009' => sub {
    my ( $ws, $name ) = rec_conn( port => $port );
    $ws->send_binary( 'a' x 1024 );
    $ws->send_text( 'b' x 1024 );
    $ws->send_fragmented( 'binary', 'c' x 1000, 'c' x 1000 );    # the limit is per frame
    $ws->send_binary( 'd' x 1025 );
    my ($code) = $ws->wait_close(3);
    is $code, 1009, 'server sends Close 1009 for a 1025-byte frame';
    ok $ws->eof_within(3), 'and closes TCP';
    is_deeply app_end($name), { type => 'websocket.disconnect', code => 1009, reason => 'protocol_error' },
      'app: 1009 protocol_error';
    is_deeply [ map { length( $_->{bytes} // $_->{text} ) } grep { $_->{type} eq 'websocket.receive' } records("$name.events") ],
      [ 1024, 1024, 2000 ], 'frames up to the limit were delivered';
    like access_line( $s, $name ), qr/ reason=protocol_error$/, 'access log';

    # The declared length alone is enough (no need to send the payload).
    ( $ws, $name ) = rec_conn( port => $port );
    $ws->send_raw( PagiRS::WS->build_frame( opcode => 'binary', payload => '', length => 10_000_000 ) );
    is scalar( $ws->wait_close(3) ), 1009, 'a 10 MB declared length: Close 1009 at once';
    is app_end($name)->{code}, 1009, 'app: 1009';
};

subtest '--max-receive-queue 5 => Close 1008 queue_overflow' => sub {
    my ( $ws, $name ) = rec_conn( port => $port, sleep => 1 );    # the app does not receive for 1 s
    my $t0 = time;
    $ws->send_text("m$_") for 1 .. 8;
    my ( $code, $reason ) = $ws->wait_close(3);
    my $took = time - $t0;
    is $code,   1008,                     'Close 1008';
    is $reason, 'Message queue overflow', 'reason "Message queue overflow"';
    ok $took < 0.9, sprintf( 'while the app was still not receiving (%.2fs)', $took );
    ok $ws->eof_within(3), 'TCP closed';
    app_end($name);
    is_deeply [ records("$name.events") ],
      [ ( map { { type => 'websocket.receive', text => "m$_" } } 1 .. 5 ),
        { type => 'websocket.disconnect', code => 1008, reason => 'queue_overflow' } ],
      'app: the 5 queued messages first, then 1008 queue_overflow';
    like access_line( $s, $name ), qr/ reason=queue_overflow$/, 'access log reason=queue_overflow';

    # One over the limit is enough.
    ( $ws, $name ) = rec_conn( port => $port, sleep => 0.5 );
    $ws->send_text("o$_") for 1 .. 6;
    is scalar( $ws->wait_close(3) ), 1008, '6 unread messages: Close 1008';
    app_end($name);
    is_deeply [ map { $_->{text} // $_->{code} } records("$name.events") ], [ ( map { "o$_" } 1 .. 5 ), 1008 ],
      '6 unread: 5 delivered, then 1008';

    # Exactly the limit is fine.
    ( $ws, $name ) = rec_conn( port => $port, sleep => 0.5 );
    $ws->send_text("n$_") for 1 .. 5;
    sleep 0.8;
    $ws->close(1000);
    is scalar( $ws->wait_close(3) ), 1000, '5 unread messages: no overflow';
    app_end($name);
    is scalar( grep { $_->{type} eq 'websocket.receive' } records("$name.events") ), 5, 'all 5 delivered';
};

# An app that leaves messages unread (it sleeps) while a client sends
# more than --max-receive-queue (5) and then closes.  What passes the
# limit while the client may still send is dropped and the socket ends
# 1008; once the client's Close is in, nothing more can come, and the few
# messages still on their way are kept.  Either way the app is given a
# beginning of what was sent, and it is given all of it unless its ending
# says queue_overflow.  Before, a message that passed the limit after the
# end was recorded was dropped silently: the app got five of eight
# messages and a clean 1000.
subtest 'messages past --max-receive-queue: lost only under a 1008 queue_overflow' => sub {
    my @wrong;
    for my $round ( 1 .. 10 ) {
        my ( $ws, $name ) = rec_conn( port => $port, sleep => 0.3 );
        $ws->send_raw( join '', ( map { $ws->build_frame( opcode => 'text', payload => "m$_" ) } 1 .. 8 ),
            $ws->build_frame( opcode => 'close', payload => pack( 'n', 1000 ) ) );
        $ws->shutdown_write;
        $ws->wait_close(3);
        $ws->eof_within(3);
        my $end  = app_end($name);
        my @got  = map { $_->{text} } grep { $_->{type} eq 'websocket.receive' } records("$name.events");
        my $code = $end ? $end->{code} : 'none';
        my $ok =
            join( ',', @got ) eq join( ',', map {"m$_"} 1 .. @got )
          && ( @got == 8 ? $code == 1000 : $code == 1008 && $end->{reason} eq 'queue_overflow' );
        push @wrong, "round $round: " . scalar(@got) . " messages, then $code" unless $ok;
    }
    is_deeply \@wrong, [], 'ten rounds: all eight then 1000, or a beginning then 1008';
};

subtest 'app returns after accept without close => Close 1011' => sub {
    my $ws = PagiRS::WS->connect( $port, path => '/return-open' );
    my $m  = $ws->recv_message(3);
    is $m->{data}, 'bye', 'the message sent before returning arrives';
    $m = $ws->recv_message(3);
    is $m->{type}, 'close', 'then a Close frame';
    is $m->{code}, 1011, 'code 1011';
    ok $ws->eof_within(3), 'TCP closed';
    ok $s->wait_output( qr/ERROR.*returned from an accepted WebSocket without a closing handshake/, 3 ), 'error logged';

    $ws = PagiRS::WS->connect( $port, path => '/die-open' );
    $ws->recv_message(3);
    $m = $ws->recv_message(3);
    is $m->{code}, 1011, 'app dies after accept: Close 1011';
    ok $s->wait_output( qr/ERROR.*ws-open-die-marker-8181/, 3 ), 'the error is logged';
};

subtest 'sends after the end do not starve the pending receive' => sub {
    # The client stops reading, so the app's send waits on backpressure;
    # then the client drops.  The pending send resolves (a no-op now) and the
    # app's loop must see its receive ready with the disconnect rather than
    # spin through no-op sends.
    my $name = 'spin';
    my $ws   = PagiRS::WS->connect( $port, path => "/spin?name=$name" );
    sleep 0.5;
    $ws->disconnect;
    my ($r) = wait_records( "$name.after", 1, 5 );
    ok $r, 'the app finished its loop' or return;
    is $r->{receive_ready}, 1, 'its receive got the disconnect';
    like $r->{end}{reason} // '', qr/^(?:client_closed|write_error)$/, 'reason client_closed/write_error';
    ok $r->{sends_after_end} <= 1, "at most one send after the end before the receive is ready (got $r->{sends_after_end})";
};

# RFC 6455 7.4.1: 1005, 1006 and 1015 must not be sent in a Close frame,
# and codes outside 1000-4999 are invalid: websocket.close fails for them.
subtest 'websocket.close with a code that is not allowed on the wire' => sub {
    for my $code ( 1005, 1006, 1015, 999, 5000 ) {
        my $name = "code$code";
        my $ws   = PagiRS::WS->connect( $port, path => "/close-code?name=$name&code=$code" );
        my $m    = $ws->recv_message(3);
        like $m->{type} eq 'text' ? $m->{data} : "close $m->{code}", qr/^fail: /, "close code $code: the send fails (nothing on the wire)";
        $ws->wait_close(3);
    }
};

# ---------------------------------------------------------------------------
# Idle timeout
# ---------------------------------------------------------------------------

subtest '--ws-idle-timeout 1 => 1006 idle_timeout' => sub {
    my $s2 = start_server( '--ws-idle-timeout', 1, $app );
    my ( $ws, $name ) = rec_conn( port => $s2->port );
    my $t0 = time;
    my $eof = $ws->eof_within(3);
    my $took = time - $t0;
    ok $eof, 'connection dropped';
    ok $took > 0.8 && $took < 2, sprintf( 'after about 1 s (%.2fs)', $took );
    ok !$ws->recv_frame(0), 'no Close frame';
    is_deeply app_end($name), { type => 'websocket.disconnect', code => 1006, reason => 'idle_timeout' }, 'app: 1006 idle_timeout';
    like access_line( $s2, $name ), qr/ reason=idle_timeout$/, 'access log reason=idle_timeout';

    # Traffic either way keeps it open: client messages every 0.4 s ...
    ( $ws, $name ) = rec_conn( port => $s2->port );
    for ( 1 .. 5 ) { sleep 0.4; $ws->send_text("keep$_") }
    ok !$ws->eof_within(0.1), 'client messages keep it open past the timeout';
    # ... or pings (a control frame counts as a frame).
    for ( 1 .. 4 ) { sleep 0.4; $ws->ping('x'); $ws->recv_message(1) }
    ok !$ws->eof_within(0.1), 'pings keep it open too';
    $ws->close(1000);
    is scalar( $ws->wait_close(3) ), 1000, 'clean close still works';

    # ... and so do the server's own messages.
    my $t = PagiRS::WS->connect( $s2->port, path => '/ticker?name=ticker&n=5' );
    my @got;
    while ( my $m = $t->recv_message(3) ) {
        push @got, $m->{type} eq 'text' ? $m->{data} : "$m->{type} " . ( $m->{code} // '' ) . ":$m->{reason}";
        last if $m->{type} eq 'close';
    }
    is_deeply \@got, [ ( map { "tick$_" } 1 .. 5 ), 'close 1000:' ], 'server messages every 0.4 s keep it open for 2 s';
    is_deeply [ wait_records('ticker.events', 1, 5) ], [ { type => 'websocket.disconnect', code => 1000, reason => '' } ], 'clean end';
    $s2->stop;
};

# ---------------------------------------------------------------------------
# Server shutdown
# ---------------------------------------------------------------------------

subtest 'SIGTERM => Close 1001, app 1006 server_shutdown' => sub {
    my $s3 = start_server( '--shutdown-timeout', 10, $app );
    my ( $ws,  $name )  = rec_conn( port => $s3->port );
    my ( $ws2, $name2 ) = rec_conn( port => $s3->port );
    # A client that neither answers the Close nor closes: the server going
    # away does not wait for it (a failed connection's lingering close does).
    my ( $mute, $mute_name ) = rec_conn( port => $s3->port, auto_close_reply => 0, hold_open => 1 );
    my $t0 = time;
    kill 'TERM', $s3->pid;
    my ( $code, $reason ) = $ws->wait_close(3);
    is $code, 1001, 'Close 1001 on the wire';
    is $reason, 'Server shutting down', 'reason';
    ok $ws->eof_within(3), 'TCP closed';
    is scalar( $ws2->wait_close(3) ), 1001, 'every open websocket gets it';
    is_deeply app_end($name), { type => 'websocket.disconnect', code => 1006, reason => 'server_shutdown' },
      'app: 1006 server_shutdown';
    is app_end($name2)->{reason}, 'server_shutdown', 'second app too';
    for ( 1 .. 100 ) { last unless $s3->is_running; sleep 0.05 }
    my $took = time - $t0;
    ok !$s3->is_running, sprintf( 'the server exits promptly (%.2fs), not after --shutdown-timeout', $took );
    cmp_ok $took, '<', 1.5, 'nor after waiting for a client that does not answer its Close';
    is scalar( $mute->wait_close(1) ), 1001, 'that client got the Close 1001 too';
    like $s3->output, qr{"GET /rec\?name=$name\b[^"]*" 101 [^\n]* reason=server_shutdown\n}, 'access log reason=server_shutdown';
};

done_testing;
