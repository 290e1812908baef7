use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::WS;
use PagiRS::SSE;
use IO::Socket::INET;
use POSIX ();
use Digest::SHA qw(sha1 sha1_hex);
use MIME::Base64 qw(encode_base64);
use Encode ();
use File::Temp qw(tempdir);
use Time::HiRes qw(time sleep);

# Self-test of the WebSocket and SSE test clients, without pagi-rs: each
# scenario forks a tiny server that speaks the server side by hand, with its
# own frame code (so the client codec is not checked against itself), and
# logs what it received for the parent to check.

$SIG{PIPE} = 'IGNORE';
my $TMP = tempdir( CLEANUP => 1 );
my @kids;

# Fork a server that accepts one connection and runs $handler->($conn, $log).
# Returns (port, log file).
sub serve {
    my ($handler) = @_;
    my $l = IO::Socket::INET->new( Listen => 5, LocalAddr => '127.0.0.1', LocalPort => 0, ReuseAddr => 1 )
      or die "listen: $!";
    my $log = "$TMP/log" . ( @kids + 1 );
    my $pid = fork // die "fork: $!";
    if ( !$pid ) {
        alarm 5;    # never outlive a broken test
        open STDOUT, '>', '/dev/null';    # nor hold the harness's pipe open
        open my $lf, '>', $log or POSIX::_exit(2);
        $lf->autoflush(1);
        my $c = $l->accept or POSIX::_exit(1);
        binmode $c;
        eval { $handler->( $c, $lf ); 1 } or print $lf "DIED: $@";
        close $c;
        POSIX::_exit(0);
    }
    my $port = $l->sockport;
    close $l;
    push @kids, $pid;
    return ( $port, $log );
}

sub slurp { open my $fh, '<', $_[0] or return ''; local $/; <$fh> // '' }

# --- server side, by hand -------------------------------------------------

sub s_write { my ( $c, $b ) = @_; my $o = 0; $o += syswrite( $c, $b, length($b) - $o, $o ) // die "write: $!" while $o < length $b }

sub s_read_head {
    my ($c) = @_;
    my $buf = '';
    until ( $buf =~ /\r\n\r\n/ ) { sysread( $c, $buf, 4096, length $buf ) or last }
    my ( $head, $rest ) = split /\r\n\r\n/, $buf, 2;
    return ( $head, $rest // '' );
}

sub s_handshake {
    my ( $c, $lf, @extra ) = @_;
    my ( $head, $rest ) = s_read_head($c);
    print $lf "HEAD $_\n" for split /\r\n/, $head;
    my ($key) = $head =~ /^Sec-WebSocket-Key:\s*(\S+)/mi;
    my $acc = encode_base64( sha1( $key . '258EAFA5-E914-47DA-95CA-C5AB0DC85B11' ), '' );
    s_write( $c, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
          . "Sec-WebSocket-Accept: $acc\r\n" . join( '', map {"$_\r\n"} @extra ) . "\r\n" );
    return $rest;
}

sub s_frame {
    my ( $op, $payload, %o ) = @_;
    my $len = length $payload;
    my $h   = chr( ( ( $o{fin} // 1 ) ? 0x80 : 0 ) | ( ( $o{rsv} // 0 ) << 4 ) | $op );
    my $m   = $o{mask} ? 0x80 : 0;
    if    ( $len < 126 )   { $h .= chr( $m | $len ) }
    elsif ( $len < 65536 ) { $h .= chr( $m | 126 ) . pack( 'n', $len ) }
    else                   { $h .= chr( $m | 127 ) . pack( 'NN', 0, $len ) }
    if ( $o{mask} ) {
        my @k = ( 1, 2, 3, 4 );
        $h .= pack 'C4', @k;
        my $i = 0;
        $payload = join '', map { chr( ord($_) ^ $k[ $i++ % 4 ] ) } split //, $payload;
    }
    return $h . $payload;
}

sub s_read_frame {
    my ( $c, $b ) = @_;
    my $need = sub { while ( length $$b < $_[0] ) { sysread( $c, $$b, 65536, length $$b ) or return 0 } 1 };
    $need->(2) or return undef;
    my ( $b0, $b1 ) = unpack 'CC', $$b;
    my ( $len, $off, $form ) = ( $b1 & 127, 2, 7 );
    if ( $len == 126 ) { $need->(4) or return undef; ( $len, $off, $form ) = ( unpack( 'n', substr $$b, 2, 2 ), 4, 16 ) }
    elsif ( $len == 127 ) {
        $need->(10) or return undef;
        my ( $hi, $lo ) = unpack 'NN', substr $$b, 2, 8;
        ( $len, $off, $form ) = ( $hi * 2**32 + $lo, 10, 64 );
    }
    my $masked = $b1 & 128 ? 1 : 0;
    my @k;
    if ($masked) { $need->( $off + 4 ) or return undef; @k = unpack 'C4', substr $$b, $off, 4; $off += 4 }
    $need->( $off + $len ) or return undef;
    my $p = substr $$b, $off, $len;
    substr( $$b, 0, $off + $len, '' );
    if ($masked) { my $i = 0; $p = join '', map { chr( ord($_) ^ $k[ $i++ % 4 ] ) } split //, $p }
    return { fin => $b0 >> 7, rsv => ( $b0 >> 4 ) & 7, op => $b0 & 15, masked => $masked, form => $form, len => $len, payload => $p };
}

sub s_log_frame {
    my ( $lf, $f ) = @_;
    printf $lf "F fin=%d rsv=%d op=%d masked=%d form=%d len=%d %s\n", @$f{qw(fin rsv op masked form len)},
      $f->{len} <= 64 ? unpack( 'H*', $f->{payload} ) : sha1_hex( $f->{payload} );
}

my $UTF = Encode::encode( 'UTF-8', "h\x{e9}llo w\x{f6}rld" );

# --- WebSocket: echo server with a few commands -----------------------------

{
    my ( $port, $log ) = serve( sub {
        my ( $c, $lf ) = @_;
        my $buf = s_handshake( $c, $lf, 'Sec-WebSocket-Protocol: chat', 'Set-Cookie: a=1', 'Set-Cookie: b=2' );
        while ( my $f = s_read_frame( $c, \$buf ) ) {
            s_log_frame( $lf, $f );
            my ( $op, $p ) = @$f{qw(op payload)};
            if    ( $op == 8 )  { s_write( $c, s_frame( 8, $p ) ); last }
            elsif ( $op == 9 )  { s_write( $c, s_frame( 10, $p ) ) }
            elsif ( $op == 10 ) { }
            elsif ( $p eq 'cmd:ping' ) { s_write( $c, s_frame( 9, 'are you there' ) ) }
            elsif ( $p eq 'cmd:big' ) {
                s_write( $c, s_frame( 2, $_ ) ) for 'a' x 125, 'b' x 126, 'c' x 65535, 'd' x 65536, 'e' x 70000;
            }
            elsif ( $p eq 'cmd:frag' ) {    # split inside a UTF-8 sequence, with a ping in between
                s_write( $c, s_frame( 1, substr( $UTF, 0, 2 ), fin => 0 ) );
                s_write( $c, s_frame( 9, 'mid' ) );
                s_write( $c, s_frame( 0, substr( $UTF, 2, 7 ), fin => 0 ) );
                s_write( $c, s_frame( 0, substr( $UTF, 9 ) ) );
            }
            elsif ( $p eq 'cmd:masked' ) { s_write( $c, s_frame( 2, 'secret', mask => 1 ) ) }
            else { s_write( $c, s_frame( $op, $p, fin => $f->{fin}, rsv => $f->{rsv} ) ) }
        }
    } );

    my $ws = PagiRS::WS->connect( $port, path => '/chat?x=1', subprotocols => [qw(chat superchat)],
        headers => [ [ 'X-Test', 'yes' ] ], timeout => 3 );
    ok $ws->upgraded, 'upgraded';
    is $ws->status, 101, 'status 101';
    ok $ws->accept_ok, 'accept checked';
    is $ws->subprotocol, 'chat', 'subprotocol';
    is $ws->headers->{'set-cookie'}, 'a=1, b=2', 'repeated headers joined';
    is_deeply [ map { $_->[1] } grep { $_->[0] eq 'set-cookie' } @{ $ws->header_list } ], [ 'a=1', 'b=2' ], 'header_list keeps them apart';

    $ws->send_text("h\x{e9}llo \x{2603}");
    my $m = $ws->recv_message;
    is $m->{type}, 'text', 'text echo';
    is $m->{data}, "h\x{e9}llo \x{2603}", 'decoded characters';
    is $m->{bytes}, Encode::encode( 'UTF-8', "h\x{e9}llo \x{2603}" ), 'raw bytes';

    my $bin16 = join '', map { chr( $_ % 256 ) } 1 .. 200;
    $ws->send_binary($bin16);
    $m = $ws->recv_message;
    is $m->{type}, 'binary', 'binary echo';
    ok $m->{data} eq $bin16, '200 bytes (16-bit length) round-trip';

    my $bin64 = join '', map { chr( ( $_ * 7 ) % 256 ) } 1 .. 70000;
    $ws->send_binary($bin64);
    $m = $ws->recv_message;
    ok $m->{data} eq $bin64, '70000 bytes (64-bit length) round-trip';

    $ws->send_fragmented( 'text', 'ab', 'cd', 'ef' );
    $m = $ws->recv_message;
    is_deeply [ @$m{qw(type data frames)} ], [ 'text', 'abcdef', 3 ], 'fragments assembled';

    $ws->send_frame( opcode => 'binary', payload => 'plain', mask => 0, rsv1 => 1 );
    my $f = $ws->recv_frame;
    is_deeply [ @$f{qw(fin rsv opcode payload masked)} ], [ 1, 4, 2, 'plain', 0 ], 'recv_frame: rsv1 kept, unmasked';

    $ws->send_frame( payload => 'x', length_form => 64 );
    is $ws->recv_message->{data}, 'x', 'non-minimal 64-bit length accepted by the echo';

    $ws->send_raw( PagiRS::WS->build_frame( opcode => 'text', payload => 'one' ) . $ws->build_frame( opcode => 'text', payload => 'two' ) );
    is $ws->recv_message->{data}, 'one', 'two frames in one write (1)';
    is $ws->recv_message->{data}, 'two', 'two frames in one write (2)';

    $ws->ping('p1');
    is_deeply $ws->recv_message, { type => 'pong', data => 'p1' }, 'ping answered by pong';

    $ws->send_text('cmd:ping');
    $ws->send_text('after');
    is $ws->recv_message->{data}, 'after', 'server ping skipped (auto-pong)';
    is_deeply $ws->pings, ['are you there'], 'and recorded';

    $ws->send_text('cmd:big');
    my @sizes = map { my $x = $ws->recv_frame; [ $x->{length}, length $x->{payload}, substr( $x->{payload}, -1 ) ] } 1 .. 5;
    is_deeply \@sizes, [ [ 125, 125, 'a' ], [ 126, 126, 'b' ], [ 65535, 65535, 'c' ], [ 65536, 65536, 'd' ], [ 70000, 70000, 'e' ] ],
      'server frames at the 7/16/64-bit length boundaries';

    $ws->send_text('cmd:frag');
    $m = $ws->recv_message;
    is $m->{data}, "h\x{e9}llo w\x{f6}rld", 'server fragments with a UTF-8 split and an interleaved ping';
    is $m->{frames}, 3, 'three frames';
    is $ws->pings->[-1], 'mid', 'interleaved ping seen';

    $ws->send_text('cmd:masked');
    $f = $ws->recv_frame;
    is_deeply [ @$f{qw(masked payload)} ], [ 1, 'secret' ], 'a masked server frame is unmasked and flagged';

    my $t0 = time;
    eval { $ws->recv_frame(0.2) };
    like $@, qr/^PagiRS::WS: timeout waiting for a frame/, 'recv_frame dies on timeout';
    cmp_ok time - $t0, '<', 1, '... promptly';

    $ws->close( 1000, "done\xff" );
    my ( $code, $reason ) = $ws->wait_close(2);
    is $code, 1000, 'close echoed: code';
    is $reason, "done\xff", 'reason kept as raw bytes when not UTF-8';
    ok $ws->close_received->{utf8_error}, 'flagged as bad UTF-8';
    ok $ws->eof_within(2), 'server closed TCP';
    is $ws->recv_message(0.1), undef, 'recv_message undef at EOF';

    waitpid $kids[-1], 0;
    my $l = slurp($log);
    unlike $l, qr/DIED/, 'server ran cleanly' or diag $l;
    like $l, qr{^HEAD GET /chat\?x=1 HTTP/1\.1$}m, 'request line';
    like $l, qr{^HEAD Upgrade: websocket$}m, 'Upgrade header';
    like $l, qr{^HEAD Sec-WebSocket-Version: 13$}m, 'version header';
    like $l, qr{^HEAD Sec-WebSocket-Protocol: chat, superchat$}m, 'subprotocols offered';
    like $l, qr{^HEAD X-Test: yes$}m, 'extra header';
    my @fr = $l =~ /^F (.*)$/mg;
    is scalar( grep { /masked=0/ } @fr ), 1, 'only the mask => 0 frame was unmasked';
    like $fr[0], qr/op=1 masked=1 form=7 len=10 /, 'text frame';
    like $fr[1], qr/op=2 masked=1 form=16 len=200 /, '16-bit length form';
    like $fr[2], qr/op=2 masked=1 form=64 len=70000 /, '64-bit length form';
    is_deeply [ map { /fin=(\d) rsv=0 op=(\d+)/ ? "$1/$2" : $_ } @fr[ 3 .. 5 ] ], [ '0/1', '0/0', '1/0' ], 'fragment fin/opcodes';
    like $fr[6], qr/fin=1 rsv=4 op=2 masked=0 form=7 len=5 /, 'rsv1 + unmasked as asked';
    like $fr[7], qr/form=64 len=1 78$/, 'forced 64-bit length form';
    ok( ( grep { /op=10 .* \Q${\ unpack 'H*', 'are you there'}\E$/ } @fr ), 'auto-pong sent with the ping payload' );
    ok( ( grep { /op=10 .* \Q${\ unpack 'H*', 'mid'}\E$/ } @fr ), 'auto-pong for the interleaved ping' );
    like $fr[-1], qr/op=8 masked=1 form=7 len=7 03e8646f6e65ff$/, 'close frame: code 1000 + raw reason';
}

# --- WebSocket: server-initiated close ---------------------------------------

{
    my ( $port, $log ) = serve( sub {
        my ( $c, $lf ) = @_;
        my $buf = s_handshake( $c, $lf );
        s_write( $c, s_frame( 1, 'hi' ) . s_frame( 8, pack( 'n', 1001 ) . Encode::encode( 'UTF-8', "bye \x{2603}" ) ) );
        s_log_frame( $lf, s_read_frame( $c, \$buf ) );
    } );
    my $ws = PagiRS::WS->connect($port);
    my ( $code, $reason ) = $ws->wait_close(2);
    is $code, 1001, 'server close: code';
    is $reason, "bye \x{2603}", 'server close: UTF-8 reason decoded';
    is $ws->skipped->[0]{data}, 'hi', 'message before the close kept in skipped';
    ok $ws->eof_within(2), 'then TCP EOF';
    waitpid $kids[-1], 0;
    like slurp($log), qr/^F fin=1 rsv=0 op=8 masked=1 form=7 len=2 03e9$/m, 'close reply echoed the code';
}

# --- WebSocket: protocol oddities from the server ----------------------------

{
    my ( $port, $log ) = serve( sub {
        my ( $c, $lf ) = @_;
        my $buf = s_handshake( $c, $lf );
        s_write( $c, s_frame( 0, 'orphan' ) . s_frame( 8, '' ) );
        s_log_frame( $lf, s_read_frame( $c, \$buf ) );
    } );
    my $ws = PagiRS::WS->connect( $port, omit => ['Sec-WebSocket-Version'], headers => [ [ 'Host', 'example' ] ] );
    eval { $ws->recv_message };
    like $@, qr/continuation frame with no message in progress/, 'orphan continuation is a protocol error';
    is scalar $ws->wait_close, 1005, 'empty close payload reads as 1005';
    ok $ws->eof_within(2), 'EOF';
    waitpid $kids[-1], 0;
    my $l = slurp($log);
    like $l, qr/op=8 masked=1 form=7 len=0 $/m, 'empty close echoed empty';
    unlike $l, qr/Sec-WebSocket-Version/, 'omit drops a default header';
    like $l, qr/^HEAD Host: example$/m, 'headers replace a default';
    is scalar( () = $l =~ /^HEAD Host:/mg ), 1, '... rather than duplicate it';
}

# --- WebSocket: EOF without close; denials --------------------------------------

{
    my ($port) = serve( sub { my ( $c, $lf ) = @_; s_handshake( $c, $lf ) } );
    my $ws = PagiRS::WS->connect($port);
    is_deeply [ $ws->wait_close(2) ], [], 'wait_close empty on EOF';
    ok $ws->eof, 'eof flag';
}
{
    my ($port) = serve( sub {
        my ($c) = @_;
        s_read_head($c);
        s_write( $c, "HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nnope!\r\n3\r\n :(\r\n0\r\n\r\n" );
        1 while sysread( $c, my $x, 100 );    # hold the connection until the client drops it
    } );
    my $t0 = time;
    my $ws = PagiRS::WS->connect($port);
    ok !$ws->upgraded, 'denied: not upgraded';
    is_deeply [ @{ $ws->response }{qw(status body)} ], [ 403, 'nope! :(' ], 'chunked denial body';
    is $ws->response->{headers}{'content-type'}, 'text/plain', 'denial headers';
    cmp_ok time - $t0, '<', 0.4, 'did not wait for EOF';
}
{
    my ($port) = serve( sub {
        my ($c) = @_;
        s_read_head($c);
        s_write( $c, "HTTP/1.1 400 Bad Request\r\nContent-Length: 3\r\n\r\nbad" );
        1 while sysread( $c, my $x, 100 );    # hold the connection until the client drops it
    } );
    my $ws = PagiRS::WS->connect($port);
    is_deeply [ $ws->status, $ws->body ], [ 400, 'bad' ], 'Content-Length denial body';
}
{
    my ($port) = serve( sub { my ($c) = @_; s_read_head($c) } );
    my $ws = PagiRS::WS->connect($port);
    is $ws->status, 0, 'closed before any response: status 0';
}
for my $check ( 1, 0 ) {
    my ($port) = serve( sub {
        my ($c) = @_;
        s_read_head($c);
        s_write( $c, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: AAAA\r\n\r\n" );
    } );
    my $ws = eval { PagiRS::WS->connect( $port, check_accept => $check ) };
    if ($check) { like $@, qr/Sec-WebSocket-Accept mismatch/, 'wrong accept dies' }
    else        { ok $ws && !$ws->accept_ok, 'check_accept => 0 records it instead' }
}

# --- SSE: chunked stream, event split across chunks --------------------------------

{
    my @pieces = (
        "\xEF\xBB", "\xBF: hello\n\ndata: o", "ne\n", "\n",
        "event: update\nid: 7\ndata: line1\ndata: line2\n\n",
        "data:no-space\r", "\n\r\n",
        "retry: 1500\ndata: x\r\r",
        "data: h\xC3", "\xA9llo\n\n",
        "id: 8\n\n",
        "data\n\n",
        "data: y\n\n",
        ": bye\n",
        "data: never terminated",
    );
    my ( $port, $log ) = serve( sub {
        my ( $c, $lf ) = @_;
        my ($head) = s_read_head($c);
        print $lf "HEAD $_\n" for split /\r\n/, $head;
        s_write( $c, "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n" );
        for (@pieces) { s_write( $c, sprintf( "%x\r\n%s\r\n", length, $_ ) ); sleep 0.01 }
        s_write( $c, "0\r\n\r\n" );
        1 while sysread( $c, my $x, 100 );    # hold the connection until the client drops it
    } );
    my $sse = PagiRS::SSE->open( $port, '/events?x=1', headers => [ [ 'Last-Event-ID', '3' ] ] );
    is $sse->status, 200, 'SSE status';
    is $sse->header('Content-Type'), 'text/event-stream', 'SSE content type';
    is $sse->framing, 'chunked', 'chunked';
    my $e = $sse->next_event;
    ok !$sse->ended, 'first event arrives while the stream is still open';
    my @ev = ( $e, $sse->all_events(2) );
    my @got = map { { event => $_->{event}, data => $_->{data}, id => $_->{id}, retry => $_->{retry} } } @ev;
    is_deeply \@got, [
        { event => 'message', data => 'one',          id => '',  retry => undef },
        { event => 'update',  data => "line1\nline2", id => '7', retry => undef },
        { event => 'message', data => 'no-space',     id => '7', retry => undef },
        { event => 'message', data => 'x',            id => '7', retry => 1500 },
        { event => 'message', data => "h\x{e9}llo",   id => '7', retry => undef },
        { event => 'message', data => '',             id => '8', retry => undef },
        { event => 'message', data => 'y',            id => '8', retry => undef },
    ], 'events parsed (BOM, CR/CRLF/LF, splits, multi-line data, id/retry, no-data block)' or diag explain \@got;
    ok $ev[1]{id_set} && !$ev[2]{id_set}, 'id_set says which event carried the id';
    is_deeply [ $sse->comments ], [ 'hello', 'bye' ], 'comments';
    is $sse->next_event, undef, 'unterminated last event dropped at the end';
    ok $sse->complete, 'last chunk seen';
    is $sse->raw, join( '', @pieces ), 'raw() is the de-chunked body';
    is $sse->wire, join( '', map { sprintf "%x\r\n%s\r\n", length, $_ } @pieces ) . "0\r\n\r\n", 'wire() keeps the framing';
    is_deeply $sse->chunk_sizes, [ map {length} @pieces ], 'chunk sizes';
    ok !$sse->wait_tcp_eof(0.05), 'connection still open after the last chunk';
    $sse->close;
    waitpid $kids[-1], 0;
    my $l = slurp($log);
    like $l, qr{^HEAD GET /events\?x=1 HTTP/1\.1$}m, 'SSE request line';
    like $l, qr{^HEAD Accept: text/event-stream$}m, 'Accept header';
    like $l, qr{^HEAD Last-Event-ID: 3$}m, 'extra header';
}

# --- SSE: POST, close-delimited body ------------------------------------------------

{
    my ( $port, $log ) = serve( sub {
        my ( $c, $lf ) = @_;
        my ( $head, $rest ) = s_read_head($c);
        my ($cl) = $head =~ /^Content-Length: (\d+)/mi;
        sysread( $c, $rest, 4096, length $rest ) while length $rest < $cl;
        print $lf "METHOD ", ( split / /, $head )[0], "\nBODY $rest\n";
        s_write( $c, "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\nevent: a\ndata: 1\n\n" );
    } );
    my $sse = PagiRS::SSE->open( $port, '/post', method => 'POST', body => '{"q":1}',
        headers => [ [ 'Content-Type', 'application/json' ] ] );
    ok $sse->wait_eof(2), 'close-delimited body ends at EOF';
    is $sse->framing, 'close', 'framing close';
    ok $sse->complete, 'complete';
    is_deeply [ map { [ $_->{event}, $_->{data} ] } $sse->all_events ], [ [ 'a', '1' ] ], 'event read after wait_eof';
    waitpid $kids[-1], 0;
    like slurp($log), qr/^METHOD POST\nBODY \{"q":1\}$/m, 'POST body sent';
}

# --- SSE: a stream that stays open; Content-Length response ----------------------

{
    my ($port) = serve( sub {
        my ($c) = @_;
        s_read_head($c);
        s_write( $c, "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n" );
        s_write( $c, "d\r\ndata: first\n\n\r\n" );
        1 while sysread( $c, my $x, 100 );    # until the client goes away
    } );
    my $sse = PagiRS::SSE->open( $port, '/' );
    is $sse->next_event->{data}, 'first', 'first event';
    my $t0 = time;
    eval { $sse->next_event(0.2) };
    like $@, qr/^PagiRS::SSE: timeout waiting for the next event/, 'next_event dies on timeout';
    ok !$sse->wait_eof(0.1), 'wait_eof false on timeout';
    cmp_ok time - $t0, '<', 1, '... promptly';
    $sse->close;
}
{
    my ($port) = serve( sub {
        my ($c) = @_;
        s_read_head($c);
        s_write( $c, "HTTP/1.1 404 Not Found\r\nContent-Length: 4\r\n\r\nnope" );
        1 while sysread( $c, my $x, 100 );    # hold the connection until the client drops it
    } );
    my $sse = PagiRS::SSE->open( $port, '/' );
    ok $sse->wait_eof(0.3), 'Content-Length body ends without EOF';
    is_deeply [ $sse->status, $sse->raw, $sse->framing ], [ 404, 'nope', 'length' ], 'non-200 response readable';
    $sse->close;
}

# Reap the servers (they exit by themselves; alarm is the backstop).
my $deadline = time + 3;
for my $pid (@kids) {
    sleep 0.02 until waitpid( $pid, POSIX::WNOHANG() ) != 0 || time > $deadline;
    kill 'KILL', $pid if time > $deadline;
}
done_testing;
