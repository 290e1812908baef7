use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;
use File::Temp qw(tempdir);
use Time::HiRes qw(time sleep);

# HTTP/1.1 framing at the edges: a client that half-closes after its
# requests is still answered; HTTP/1.0 responses of unknown length say
# `Connection: close`; a malformed or oversized chunked body gets a status
# and the app hears why; the request gate checks every request on the
# connection (no second parser that drifts); CONNECT gets 501.

$SIG{PIPE} = 'IGNORE';
my $dir = tempdir( CLEANUP => 1 );

my $app = write_app(<<"APP");
use strict; use warnings;
use Future::AsyncAwait; use Future::IO; use JSON::PP;
my \$dir = '$dir';
my \$J = JSON::PP->new->canonical;
sub rec {
    my (\$file, \$data) = \@_;
    open my \$fh, '>>', "\$dir/\$file" or die "open: \$!";
    print \$fh \$J->encode(\$data), "\\n";
    close \$fh;
}
my \$plain = [['content-type', 'text/plain']];
async sub read_body {
    my (\$receive) = \@_;
    my (\$len, \$last) = (0, undef);
    while (1) {
        my \$e = await \$receive->();
        \$last = \$e;
        last if \$e->{type} ne 'http.request';
        \$len += length(\$e->{body} // '');
        last unless \$e->{more};
    }
    return (\$len, \$last);
}
async sub answer {
    my (\$send, \$text) = \@_;
    await \$send->({ type => 'http.response.start', status => 200,
        headers => [['content-type', 'text/plain'], ['content-length', length \$text]] });
    await \$send->({ type => 'http.response.body', body => \$text });
}
my \$app = async sub {
    my (\$scope, \$receive, \$send) = \@_;
    return if \$scope->{type} eq 'lifespan';
    my \$path = \$scope->{path};
    my \$c = \$scope->{'pagi.connection'};
    if (\$scope->{type} eq 'sse') {
        await \$send->({ type => 'sse.start', status => 200 });
        await \$send->({ type => 'sse.send', data => 'hi' });
        await \$send->({ type => 'sse.close' });
        return;
    }
    rec('seen', { path => \$path });
    if (\$path eq '/slow') {
        await Future::IO->sleep(0.5);
    }
    if (\$path eq '/slow-stream') {
        await Future::IO->sleep(0.3);
    }
    if (\$path =~ m{^/(?:slow-)?stream\\z}) {
        await \$send->({ type => 'http.response.start', status => 200, headers => \$plain });
        await \$send->({ type => 'http.response.body', body => 'part1-', more => 1 });
        await \$send->({ type => 'http.response.body', body => 'part2', more => 0 });
        return;
    }
    if (\$path eq '/big-late') {
        await Future::IO->sleep(0.5);
        await \$send->({ type => 'http.response.start', status => 200, headers => \$plain });
        my (\$sent, \$chunk) = (0, 'x' x 65536);
        for my \$i (1 .. 400) {
            await \$send->({ type => 'http.response.body', body => \$chunk, more => 1 });
            \$sent++;
            last unless \$c->is_connected;
        }
        rec('big-late', { reason => \$c->disconnect_reason, detail => \$c->disconnect_detail, sent => \$sent });
        return;
    }
    if (\$path =~ m{^/read}) {
        my (\$len, \$last) = await read_body(\$receive);
        rec('read', { path => \$path, len => \$len, last => \$last->{type},
            reason => \$c->disconnect_reason, detail => \$c->disconnect_detail });
        await answer(\$send, "read \$len") if \$last->{type} eq 'http.request';
        return;
    }
    my (\$len) = await read_body(\$receive);
    await answer(\$send, "\$path \$len");
};
\$app;
APP

my $server = start_server( '--max-body-size', 1000, $app );
my $port   = $server->port;

# Send, shut down the sending side, read until the server closes.
sub half_closed_exchange {
    my ( $bytes, $timeout ) = @_;
    my $s = connect_port($port);
    $s->syswrite($bytes);
    shutdown( $s, 1 ) or die "shutdown: $!";
    my ( $buf, $closed ) = read_sock( $s, undef, $timeout // 5 );
    return ( $buf, $closed );
}

sub responses {
    my ($raw) = @_;
    my @r;
    while ( length $raw ) {
        my $res = parse_response($raw) or last;
        push @r, $res;
        my $i = index( $raw, "\r\n\r\n" );
        my $len = $res->{headers}{'content-length'} ? $res->{headers}{'content-length'}[0] : length $raw;
        substr( $raw, 0, $i + 4 + $len, '' );
    }
    return @r;
}

my $host = "Host: 127.0.0.1\r\n";

# ---------------------------------------------------------------------------
subtest 'a client that half-closes after its requests gets every response' => sub {
    my ( $raw, $closed ) = half_closed_exchange("GET /one HTTP/1.1\r\n$host\r\n");
    my @r = responses($raw);
    is scalar @r, 1, 'one response';
    is $r[0] && $r[0]{body}, '/one 0', 'its body';
    ok $closed, 'then the server closes';

    ( $raw, $closed ) = half_closed_exchange( "GET /a HTTP/1.1\r\n$host\r\n"
          . "POST /b HTTP/1.1\r\n${host}Content-Length: 5\r\n\r\nhello"
          . "GET /slow HTTP/1.1\r\n$host\r\n" );
    @r = responses($raw);
    is_deeply [ map { $_->{body} } @r ], [ '/a 0', '/b 5', '/slow 0' ],
      'three pipelined requests, the last one answered after 0.5 s: all answered in order';
    ok $closed, 'then the server closes';

    ( $raw, $closed ) =
      half_closed_exchange("POST /c HTTP/1.1\r\n${host}Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n");
    @r = responses($raw);
    is $r[0] && $r[0]{body}, '/c 3', 'a chunked body, then the half-close';

    # The app answers after the FIN is in: a FIN that comes only after
    # response bytes went out is taken for the client leaving.
    ( $raw, $closed ) = half_closed_exchange("GET /slow-stream HTTP/1.1\r\n$host\r\n");
    @r = responses($raw);
    is $r[0] && $r[0]{body}, 'part1-part2', 'a streamed (chunked) response is complete';
    ok !$r[0]{incomplete}, 'with its last chunk';
};

subtest 'an end of stream in the middle of a request is the client leaving' => sub {
    my ( $raw, $closed ) = half_closed_exchange("POST /read-cut HTTP/1.1\r\n${host}Content-Length: 10\r\n\r\nabc");
    is $raw, '', 'no response';
    ok $closed, 'closed';
    my $r = wait_json_record( "$dir/read", sub { $_[0]{path} eq '/read-cut' } );
    is $r && $r->{last}, 'http.disconnect', 'the app reading the body hears http.disconnect';
    is $r && $r->{reason}, 'client_closed', 'client_closed';
};

subtest 'a client that closed completely is noticed when a write fails' => sub {
    my $s = connect_port($port);
    $s->syswrite("GET /big-late HTTP/1.1\r\n$host\r\n");
    wait_json_record( "$dir/seen", sub { $_[0]{path} eq '/big-late' } ) or fail('the app started');
    close $s;    # a FIN, like a half-close; the socket is gone though
    my $r = wait_json_record( "$dir/big-late", sub { 1 }, 10 );
    is $r && $r->{reason}, 'client_closed', 'the app hears client_closed once writing fails';
    ok $r && $r->{sent} < 400, "it stopped sending ($r->{sent} of 400 chunks went out)" if $r;
    like $r && $r->{detail}, qr/\S/, 'with a detail';
};

# ---------------------------------------------------------------------------
subtest 'HTTP/1.0: a body of unknown length closes the connection and says so' => sub {
    my $s = connect_port($port);
    $s->syswrite("GET /stream HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    my ( $raw, $closed ) = read_sock( $s, undef, 5 );
    my $r = parse_response($raw) // {};
    is $r->{protocol}, 'HTTP/1.0', 'an HTTP/1.0 response';
    is_deeply $r->{headers}{connection}, ['close'], 'Connection: close, not keep-alive';
    ok !$r->{headers}{'content-length'} && !$r->{headers}{'transfer-encoding'}, 'no length, no chunking';
    like $raw, qr/\r\n\r\npart1-part2\z/, 'the body runs to the end of the connection';
    ok $closed, 'which the server closes';

    $s = connect_port($port);
    $s->syswrite("GET /x HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    ( $raw, $closed ) = read_sock( $s, qr{/x 0\z}, 5 );
    $r = parse_response($raw) // {};
    is_deeply $r->{headers}{connection}, ['keep-alive'], 'with a Content-Length, keep-alive is kept';
    ok !$closed, 'and the connection stays open';
    $s->syswrite("GET /y HTTP/1.0\r\n\r\n");
    ( $raw, $closed ) = read_sock( $s, undef, 5 );
    like $raw, qr{\r\n\r\n/y 0\z}, 'for the next request';

    ( $raw, $closed ) = raw_request( $port, "GET /ev HTTP/1.0\r\nConnection: keep-alive\r\nAccept: text/event-stream\r\n\r\n" );
    $r = parse_response($raw) // {};
    is_deeply $r->{headers}{connection}, ['close'], 'SSE over HTTP/1.0: Connection: close';
    like $raw, qr/data: hi\n\n\z/, 'the stream ends with the connection';
};

# ---------------------------------------------------------------------------
sub chunked_post {
    my ( $path, $body ) = @_;
    return "POST $path HTTP/1.1\r\n${host}Transfer-Encoding: chunked\r\n\r\n$body";
}

subtest 'a malformed chunked body gets 400 and the app hears protocol_error' => sub {
    my %bad = (
        '3x'        => "3x\r\nabc\r\n0\r\n\r\n",
        'space-3'   => " 3\r\nabc\r\n0\r\n\r\n",
        '0x3'       => "0x3\r\nabc\r\n0\r\n\r\n",
        'overflow'  => "ffffffffffffffffff\r\nabc\r\n0\r\n\r\n",
        'bare-lf'   => "3\nabc\r\n0\r\n\r\n",
        'plus-5'    => "+5\r\nhello\r\n0\r\n\r\n",
        'no-crlf'   => "3\r\nabcXY0\r\n\r\n",
    );
    for my $name ( sort keys %bad ) {
        my $path = "/read-$name";
        # The first chunk is good, so the app is reading when the bad line comes.
        my ( $raw, $closed ) = raw_request( $port, chunked_post( $path, "2\r\nok\r\n" . $bad{$name} ) );
        my $r = parse_response($raw) // {};
        is $r->{status}, 400, "$name: 400";
        is_deeply $r->{headers}{'content-type'}, ['text/plain'], "$name: text/plain";
        is_deeply $r->{headers}{connection}, ['close'], "$name: Connection: close";
        ok $closed, "$name: the connection is closed";
        my $rec = wait_json_record( "$dir/read", sub { $_[0]{path} eq $path } );
        is $rec && $rec->{last}, 'http.disconnect', "$name: the pending receive gets http.disconnect";
        is $rec && $rec->{reason}, 'protocol_error', "$name: disconnect_reason protocol_error";
        like $rec && $rec->{detail}, qr/chunk/, "$name: the detail names the rule (" . ( $rec ? $rec->{detail} // 'undef' : '' ) . ')';
    }
    my $rec = wait_json_record( "$dir/read", sub { $_[0]{path} eq '/read-3x' } );
    is $rec && $rec->{detail}, 'invalid chunk size line', 'e.g. "invalid chunk size line"';
};

subtest 'limits on a chunked body: 413 over the body limit, 400/431 for long lines' => sub {
    my ( $raw, $closed ) = raw_request( $port, chunked_post( '/read-big', "200\r\n" . ( 'a' x 512 ) . "\r\n200\r\n" ) );
    my $r = parse_response($raw) // {};
    is $r->{status}, 413, 'over --max-body-size: 413';
    is_deeply $r->{headers}{connection}, ['close'], 'Connection: close';
    ok $closed, 'closed';
    my $rec = wait_json_record( "$dir/read", sub { $_[0]{path} eq '/read-big' } );
    is $rec && $rec->{reason}, 'body_too_large', 'the app hears body_too_large';
    like $rec && $rec->{detail}, qr/max-body-size \(1000 bytes\)/, 'with the limit';

    ( $raw, $closed ) = raw_request( $port, chunked_post( '/read-longline', '1;' . ( 'e' x 5000 ) . "\r\nx\r\n0\r\n\r\n" ) );
    $r = parse_response($raw) // {};
    is $r->{status}, 400, 'a chunk-size line over 4096 bytes: 400';
    $rec = wait_json_record( "$dir/read", sub { $_[0]{path} eq '/read-longline' } );
    is $rec && $rec->{detail}, 'chunk size line too long', 'detail';

    ( $raw, $closed ) =
      raw_request( $port, chunked_post( '/read-trailers', "1\r\nx\r\n0\r\nx-big: " . ( 'b' x 9000 ) . "\r\n\r\n" ) );
    $r = parse_response($raw) // {};
    is $r->{status}, 431, 'trailers over --max-header-size: 431';
};

# ---------------------------------------------------------------------------
subtest 'the gate checks every request on the connection' => sub {
    my $dup = "POST /second HTTP/1.1\r\n${host}Content-Length: 1\r\nContent-Length: 1\r\n\r\nx";
    for my $case (
        [ 'after a long chunk extension', chunked_post( '/first', '1;' . ( 'e' x 3000 ) . "\r\nx\r\n0\r\n\r\n" ) ],
        [ 'after large trailers', chunked_post( '/first', "1\r\nx\r\n0\r\n" . join( '', map { "x-t$_: " . ( 'v' x 60 ) . "\r\n" } 1 .. 90 ) . "\r\n" ) ],
        [ 'after an Upgrade that was not taken up', "GET /first HTTP/1.1\r\n${host}Upgrade: h2c\r\nConnection: upgrade\r\n\r\n" ],
    ) {
        my ( $what, $first ) = @$case;
        my ( $raw, $closed ) = raw_request( $port, $first . $dup );
        my @r = responses($raw);
        is $r[0] && $r[0]{status}, 200, "$what: the first request is served";
        is $r[1] && $r[1]{status}, 400, "$what: the second (two Content-Lengths) is refused";
        ok $closed, "$what: and the connection closed";
    }
    ok !wait_json_record( "$dir/seen", sub { $_[0]{path} eq '/second' }, 0 ), 'the app never saw a refused request';

    my ( $raw, $closed ) = raw_request( $port, chunked_post( '/plus', "+5\r\nhello\r\n0\r\n\r\n" ) );
    is( ( parse_response($raw) // {} )->{status}, 400, 'a chunk size of "+5" is refused' );
};

subtest 'CONNECT gets 501, and nothing after it is read' => sub {
    my ( $raw, $closed ) =
      raw_request( $port, "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\nGET /after-connect HTTP/1.1\r\n$host\r\n" );
    my @r = responses($raw);
    is scalar @r, 1, 'one response';
    is $r[0] && $r[0]{status}, 501, 'status 501';
    is $r[0] && $r[0]{body}, 'Not Implemented', 'Not Implemented';
    is_deeply $r[0] && $r[0]{headers}{'content-type'}, ['text/plain'], 'text/plain';
    is_deeply $r[0] && $r[0]{headers}{connection}, ['close'], 'Connection: close';
    ok $closed, 'closed';
    ok !wait_json_record( "$dir/seen", sub { $_[0]{path} eq '/after-connect' }, 0.3 ), 'the request after it never reached the app';
    like $server->output, qr/"CONNECT \/?\S*" 501/, 'access-logged as a CONNECT';
};

ok $server->is_running, 'the server is still up';
done_testing;
