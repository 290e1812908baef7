use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;
use File::Temp qw(tempdir);
use IO::Select;
use IO::Socket::SSL ();
use Time::HiRes qw(time sleep);
use PagiRS::WS;

# Slow readers: a client that stops taking its response (a shut TCP window)
# is closed once no byte of it was taken for --timeout seconds, whether the
# app still sends (held at the high-water mark) or has handed everything
# over (a file body), and a WebSocket client that stops reading too; a
# slow reader that takes bytes now and then is served whole.  --request-timeout's stall closes the connection at once
# too, instead of waiting to write what the client does not read.  The app
# hears client_timeout either way.

$SIG{PIPE} = 'IGNORE';
my $dir = tempdir( CLEANUP => 1 );
my $big = "$dir/big.bin";
{
    open my $fh, '>', $big or die "$big: $!";
    print {$fh} 'f' x ( 1 << 20 ) for 1 .. 24;
    close $fh;
}

my $app = write_app(<<"APP");
use strict; use warnings;
use Future::AsyncAwait; use JSON::PP;
my \$dir = '$dir';
my \$chunk = 'x' x 65536;
sub rec {
    my (\$data) = \@_;
    open my \$fh, '>>', "\$dir/outcome" or die "open: \$!";
    print \$fh JSON::PP->new->canonical->encode(\$data), "\\n";
    close \$fh;
}
async sub {
    my (\$scope, \$receive, \$send) = \@_;
    return if \$scope->{type} eq 'lifespan';
    my (\$path, \$query) = (\$scope->{path}, \$scope->{query_string});
    my \$c = \$scope->{'pagi.connection'};
    if (\$scope->{type} eq 'websocket') {
        await \$receive->();    # websocket.connect
        await \$send->({ type => 'websocket.accept' });
        for my \$i (1 .. 400) {
            last unless \$c->is_connected;
            await \$send->({ type => 'websocket.send', bytes => \$chunk });
        }
        rec({ path => \$path, reason => \$c->disconnect_reason, detail => \$c->disconnect_detail });
        return;
    }
    await \$send->({ type => 'http.response.start', status => 200, headers => [] });
    if (\$path eq '/file') {
        await \$send->({ type => 'http.response.body', file => '$big' });
    } else {
        my \$chunks = \$query =~ /chunks=(\\d+)/ ? \$1 : 400;
        for my \$i (1 .. \$chunks) {
            last unless \$c->is_connected;
            await \$send->({ type => 'http.response.body', body => \$chunk, more => 1 });
        }
        await \$send->({ type => 'http.response.body', body => '' }) if \$c->is_connected;
    }
    rec({ path => \$path, reason => \$c->disconnect_reason, detail => \$c->disconnect_detail });
};
APP

# Send GET $target on a new connection whose receive buffer is $rcvbuf bytes
# (4 KiB unless told), and read nothing; returns the socket.
sub request_and_stall {
    my ( $port, $target, $rcvbuf ) = @_;
    my $s = connect_port($port);
    setsockopt( $s, Socket::SOL_SOCKET(), Socket::SO_RCVBUF(), $rcvbuf // 4096 ) or die "SO_RCVBUF: $!";
    $s->syswrite("GET $target HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n") or die "write: $!";
    return $s;
}

# Read what the socket holds until it ends (EOF or reset), at most $max
# seconds; returns (bytes read, how it ended: 'eof', 'reset' or 'open').
sub drain_until_end {
    my ( $s, $max ) = @_;
    my $sel = IO::Select->new($s);
    my ( $total, $t0 ) = ( 0, time );
    while ( time - $t0 < $max ) {
        $sel->can_read(0.5) or next;
        my $n = sysread( $s, my $buf, 1 << 20 );
        return ( $total, $!{ECONNRESET} ? 'reset' : "error $!" ) if !defined $n;
        return ( $total, 'eof' ) if $n == 0;
        $total += $n;
    }
    return ( $total, 'open' );
}

# The states (as /proc/net/tcp gives them: 01 established, 04 FIN_WAIT1,
# ...) of the server's sockets on connections to loopback $port.
sub server_side_states {
    my ($port) = @_;
    open my $fh, '<', '/proc/net/tcp' or die "/proc/net/tcp: $!";
    my $local = sprintf ':%04X', $port;
    return map { ( split ' ' )[3] } grep { ( split ' ' )[1] =~ /\Q$local\E\z/ } <$fh>;
}

sub outcome_of {
    my ( $path, $timeout ) = @_;
    return wait_json_record( "$dir/outcome", sub { $_[0]{path} eq $path }, $timeout );
}

my $server = start_server( '--timeout', 1, $app );

subtest 'a client that stops reading a stream is closed after --timeout' => sub {
    my $t0 = time;
    my $s  = request_and_stall( $server->port, '/stream' );
    my $rec = outcome_of( '/stream', 8 );
    my $dt = time - $t0;
    is $rec && $rec->{reason}, 'client_timeout', 'the app hears client_timeout';
    is $rec && $rec->{detail}, 'the client took no byte of the response for 1s (--timeout)', 'and why';
    ok $dt >= 1 && $dt < 4.5, sprintf( 'between --timeout and twice it after the writes stopped (%.1fs)', $dt );
    my ( $read, $end ) = drain_until_end( $s, 5 );
    is $end, 'reset', 'the connection is reset: the bytes the client left are dropped';
    cmp_ok $read, '<', 400 * 65536, "what the client had received ($read bytes) is not the whole response";
};

subtest 'a client that stops reading a file body the app handed over is closed too' => sub {
    my $s   = request_and_stall( $server->port, '/file' );
    my $rec = outcome_of( '/file', 8 );
    ok $rec, 'the app is done';
    my ( $read, $end ) = drain_until_end( $s, 5 );
    is $end, 'reset', 'the connection is reset after --timeout';
    cmp_ok $read, '<', 24 << 20, "the client had $read bytes of the file, not all of it";
};

subtest 'a slow reader that takes bytes now and then is served whole' => sub {
    # A receive window above the loopback's segment size, so that the
    # client's reads, not the kernel's small-window rules, set the pace.
    my $s = request_and_stall( $server->port, '/slow?chunks=256', 256 * 1024 );
    my $sel = IO::Select->new($s);
    my ( $buf, $total, $t0 ) = ( '', 0, time );
    # 1 MiB every 0.25 s of a 16 MiB response: the server's writes wait
    # most of the time, each wait shorter than --timeout, and the whole
    # takes several times --timeout.
    while ( time - $t0 < 20 ) {
        my $want = 1 << 20;
        while ( $want > 0 && $sel->can_read(2) ) {
            my $n = sysread( $s, my $piece, $want ) or last;
            $total += $n;
            $want -= $n;
            $buf = substr( $buf . $piece, -16 );
        }
        last if $buf =~ /\r\n0\r\n\r\n\z/ || $want > 0;
        sleep 0.25;
    }
    my $dt = time - $t0;
    like $buf, qr/\r\n0\r\n\r\n\z/, sprintf( 'the whole chunked response arrived (%d bytes over %.1fs)', $total, $dt );
    cmp_ok $dt, '>', 2, 'over more than twice --timeout';
    my $rec = outcome_of( '/slow', 5 );
    is $rec && $rec->{reason}, undef, 'the app saw no disconnect';
};

subtest 'a WebSocket client that stops reading is closed after --timeout' => sub {
    my $t0 = time;
    my $ws = PagiRS::WS->connect( $server->port, path => '/ws' );
    ok $ws->upgraded, 'upgraded';
    setsockopt( $ws->sock, Socket::SOL_SOCKET(), Socket::SO_RCVBUF(), 4096 );
    my $rec = outcome_of( '/ws', 8 );
    my $dt = time - $t0;
    is $rec && $rec->{reason}, 'client_timeout', 'the app hears client_timeout';
    is $rec && $rec->{detail}, 'the client took no byte of what was sent for 1s (--timeout)', 'and why';
    ok $dt >= 1 && $dt < 4.5, sprintf( 'between --timeout and twice it (%.1fs)', $dt );
    my @states = server_side_states( $server->port );
    ok !grep( { $_ eq '01' } @states ), "the server closed its end (states: @states)";
};

subtest 'over TLS too: the stalled connection is reset, nothing left behind' => sub {
    my $out = `openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 -subj /CN=localhost -keyout $dir/key.pem -out $dir/cert.pem 2>&1`;
    is $?, 0, 'openssl made a certificate' or return diag $out;
    my $tls = start_server( '--timeout', 1, '--ssl-cert', "$dir/cert.pem", '--ssl-key', "$dir/key.pem", $app );
    my $c = IO::Socket::SSL->new( PeerAddr => '127.0.0.1', PeerPort => $tls->port, Timeout => 5,
        SSL_verify_mode => IO::Socket::SSL::SSL_VERIFY_NONE() ) or return fail "handshake: $IO::Socket::SSL::SSL_ERROR";
    print {$c} "GET /tls HTTP/1.1\r\nHost: localhost\r\n\r\n";
    my $rec = outcome_of( '/tls', 8 );
    is $rec && $rec->{reason}, 'client_timeout', 'the app hears client_timeout';
    my @states = server_side_states( $tls->port );
    is_deeply [ grep { $_ ne '0A' } @states ], [], 'the server kept no socket for it (reset, not a FIN queued behind the bytes)';
    close $c;
    $tls->stop;
};

my $stall = start_server( '--timeout', 0, '--request-timeout', 1, $app );

subtest '--request-timeout closes a stalled response at once' => sub {
    my $s   = request_and_stall( $stall->port, '/stalled' );
    my $rec = outcome_of( '/stalled', 8 );
    is $rec && $rec->{reason}, 'client_timeout', 'the app hears client_timeout';
    is $rec && $rec->{detail}, 'no progress for 1s (--request-timeout)', 'and why';
    my @states = server_side_states( $stall->port );
    ok !grep( { $_ eq '01' } @states ), "the server closed its end at once (states: @states)";
    like $stall->output, qr/Request stall timeout \(1s\)/, 'the log says so';
};

ok $server->is_running && $stall->is_running, 'the servers are still up';
done_testing;
