use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;
use Digest::SHA qw(sha1_hex);
use IO::Select;
use JSON::PP ();
use Errno qw(EAGAIN EWOULDBLOCK EINTR);
use Time::HiRes qw(time sleep);

# Request bodies: Content-Length and chunked bodies reach the app intact in
# http.request events, a GET gets exactly one empty event, Expect:
# 100-continue is answered lazily, and a slow reader holds a big upload back
# through TCP flow control instead of it piling up in the server.  Once the
# response is complete, a receive reports the end (http.disconnect), not
# the rest of the body, whether it was called after or before the end.

$SIG{PIPE} = "IGNORE";    # the server may close while we are still uploading
my $JSON = JSON::PP->new->canonical;

my $app = write_app(<<'APP');
use strict;
use warnings;
use Future::AsyncAwait;
use Future::IO;
use Digest::SHA qw(sha1_hex);
use JSON::PP;

my $J = JSON::PP->new->canonical;

my $reply = async sub {
    my ( $send, $data ) = @_;
    my $b = $J->encode($data);
    await $send->( { type => 'http.response.start', status => 200,
        headers => [ [ 'content-type', 'application/json' ], [ 'content-length', length $b ] ] } );
    await $send->( { type => 'http.response.body', body => $b, more => 0 } );
};

# Read the whole body, recording every event as [type, length, more].
my $read_all = async sub {
    my ($receive) = @_;
    my ( $body, @ev ) = ('');
    while (1) {
        my $e = await $receive->();
        push @ev, {
            type      => $e->{type},
            len       => length( $e->{body} // '' ),
            more      => ( defined $e->{more} ? 0 + $e->{more} : undef ),
            has_body  => ( exists $e->{body} ? 1 : 0 ),
            body_def  => ( defined $e->{body} ? 1 : 0 ),
        };
        last if $e->{type} ne 'http.request';
        $body .= $e->{body} // '';
        last unless $e->{more};
    }
    return { len => length $body, sha => sha1_hex($body), events => \@ev,
        body => ( length $body <= 256 ? $body : undef ) };
};

# What each receive after (or across) the response's end heard, by the
# request's query string; a receive that never settles shows as 'timeout'.
my %after_end;
my $heard = async sub {
    my ($f) = @_;
    my $timeout = Future::IO->sleep(3)->then( sub { Future->done( { type => 'timeout' } ) } );
    my $e = await Future->wait_any( $f, $timeout );
    return $e->{type} . ( $e->{type} eq 'http.request' ? '/' . length( $e->{body} ) : '' );
};
my $respond_ok = async sub {
    my ($send) = @_;
    await $send->( { type => 'http.response.start', status => 200, headers => [ [ 'content-length', 3 ] ] } );
    await $send->( { type => 'http.response.body', body => "ok\n", more => 0 } );
};

my $app = async sub {
    my ( $scope, $receive, $send ) = @_;
    return if $scope->{type} eq 'lifespan';
    my $path = $scope->{path};
    if ( $path eq '/respond-then-receive' ) {
        # Respond before reading any of the body, then read until the end.
        await $respond_ok->($send);
        my @heard;
        while ( @heard < 10 ) {
            push @heard, await $heard->( $receive->() );
            last if $heard[-1] !~ m{^http\.request/};
        }
        $after_end{ $scope->{query_string} } = \@heard;
    }
    elsif ( $path eq '/receive-across-end' ) {
        # A receive waiting for a body that has not come when the response ends.
        my $waiting = $receive->();
        await $respond_ok->($send);
        $after_end{ $scope->{query_string} } = [ await $heard->($waiting) ];
    }
    elsif ( $path eq '/concurrent' ) {
        # Three receives called before the body comes (the client waits
        # for 100 Continue): each takes the chunk after the one before it;
        # a cancelled one leaves its chunk to the next.  The body, put
        # back together, is what was sent.
        my @waiting = map { $receive->() } 1 .. 3;
        my $distinct = ( $waiting[0] != $waiting[1] && $waiting[1] != $waiting[2] ) ? 1 : 0;
        $waiting[0]->cancel if $scope->{query_string} eq 'cancel';
        my ( $body, $events ) = ( '', 0 );
        my $more = 1;
        for my $f ( @waiting[ ( $scope->{query_string} eq 'cancel' ? 1 : 0 ) .. 2 ] ) {
            my $e = await $f;
            $events++;
            $body .= $e->{body} // '';
            $more = $e->{more};
            last unless $more;
        }
        while ($more) {
            my $e = await $receive->();
            last if $e->{type} ne 'http.request';
            $body .= $e->{body};
            $more = $e->{more};
        }
        await $reply->( $send, { distinct => $distinct, len => length $body, sha => sha1_hex($body) } );
    }
    elsif ( $path eq '/after-end' ) {
        await $reply->( $send, $after_end{ $scope->{query_string} } // [] );
    }
    elsif ( $path eq '/echo' ) {
        await $reply->( $send, await $read_all->($receive) );
    }
    elsif ( $path eq '/continue-slow' ) {
        # Think for a second before reading: no 100 Continue may go out yet.
        await Future::IO->sleep(1);
        await $reply->( $send, await $read_all->($receive) );
    }
    elsif ( $path eq '/continue-noread' ) {
        await $reply->( $send, { read => 0 } );
    }
    elsif ( $path eq '/slow' ) {
        my ( $n, @more ) = (0);
        for my $i ( 1 .. 5 ) {
            await Future::IO->sleep(0.2);
            my $e = await $receive->();
            last if $e->{type} ne 'http.request';
            $n += length $e->{body};
            push @more, 0 + $e->{more};
        }
        await $reply->( $send, { bytes => $n, events => scalar(@more), more => \@more } );
    }
    else {
        await $reply->( $send, { path => $path } );
    }
};
$app;
APP

my $server = start_server( '--no-access-log', '--max-body-size', 0, $app );
my $port = $server->port;

sub decode_body {
    my ($res) = @_;
    return undef unless $res && defined $res->{body};
    return eval { $JSON->decode( $res->{body} ) };
}

# Read from $sock until $re matches the buffer, the peer closes or $timeout.
sub read_until { ( read_sock(@_) )[0] }

# ---------------------------------------------------------------------------
subtest 'POST with Content-Length arrives intact' => sub {
    my $body = join '', map { chr( ( $_ * 7 + 3 ) % 256 ) } 1 .. 300_000;
    my $res  = http_request( $port, 'POST', '/echo', body => $body, headers => [ [ 'Content-Type', 'application/octet-stream' ] ] );
    is $res->{status}, 200, 'POST /echo answers 200';
    my $got = decode_body($res) // {};
    is $got->{len}, length $body, 'app saw the whole body length (300000 bytes)';
    is $got->{sha}, sha1_hex($body), 'app saw the exact bytes (sha1 matches)';
    my @ev = @{ $got->{events} // [] };
    ok scalar(@ev) >= 1, 'at least one http.request event (got ' . scalar(@ev) . ')';
    is( ( grep { $_->{type} ne 'http.request' } @ev ), 0, 'every event is http.request' );
    is $ev[-1]{more}, 0, 'the last http.request has more=0';
    is( ( grep { ( $_->{more} // -1 ) != 1 } @ev[ 0 .. $#ev - 1 ] ), 0, 'every earlier event has more=1' )
      if @ev > 1;
    note 'events: ' . scalar(@ev);
};

# ---------------------------------------------------------------------------
subtest 'chunked request body is de-chunked and streamed' => sub {
    my $sock = connect_port($port);
    $sock->syswrite( "POST /echo HTTP/1.1\r\nHost: 127.0.0.1:$port\r\nTransfer-Encoding: chunked\r\n"
          . "Connection: close\r\n\r\n" );
    my @pieces = ( 'hello ', 'chunked ', 'world', '!' x 1000 );
    for my $p (@pieces) {
        sleep 0.3;
        $sock->syswrite( sprintf( "%x\r\n%s\r\n", length $p, $p ) );
    }
    sleep 0.3;
    $sock->syswrite("0\r\n\r\n");
    my $raw = read_until( $sock, undef, 10 );
    my $res = parse_response($raw);
    is $res && $res->{status}, 200, 'chunked POST answers 200';
    my $got    = decode_body($res) // {};
    my $expect = join '', @pieces;
    is $got->{len}, length $expect, 'de-chunked length is the payload length (no framing bytes)';
    is $got->{sha}, sha1_hex($expect), 'de-chunked bytes are exactly the payload';
    my @ev = @{ $got->{events} // [] };
    ok scalar(@ev) >= 3, 'paced chunks arrive in several http.request events (got ' . scalar(@ev) . ')';
    is( ( grep { ( $_->{more} // -1 ) != 1 } @ev[ 0 .. $#ev - 1 ] ), 0, 'all but the last event have more=1' );
    is $ev[-1]{more}, 0, 'the last event has more=0';
    is( ( grep { $_->{type} ne 'http.request' } @ev ), 0, 'every event is http.request' );
};

# ---------------------------------------------------------------------------
subtest 'GET gives exactly one empty http.request' => sub {
    my $res = http_request( $port, 'GET', '/echo' );
    is $res->{status}, 200, 'GET /echo answers 200';
    my $got = decode_body($res) // {};
    my @ev  = @{ $got->{events} // [] };
    is scalar(@ev), 1, 'exactly one receive event before the body ended';
    is $ev[0]{type}, 'http.request', 'it is http.request';
    is $ev[0]{body_def}, 1, 'it carries a defined body';
    is $ev[0]{len}, 0, "its body is ''";
    is $ev[0]{more}, 0, 'its more is 0';
};

# ---------------------------------------------------------------------------
subtest 'Expect: 100-continue is answered only when the app reads' => sub {
    my $body = 'continue-body-' . ( 'z' x 100 );
    my $sock = connect_port($port);
    my $t0   = time;
    $sock->syswrite( "POST /continue-slow HTTP/1.1\r\nHost: 127.0.0.1:$port\r\nExpect: 100-continue\r\n"
          . "Content-Length: " . length($body) . "\r\nConnection: close\r\n\r\n" );
    my $early = read_until( $sock, qr/\r\n\r\n/, 0.5 );
    is $early, '', 'nothing (no 100 Continue) within 0.5 s while the app has not called $receive';
    my $interim = read_until( $sock, qr/\r\n\r\n/, 5, $early );
    my $t100    = time - $t0;
    like $interim, qr{\AHTTP/1\.1 100 Continue\r\n\r\n}, 'then "HTTP/1.1 100 Continue" arrives';
    cmp_ok $t100, '>=', 0.8, sprintf( '100 Continue came after the app\'s 1 s think time (%.2fs)', $t100 );
    $interim =~ s{\AHTTP/1\.1 100 Continue\r\n\r\n}{};
    $sock->syswrite($body);
    my $raw = read_until( $sock, undef, 10, $interim );
    my $res = parse_response($raw);
    is $res && $res->{status}, 200, 'final response is 200';
    my $got = decode_body($res) // {};
    is $got->{body}, $body, 'app received the body sent after 100 Continue';
    is $got->{events}[-1]{more}, 0, 'last event more=0';
};

subtest 'no 100 Continue when the app responds without reading' => sub {
    my $sock = connect_port($port);
    $sock->syswrite( "POST /continue-noread HTTP/1.1\r\nHost: 127.0.0.1:$port\r\nExpect: 100-continue\r\n"
          . "Content-Length: 50\r\n\r\n" );
    my $raw = read_until( $sock, qr/\r\n\r\n.*"read":0/s, 5 );
    unlike $raw, qr{HTTP/1\.1 100 Continue}, 'no 100 Continue was sent';
    like $raw, qr{\AHTTP/1\.1 200 }, 'the app\'s 200 is the first thing on the wire';
    my $res = parse_response($raw);
    is decode_body($res)->{read}, 0, 'with the app\'s body' if $res;
};

# ---------------------------------------------------------------------------
subtest 'receives called together get one chunk each, in order' => sub {
    my $body = join '', map { chr( 65 + $_ % 26 ) x 16384 } 0 .. 63;    # 1 MiB, a letter per 16 KiB
    for my $case ( '', 'cancel' ) {
        my $sock = connect_port($port);
        # The first receive asks for 100 Continue; the app has made all
        # three (and cancelled the first) in that turn, before the body.
        $sock->syswrite( "POST /concurrent?$case HTTP/1.1\r\nHost: 127.0.0.1:$port\r\n"
              . "Expect: 100-continue\r\nContent-Length: " . length($body) . "\r\nConnection: close\r\n\r\n" );
        like read_until( $sock, qr/\r\n\r\n/, 5 ), qr{\AHTTP/1\.1 100 Continue\r\n}, 'the receives are waiting';
        my $off = 0;
        while ( $off < length $body ) {
            my $n = $sock->syswrite( $body, 65536, $off );
            last unless defined $n;
            $off += $n;
        }
        my $res = parse_response( read_until( $sock, qr/\}/, 10 ) );
        my $got = decode_body($res) // {};
        my $what = $case ? 'the first cancelled' : 'all three awaited';
        is $got->{distinct}, 1, "$what: three Futures";
        is $got->{len}, length $body, "$what: the body's length, nothing twice, nothing lost";
        is $got->{sha}, sha1_hex($body), "$what: its bytes in order";
    }
};

# ---------------------------------------------------------------------------
# What the app heard, by tag: it is recorded after the response went out.
sub heard_after_end {
    my ($tag) = @_;
    my $t0 = time;
    while ( time - $t0 < 8 ) {
        my $got = decode_body( http_request( $port, 'GET', "/after-end?$tag" ) );
        return $got if $got && @$got;
        sleep 0.1;
    }
    return [];
}

subtest 'a receive after the response completed hears http.disconnect, not the unread body' => sub {
    for my $round ( 1 .. 3 ) {
        my $tag  = "after$round";
        my $sock = connect_port($port);
        # A 1 MiB body of which a quarter is sent: the app answers first.
        $sock->syswrite( "POST /respond-then-receive?$tag HTTP/1.1\r\nHost: 127.0.0.1:$port\r\n"
              . "Content-Length: 1048576\r\n\r\n" . ( 'b' x 262_144 ) );
        my $raw = read_until( $sock, qr/\r\n\r\nok\n/, 5 );
        like $raw, qr{\AHTTP/1\.1 200 .*ok\n\z}s, "round $round: the app's response came before the body ended";
        my $t0    = time;
        my $heard = heard_after_end($tag);
        is_deeply $heard, ['http.disconnect'], "round $round: its receives heard only http.disconnect";
        cmp_ok time - $t0, '<', 2, "round $round: at once, not after the app's 3 s timeout";
        close $sock;
    }
};

subtest 'a receive waiting for the body when the response completes hears http.disconnect' => sub {
    my $sock = connect_port($port);
    $sock->syswrite( "POST /receive-across-end?across HTTP/1.1\r\nHost: 127.0.0.1:$port\r\n"
          . "Content-Length: 100\r\n\r\n" );
    my $raw = read_until( $sock, qr/\r\n\r\nok\n/, 5 );
    like $raw, qr{\AHTTP/1\.1 200 .*ok\n\z}s, 'the app responded with none of the body sent';
    my $t0 = time;
    is_deeply heard_after_end('across'), ['http.disconnect'], 'the waiting receive heard http.disconnect';
    cmp_ok time - $t0, '<', 2, 'at once, not after the app\'s 3 s timeout';
    close $sock;
};

# ---------------------------------------------------------------------------
subtest 'request body backpressure: a slow reader holds a 50 MB upload back' => sub {
    # warm up so the baseline includes the app's first-request allocations
    http_request( $port, 'POST', '/echo', body => 'x' x 100_000 );
    my $pid      = $server->pid;
    my $baseline = vmrss_kb($pid);
    ok defined $baseline, "VmRSS readable for pid $pid ($baseline kB)";

    my $total = 50_000_000;
    my $sock  = connect_port($port);
    $sock->syswrite( "POST /slow HTTP/1.1\r\nHost: 127.0.0.1:$port\r\nContent-Length: $total\r\nConnection: close\r\n\r\n" );
    $sock->blocking(0);
    my $chunk   = 'u' x 65536;
    my $pushed  = 0;
    my $max_rss = $baseline // 0;
    my $resp    = '';
    my $pushed_at_response;
    my $t0  = time;
    my $sel = IO::Select->new($sock);
    while ( time - $t0 < 1.5 && $pushed < $total ) {
        my $n = $sock->syswrite( $chunk, 65536 );
        if ( defined $n ) { $pushed += $n }
        elsif ( $! != EAGAIN && $! != EWOULDBLOCK && $! != EINTR ) { last }
        else {
            # blocked: wait a little for writability, and watch for the response
            $sel->can_write(0.02);
        }
        if ( $sel->can_read(0) ) {
            my $r = $sock->sysread( $resp, 65536, length $resp );
            $pushed_at_response //= $pushed if $r;
        }
        my $rss = vmrss_kb($pid);
        $max_rss = $rss if defined $rss && $rss > $max_rss;
    }
    my $elapsed = time - $t0;
    note sprintf 'pushed %d bytes in %.2fs (%d before the response); RSS baseline %d kB, max %d kB',
      $pushed, $elapsed, $pushed_at_response // -1, $baseline // -1, $max_rss;
    cmp_ok $pushed, '<', 8_000_000, "client could push only $pushed of 50 MB in 1.5 s (its writes block)";
    cmp_ok $max_rss - ( $baseline // 0 ), '<', 30 * 1024, 'server RSS grew by less than 30 MB during the upload';

    # Now collect the app's answer (it reads 5 events, then responds).
    $sock->blocking(1);
    $resp = read_until( $sock, qr/\r\n\r\n.*\}/s, 10, $resp );
    my $res = parse_response($resp);
    is $res && $res->{status}, 200, 'the slow reader still answered 200';
    my $got = decode_body($res) // {};
    is $got->{events}, 5, 'app received 5 http.request events';
    cmp_ok $got->{bytes} // 0, '>', 0, "app received some body bytes ($got->{bytes})";
    cmp_ok $got->{bytes} // 0, '<=', $pushed, 'no more than the client pushed';
    is_deeply $got->{more}, [ 1, 1, 1, 1, 1 ], 'all 5 events had more=1 (upload still going)';
    close $sock;
    ok $server->is_running, 'server still running';
};

my $after = http_request( $port, 'GET', '/other' );
is $after->{status}, 200, 'server still serves after the body tests';
is $server->stop('TERM'), 0, 'SIGTERM exits 0';
done_testing;
