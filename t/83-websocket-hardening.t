use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;
use PagiRS::WS;
use File::Temp qw(tempdir);
use IO::Select;
use JSON::PP;
use Time::HiRes qw(time sleep);

# WebSocket hardening: the opening handshake is held to RFC 6455 4.2.1
# (answered by the server, the app never called), a reassembled message is
# bounded by --max-ws-message-size, and a socket's memory is bounded by the
# configuration rather than by the client or by an app that neither reads
# nor awaits its sends:
# - received bytes in transit to a busy interpreter, and those the app
#   leaves unread, are bounded by the inbound budget (--max-ws-message-size);
# - unsent bytes are bounded by 16 x --write-high-watermark, past which
#   websocket.send fails.

my $dir = tempdir( CLEANUP => 1 );
my $J   = JSON::PP->new->canonical->utf8->allow_nonref;
my $MiB = 1024 * 1024;

my $app = write_app( <<"APP" );
use strict; use warnings; use Future::AsyncAwait; use Future::IO; use JSON::PP;
my \$dir = '$dir';
my \$J = JSON::PP->new->canonical->utf8->allow_nonref;
sub rec {
    my (\$file, \$data) = \@_;
    open my \$fh, '>>', "\$dir/\$file" or die "open \$dir/\$file: \$!";
    print \$fh \$J->encode(\$data), "\\n";
    close \$fh;
}
sub query { my (\$s) = \@_; return { map { split /=/, \$_, 2 } split /&/, \$s->{query_string} // '' } }
sub facts {
    my (\$c) = \@_;
    return { reason => \$c->disconnect_reason, detail => \$c->disconnect_detail };
}
async sub {
    my (\$scope, \$receive, \$send) = \@_;
    return if \$scope->{type} eq 'lifespan';
    rec('calls', { type => \$scope->{type}, path => \$scope->{path} });
    if (\$scope->{type} ne 'websocket') {
        await \$send->({ type => 'http.response.start', status => 200, headers => [['content-type', 'text/plain']] });
        await \$send->({ type => 'http.response.body', body => "http:\$scope->{type}", more => 0 });
        return;
    }
    my \$path = \$scope->{path};
    my \$q    = query(\$scope);
    my \$c    = \$scope->{'pagi.connection'};
    await \$receive->();    # websocket.connect
    await \$send->({ type => 'websocket.accept' });

    if (\$path eq '/sizes') {
        # Answers each message with its length; records how it ended.
        while (1) {
            my \$ev = await \$receive->();
            if (\$ev->{type} eq 'websocket.disconnect') {
                rec("\$q->{name}.end", { event => \$ev, facts => facts(\$c) });
                return;
            }
            await \$send->({ type => 'websocket.send', text => 'len:' . length(\$ev->{bytes} // \$ev->{text}) });
        }
    }
    if (\$path eq '/batches') {
        # Lets three messages queue up, then reads them; three rounds.
        for my \$round (1 .. 3) {
            await Future::IO->sleep(0.4);
            my (\$n, \$bytes) = (0, 0);
            while (\$n < 3) {
                my \$ev = await \$receive->();
                return if \$ev->{type} eq 'websocket.disconnect';
                \$n++;
                \$bytes += length \$ev->{bytes};
            }
            await \$send->({ type => 'websocket.send', text => "round \$round: \$n \$bytes" });
        }
        while (1) {
            my \$ev = await \$receive->();
            return if \$ev->{type} eq 'websocket.disconnect';
        }
    }
    if (\$path eq '/unread') {
        # Never reads until the server ends the socket.
        await \$c->disconnect_future;
        my \$facts = facts(\$c);
        my \$queued = 0;
        while (1) {
            my \$ev = await \$receive->();
            last if \$ev->{type} eq 'websocket.disconnect';
            \$queued++;
        }
        rec('unread.end', { facts => \$facts, queued => \$queued });
        return;
    }
    if (\$path eq '/busy') {
        # Holds the interpreter thread itself, as a CPU-bound or blocking app
        # would, then reads everything.
        await \$receive->();
        rec('busy.ready', {});
        select(undef, undef, undef, \$q->{hold});
        my (\$count, \$bytes) = (0, 0);
        while (1) {
            my \$ev = await \$receive->();
            return if \$ev->{type} eq 'websocket.disconnect';
            if (defined \$ev->{text} && \$ev->{text} eq 'done') {
                await \$send->({ type => 'websocket.send', text => "received \$count \$bytes" });
                next;
            }
            \$count++;
            \$bytes += length \$ev->{bytes};
        }
    }
    if (\$path eq '/blast') {
        # Fires sends without awaiting them at a client that does not read.
        my \$t = \$scope->{'pagi.transport'};
        my \$chunk = 'x' x \$q->{size};
        my (\$ok, \$failed, \$error, \$most) = (0, 0, undef, 0);
        for (1 .. \$q->{n}) {
            my \$f = \$send->({ type => 'websocket.send', bytes => \$chunk });
            if (\$f->is_failed) { \$failed++; \$error //= (\$f->failure)[0] }
            else                { \$ok++ }
            \$most = \$t->buffered_amount if \$t->buffered_amount > \$most;
        }
        rec('blast.sent', { ok => \$ok, failed => \$failed, error => \$error, most_buffered => \$most });
        my \$go = await \$receive->();
        # What was queued has gone out: an awaited send is taken again.
        my \$f = \$send->({ type => 'websocket.send', text => 'after' });
        my \$r = eval { await \$f; 'ok' } // 'failed: ' . \$@;
        rec('blast.after', { send => \$r });
        while (1) {
            my \$ev = await \$receive->();
            return if \$ev->{type} eq 'websocket.disconnect';
        }
    }
    if (\$path eq '/paced') {
        # Awaits each of many empty sends: they are paced by the water
        # marks like any others, and never fail.
        my (\$parked, \$failed) = (0, 0);
        for my \$i (1 .. \$q->{n}) {
            my \$f = \$send->({ type => 'websocket.send', bytes => '' });
            \$parked++ unless \$f->is_ready;
            \$failed++ unless eval { await \$f; 1 };
        }
        await \$send->({ type => 'websocket.send', text => 'done' });
        rec('paced.end', { parked => \$parked, failed => \$failed });
        while (1) {
            my \$ev = await \$receive->();
            return if \$ev->{type} eq 'websocket.disconnect';
        }
    }
    await \$send->({ type => 'websocket.close' });
};
APP

sub records { map { $J->decode($_) } file_lines("$dir/$_[0]") }

sub wait_record {
    my ( $name, $timeout ) = @_;
    my ($r) = wait_file_lines( "$dir/$name", 1, $timeout // 5 );
    return $r ? $J->decode($r) : undef;
}

# ---------------------------------------------------------------------------
# The opening handshake (RFC 6455 4.2.1)
# ---------------------------------------------------------------------------

my $log = "$dir/access.log";
my $hs  = start_server( '--access-log', $log, $app );

# Each malformed attempt: what it sends, and the answer it must get.
my @malformed = (
    [ 'post',        { method => 'POST' },                                    400, qr/GET/ ],
    [ 'put',         { method => 'PUT' },                                     400, qr/GET/ ],
    [ 'no-key',      { omit => ['Sec-WebSocket-Key'] },                       400, qr/Sec-WebSocket-Key/ ],
    [ 'short-key',   { key => 'c2hvcnQ=' },                                   400, qr/Sec-WebSocket-Key/ ],
    [ 'long-key',    { key => 'dGhlIHNhbXBsZSBub25jZSE=' },                   400, qr/Sec-WebSocket-Key/ ],
    [ 'not-base64',  { key => 'this is not base64!!!!==' },                   400, qr/Sec-WebSocket-Key/ ],
    [ 'two-keys',    { headers => [ [ 'Sec-WebSocket-Key', 'dGhlIHNhbXBsZSBub25jZQ==' ], [ 'Sec-WebSocket-Key', 'dGhlIHNhbXBsZSBub25jZQ==' ] ] },
                     400, qr/Sec-WebSocket-Key/ ],
    [ 'version-8',   { version => 8 },                                        426, qr/13/ ],
    [ 'version-14',  { version => 14 },                                       426, qr/13/ ],
    [ 'no-version',  { omit => ['Sec-WebSocket-Version'] },                   426, qr/13/ ],
);

for my $case (@malformed) {
    my ( $name, $opts, $status, $says ) = @$case;
    subtest "malformed handshake: $name => $status" => sub {
        my $ws = PagiRS::WS->connect( $hs->port, path => "/bad-$name", check_accept => 0, %$opts );
        ok !$ws->upgraded, 'not upgraded';
        is $ws->status, $status, "status $status";
        is $ws->header('content-type'), 'text/plain', 'text/plain';
        like $ws->header('connection') // '', qr/\bclose\b/i, 'Connection: close';
        like $ws->body, $says, 'the body names the rule: ' . $ws->body;
        if ( $status == 426 ) {
            is $ws->header('sec-websocket-version'), '13', 'Sec-WebSocket-Version: 13';
            is $ws->header('upgrade'), 'websocket', 'Upgrade: websocket (RFC 9110: a 426 names the protocol)';
            like $ws->header('connection'), qr/\bupgrade\b/i, 'with the upgrade token in Connection';
        }
        ok $ws->eof_within(3), 'the server closed the connection';
    };
}

subtest 'the app is never called for a malformed handshake; each is in the access log' => sub {
    # An ordinary request after them: the interpreter takes requests in
    # order, so once the app has seen it, it would have seen the others.
    my $r = http_request( $hs->port, 'GET', '/marker' );
    is $r->{body}, 'http:http', 'an ordinary request is served';
    my @calls = map { $_->{path} } records('calls');
    is_deeply \@calls, ['/marker'], 'the app saw only the ordinary request';
    my @lines = wait_file_lines( $log, scalar(@malformed) + 1, 5 );
    for my $case (@malformed) {
        my ( $name, $opts, $status ) = @$case;
        my $method = $opts->{method} // 'GET';
        ok( ( grep { m{"\Q$method\E /bad-\Q$name\E[^"]*" $status } } @lines ), "logged: $method /bad-$name $status" );
    }
};

subtest 'a well-formed handshake still upgrades; a request that is not an attempt is http' => sub {
    my $ws = PagiRS::WS->connect( $hs->port, path => '/sizes?name=ok' );
    ok $ws->upgraded, 'upgraded';
    $ws->close(1000);
    $ws->wait_close(3);
    # No Upgrade/Connection pair: no handshake attempt, no key needed.
    my $r = http_request( $hs->port, 'GET', '/plain', headers => [ [ 'Sec-WebSocket-Version', '8' ] ] );
    is $r->{status}, 200, 'a plain request with a stray WebSocket header is http';
};

# ---------------------------------------------------------------------------
# Memory: inbound
# ---------------------------------------------------------------------------

# The defaults: messages up to M = 16 MiB, of which the app may leave
# U = M unread; T = 1 MiB may wait in transit to the interpreter (plus one
# message); frames of 64 KiB.  Growth is bounded by what may wait (U, T),
# the server's working copies of the messages on their way (one being
# reassembled, up to 1.5 messages while its buffer grows; one in transit;
# the one handed to Perl), and freed memory the allocator has not yet given
# back to the system (mimalloc purges after a delay; with
# MIMALLOC_PURGE_DELAY=0 the growth here is about 10 MiB smaller).
my $M        = 16 * $MiB;
my $U        = $M;
my $T        = 1 * $MiB;
my $message  = 4 * $MiB;
my $working  = 4 * $message;
my $slack    = 24 * $MiB;
my $fragment = 65536;
my @frames   = map {
    PagiRS::WS->build_frame(
        opcode  => $_ == 0 ? 'binary' : 'continuation',
        fin     => $_ == $message / $fragment - 1 ? 1 : 0,
        payload => 'z' x $fragment,
    )
} 0 .. $message / $fragment - 1;
my $one_message = join '', @frames;

# Write $count messages as fast as the server takes them, for at most $for
# seconds or until it closes; samples the server's RSS meanwhile.  Returns
# (whole messages written, bytes of the next one written, largest RSS seen
# in KiB).
sub flood {
    my ( $ws, $server, $count, $for ) = @_;
    my $sock = $ws->sock;
    my $sel  = IO::Select->new($sock);
    my ( $sent, $off, $peak, $closed ) = ( 0, 0, 0, 0 );
    my $deadline = time + $for;
    local $SIG{PIPE} = 'IGNORE';
    while ( $sent < $count && time < $deadline ) {
        my $rss = vmrss_kb( $server->pid ) // 0;
        $peak = $rss if $rss > $peak;
        next unless $sel->can_write(0.05);
        my $n = syswrite( $sock, $one_message, length($one_message) - $off, $off );
        if ( !defined $n ) {
            next if $!{EAGAIN} || $!{EWOULDBLOCK} || $!{EINTR};
            $closed = 1;
            last;
        }
        $off += $n;
        if ( $off == length $one_message ) { $sent++; $off = 0 }
    }
    my $rss = vmrss_kb( $server->pid ) // 0;
    $peak = $rss if $rss > $peak;
    return ( $sent, $off, $peak );
}

subtest 'an app that does not read: unread bytes are bounded, then 1008' => sub {
    my $fs = start_server( '--no-access-log', '--max-receive-queue', 50, $app );
    my $ws = PagiRS::WS->connect( $fs->port, path => '/unread' );
    ok $ws->upgraded, 'connected';
    my $before = vmrss_kb( $fs->pid );
    my ( $sent, undef, $peak ) = flood( $ws, $fs, 20, 10 );
    my $grew = $peak - $before;
    my $bound = ( $U + $T + $working + $slack ) / 1024;
    note sprintf 'sent %d messages; RSS grew by %d KiB (bound %d KiB)', $sent, $grew, $bound;
    ok $grew < $bound, sprintf( 'server RSS grew by %.1f MiB, under U + T + working copies + slack = %d MiB', $grew / 1024, $bound / 1024 );
    my ( $code, $reason ) = $ws->wait_close(5);
    is $code, 1008, 'Close 1008';
    my $end = wait_record('unread.end');
    is $end->{facts}{reason}, 'queue_overflow', 'the app hears queue_overflow';
    like $end->{facts}{detail}, qr/16777216 bytes.*--max-ws-message-size/, "the detail names the limit: $end->{facts}{detail}";
    is $end->{queued}, 4, 'the 4 messages that fit in 16 MiB were kept for the app';
};

subtest 'a busy interpreter: bytes in transit are bounded, TCP holds the client back' => sub {
    my $fs = start_server( '--no-access-log', '--max-receive-queue', 50, $app );
    my $ws = PagiRS::WS->connect( $fs->port, path => '/busy?hold=2' );
    $ws->send_text('first');
    wait_record('busy.ready') or die 'the app did not start';
    my $before = vmrss_kb( $fs->pid );
    my ( $sent, $off, $peak ) = flood( $ws, $fs, 20, 1.5 );
    my $grew = $peak - $before;
    # Nothing is left unread here: the interpreter is not taking anything.
    my $bound = ( $T + $working + $slack ) / 1024;
    note sprintf 'sent %d messages and %d bytes; RSS grew by %d KiB (bound %d KiB)', $sent, $off, $grew, $bound;
    ok $sent < 20, "the client was held back: $sent of 20 messages went out in 1.5 s";
    ok $grew < $bound, sprintf( 'server RSS grew by %.1f MiB, under T + working copies + slack = %d MiB', $grew / 1024, $bound / 1024 );
    # The app catches up: everything arrives, in full.
    if ( $sent < 20 ) {
        $ws->send_raw( substr( $one_message, $off ), 20 );
        $ws->send_raw( $one_message, 20 ) for $sent + 2 .. 20;
    }
    $ws->send_text('done');
    my $reply = $ws->recv_message(20);
    is $reply && $reply->{data}, 'received 20 ' . 20 * $message, 'the app received all 20 messages once it caught up';
    $ws->close(1000);
    $ws->wait_close(3);
};

# ---------------------------------------------------------------------------
# Memory: outbound
# ---------------------------------------------------------------------------

subtest 'sends not awaited, to a client that does not read: bounded, then they fail' => sub {
    my $os    = start_server( '--no-access-log', $app );
    my $H     = 16 * 65536;    # 16 x --write-high-watermark
    my $size  = 65536;
    my $n     = 2000;          # 125 MiB if nothing stopped them
    my $before = vmrss_kb( $os->pid );
    my $ws    = PagiRS::WS->connect( $os->port, path => "/blast?size=$size&n=$n" );
    my $sent  = wait_record( 'blast.sent', 10 );
    my $grew  = vmrss_kb( $os->pid ) - $before;
    note sprintf 'accepted %d, failed %d, most buffered %d; RSS grew by %d KiB', @$sent{qw(ok failed most_buffered)}, $grew;
    ok $sent->{failed} > 0, "sends past the limit failed ($sent->{failed} of $n)";
    like $sent->{error} // '', qr/websocket\.send: send queue full: .*await each send/, "clearly: $sent->{error}";
    ok $sent->{most_buffered} < $H + $size, "buffered_amount stayed under the limit plus one message ($sent->{most_buffered})";
    # What waits is under H plus one message; the rest is the Perl side's
    # 2000 Futures and the allocators' slack.
    ok $grew < ( $H + 16 * $MiB ) / 1024, sprintf( 'server RSS grew by %.1f MiB, under H + 16 MiB', $grew / 1024 );

    # The client reads at last: what was taken arrives; then sends work again.
    my $got = 0;
    while ( $got < $sent->{ok} ) {
        my $m = $ws->recv_message(5) or last;
        $got++ if $m->{type} eq 'binary' && length $m->{data} == $size;
    }
    is $got, $sent->{ok}, 'every accepted send arrived';
    $ws->send_text('go');
    my $m = $ws->recv_message(5);
    is $m && $m->{data}, 'after', 'a send after the backlog drained goes out';
    is wait_record('blast.after')->{send}, 'ok', 'and resolves';
    $ws->close(1000);
    $ws->wait_close(3);
};

subtest 'awaited sends, even empty ones, are paced and never reach the limit' => sub {
    # Water marks of 64 and 16 bytes: each queued message counts 64 bytes
    # beyond its payload, so an empty one fills the queue to the high-water
    # mark, and the limit on unsent data is 16 x 64 = 1024 bytes.
    my $os = start_server( '--no-access-log', '--write-high-watermark', 64, '--write-low-watermark', 16, $app );
    my $n  = 2000;
    my $ws = PagiRS::WS->connect( $os->port, path => "/paced?n=$n" );
    my ( $empty, $m ) = ( 0, undef );
    while ( $m = $ws->recv_message(5) ) {
        last if $m->{type} eq 'text';
        $empty++ if $m->{type} eq 'binary' && $m->{data} eq '';
    }
    is $m && $m->{data}, 'done', 'the app finished its sends';
    is $empty, $n, "all $n empty messages arrived";
    my $end = wait_record('paced.end');
    # A send waits when it finds the queue at the mark (as the reference
    # server's do); one that finds room is taken at once, so here about
    # every other send waits, however fast the network drains.
    cmp_ok $end->{parked}, '>', 0, "sends that found the queue at the mark waited for it to drain ($end->{parked} of $n)";
    is $end->{failed}, 0, 'none failed: an app that awaits never reaches the limit';
    $ws->close(1000);
    $ws->wait_close(3);
};

# ---------------------------------------------------------------------------
# --max-ws-message-size
# ---------------------------------------------------------------------------

# 100 000-byte messages, 65 536-byte frames (the default).
my $ms = start_server( '--max-ws-message-size', 100_000, $app );

subtest '--max-ws-message-size: a larger reassembled message closes 1009' => sub {
    my $ws = PagiRS::WS->connect( $ms->port, path => '/sizes?name=m1' );
    $ws->send_fragmented( 'binary', ( 'a' x 50_000 ) x 2 );
    is $ws->recv_message(3)->{data}, 'len:100000', 'a message of exactly the limit is delivered';
    $ws->send_fragmented( 'binary', ( 'b' x 40_000 ) x 3 );
    my ($code) = $ws->wait_close(3);
    is $code, 1009, 'a 120 000-byte message in 40 000-byte frames: Close 1009';
    ok $ws->eof_within(3), 'and the connection closes';
    my $end = wait_record('m1.end');
    is_deeply $end->{event}, { type => 'websocket.disconnect', code => 1009, reason => 'protocol_error' },
      'the app hears 1009 / protocol_error';
    like $end->{facts}{detail}, qr/message .*100000 bytes.*--max-ws-message-size/,
      "the detail names the limit: $end->{facts}{detail}";

    # A frame over the frame limit still names the frame limit.
    $ws = PagiRS::WS->connect( $ms->port, path => '/sizes?name=m2' );
    $ws->send_binary( 'c' x 70_000 );
    is scalar( $ws->wait_close(3) ), 1009, 'a 70 000-byte frame: Close 1009';
    like wait_record('m2.end')->{facts}{detail}, qr/frame .*65536 bytes.*--max-ws-frame-size/, 'detail: the frame limit';
};

subtest 'messages read from the queue give their bytes back to the unread budget' => sub {
    # 90 000 bytes queue up each round under the 100 000-byte budget; read,
    # they leave it, or the second round would overflow it (1008).
    my $ws = PagiRS::WS->connect( $ms->port, path => '/batches' );
    for my $round ( 1 .. 3 ) {
        $ws->send_binary( 'q' x 30_000 ) for 1 .. 3;
        my $m = $ws->recv_message(5);
        is $m && $m->{data}, "round $round: 3 90000", "round $round: all three delivered, no overflow";
    }
    $ws->close(1000);
    is scalar( $ws->wait_close(3) ), 1000, 'a clean close';
};

subtest '--max-ws-frame-size 0: no frame may still be larger than a message' => sub {
    my $zs = start_server( '--max-ws-frame-size', 0, '--max-ws-message-size', 100_000, $app );
    my $ws = PagiRS::WS->connect( $zs->port, path => '/sizes?name=z1' );
    $ws->send_binary( 'a' x 100_000 );
    is $ws->recv_message(3)->{data}, 'len:100000', 'a 100 000-byte frame is a message of the limit';
    # The declared length alone is refused: the payload is never buffered.
    $ws->send_raw( PagiRS::WS->build_frame( opcode => 'binary', payload => '', length => 2**40 ) );
    is scalar( $ws->wait_close(3) ), 1009, 'a frame declaring 1 TiB: Close 1009 at once';
    like wait_record('z1.end')->{facts}{detail}, qr/--max-ws-message-size/, 'detail: the message limit';
    ok $zs->is_running, 'the server is fine';
};

subtest '--max-ws-message-size 0: no limit on a message' => sub {
    my $ns = start_server( '--max-ws-message-size', 0, $app );
    my $ws = PagiRS::WS->connect( $ns->port, path => '/sizes?name=n1' );
    my $size = 17 * $MiB;    # over the default of 16 MiB
    $ws->send_fragmented( 'binary', ( 'n' x 65536 ) x ( $size / 65536 ) );
    my $m = $ws->recv_message(10);
    is $m && $m->{data}, "len:$size", 'a 17 MiB message is delivered';
    $ws->close(1000);
    $ws->wait_close(3);
};

subtest 'both limits 0: a frame header still cannot claim any length' => sub {
    my $ns = start_server( '--max-ws-message-size', 0, '--max-ws-frame-size', 0, $app );
    my $ws = PagiRS::WS->connect( $ns->port, path => '/sizes?name=h1' );
    $ws->send_raw( PagiRS::WS->build_frame( opcode => 'binary', payload => '', length => 2**40 ) );
    is scalar( $ws->wait_close(3) ), 1009, 'a frame declaring 1 TiB: Close 1009';
    like wait_record('h1.end')->{facts}{detail}, qr/server's own limit of 1073741824 bytes/, 'detail: the server\'s own limit';
    ok $ns->is_running, 'the server did not abort';
};

done_testing;
