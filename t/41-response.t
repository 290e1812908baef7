use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;
use Digest::SHA qw(sha1_hex);
use File::Temp qw(tempdir);
use Time::HiRes qw(time sleep);

# Response framing and body sources, checked on the raw wire: chunked
# streaming, Content-Length, Date, hop-by-hop stripping, file/fh bodies,
# trailers, HEAD, keep-alive, pipelining, HTTP/1.0, fullflush, big bodies.

$SIG{PIPE} = 'IGNORE';
my $dir = tempdir( CLEANUP => 1 );

# A data file with a recognisable pattern (100 000 bytes).
my $content = join '', map { sprintf '%09d|', $_ } 0 .. 9_999;
my $data_file = "$dir/data.bin";
{ open my $fh, '>:raw', $data_file or die $!; print $fh $content; close $fh }
# Larger than the window a file producer keeps queued (256 KiB).
my $big_file = "$dir/big.bin";
{ open my $fh, '>:raw', $big_file or die $!; print $fh $content x 6; close $fh }
my $report = "$dir/report.txt";
my $missing = "$dir/does-not-exist.bin";

my $app_head = <<"APP";
use strict;
use warnings;
use Future::AsyncAwait;
use Future::IO;
use Future;

my \$DATA    = '$data_file';
my \$BIG     = '$big_file';
my \$MISSING = '$missing';
my \$REPORT  = '$report';
APP
my $app = write_app( $app_head . <<'APP', 'response-app.pl' );

sub report {
    open my $fh, '>', $REPORT or die "report: $!";
    print $fh @_;
    close $fh;
}

# 'resolved' if $f settles within $secs, else 'timeout'.
sub settled_within {
    my ( $f, $secs ) = @_;
    return Future->wait_any(
        $f->then( sub { Future->done('resolved') } ),
        Future::IO->sleep($secs)->then( sub { Future->done('timeout') } ),
    );
}

my $app = async sub {
    my ( $scope, $receive, $send ) = @_;
    return if $scope->{type} eq 'lifespan';
    my $path = $scope->{path};
    my $start = sub {
        my ( $status, @h ) = @_;
        return $send->( { type => 'http.response.start', status => $status, headers => [ [ 'content-type', 'text/plain' ], @h ] } );
    };

    if ( $path eq '/chunks' ) {
        await $start->(200);
        await $send->( { type => 'http.response.body', body => 'aaa',  more => 1 } );
        await $send->( { type => 'http.response.body', body => 'bbbb', more => 1 } );
        await $send->( { type => 'http.response.body', body => 'cc',   more => 0 } );
    }
    elsif ( $path eq '/lines' ) {
        await $start->(200);
        for my $i ( 1 .. 200 ) { await $send->( { type => 'http.response.body', body => "line $i\n", more => 1 } ) }
        await $send->( { type => 'http.response.body', body => '', more => 0 } );
    }
    elsif ( $path eq '/cl' ) {
        await $start->( 200, [ 'content-length', 5 ] );
        await $send->( { type => 'http.response.body', body => 'he', more => 1 } );
        await $send->( { type => 'http.response.body', body => 'llo', more => 0 } );
    }
    elsif ( $path eq '/hop' ) {
        await $start->( 200, [ 'content-length', 2 ], [ 'transfer-encoding', 'chunked' ], [ 'connection', 'close' ],
            [ 'x-app', 'kept' ] );
        await $send->( { type => 'http.response.body', body => 'ok', more => 0 } );
    }
    elsif ( $path eq '/hop-nocl' ) {
        await $start->( 200, [ 'transfer-encoding', 'identity' ], [ 'connection', 'close' ] );
        await $send->( { type => 'http.response.body', body => 'streamed', more => 0 } );
    }
    elsif ( $path eq '/file' ) {
        await $start->(200);
        await $send->( { type => 'http.response.body', file => $DATA } );
    }
    elsif ( $path eq '/file-range' ) {
        await $start->(200);
        await $send->( { type => 'http.response.body', file => $DATA, offset => 1000, length => 2500 } );
    }
    elsif ( $path eq '/file-eof' ) {
        await $start->(200);
        await $send->( { type => 'http.response.body', file => $DATA, offset => 10_000_000 } );
    }
    elsif ( $path eq '/file-missing' ) {
        # The send must fail without changing the response state, so the app
        # can still finish the response with an alternative body.
        await $start->(200);
        my $ok = eval { await $send->( { type => 'http.response.body', file => $MISSING } ); 1 };
        my $err = $@ // '';
        $err =~ s/\s+\z//;
        if ($ok) {
            await $send->( { type => 'http.response.body', body => '', more => 0 } );
        }
        else {
            await $send->( { type => 'http.response.body', body => "404 fallback; send failed: $err", more => 0 } );
        }
    }
    elsif ( $path eq '/file-missing-404' ) {
        # Check the file first by trying to send it on a response that has not
        # started is impossible (body before start is a sequence error), so the
        # recoverable pattern is: stat, then answer 404 when it is missing.
        if ( -e $MISSING ) {
            await $start->(200);
            await $send->( { type => 'http.response.body', file => $MISSING } );
        }
        else {
            await $start->( 404, [ 'content-length', 9 ] );
            await $send->( { type => 'http.response.body', body => 'not found', more => 0 } );
        }
    }
    elsif ( $path eq '/fh' ) {
        open my $fh, '<:raw', $DATA or die $!;
        await $start->(200);
        await $send->( { type => 'http.response.body', fh => $fh } );
        close $fh;
    }
    elsif ( $path eq '/fh-range' ) {
        open my $fh, '<:raw', $DATA or die $!;
        await $start->(200);
        await $send->( { type => 'http.response.body', fh => $fh, offset => 5000, length => 1234 } );
        close $fh;
    }
    elsif ( $path eq '/fh-mem' ) {
        my $string = "in-memory handle contents\n" x 100;
        open my $fh, '<', \$string or die $!;
        await $start->(200);
        await $send->( { type => 'http.response.body', fh => $fh } );
        close $fh;
    }
    elsif ( $path eq '/fh-mem-range' ) {
        my $string = join '', 'a' .. 'z';
        open my $fh, '<', \$string or die $!;
        await $start->(200);
        await $send->( { type => 'http.response.body', fh => $fh, offset => 3, length => 5 } );
        close $fh;
    }
    elsif ( $path eq '/trailers' ) {
        await $send->( { type => 'http.response.start', status => 200, trailers => 1,
            headers => [ [ 'content-type', 'text/plain' ], [ 'trailer', 'x-checksum' ] ] } );
        await $send->( { type => 'http.response.body', body => 'trailer-body', more => 0 } );
        await $send->( { type => 'http.response.trailers', headers => [ [ 'x-checksum', 'abc123' ] ] } );
    }
    elsif ( $path eq '/trailers-unnamed-big' ) {
        # Trailers promised, not named: the head waits for the trailers
        # event.  A body over the high-water mark and a flush before it
        # must not wait for a drain that only the trailers can start.
        await $send->( { type => 'http.response.start', status => 200, trailers => 1, headers => [] } );
        my @r;
        push @r, 'body='
          . await settled_within( $send->( { type => 'http.response.body', body => 'b' x 300_000, more => 0 } ), 3 );
        push @r, 'flush=' . await settled_within( $send->( { type => 'http.fullflush' } ), 3 );
        push @r, 'trailers='
          . await settled_within( $send->( { type => 'http.response.trailers', headers => [ [ 'x-t', '1' ] ] } ), 3 );
        report("@r\n");
    }
    elsif ( $path eq '/untidy-fields' ) {
        # Values padded with spaces and tabs, and trailers that carry fields
        # only a head may (framing, connection), with no Trailer header.
        await $send->( { type => 'http.response.start', status => 200, trailers => 1,
            headers => [ [ 'x-pad', " \t padded \t " ], [ 'x-blank', "\t" ] ] } );
        await $send->( { type => 'http.response.body', body => 'untidy', more => 0 } );
        await $send->( { type => 'http.response.trailers', headers => [ [ 'content-length', 'v' ],
            [ 'x-checksum', " abc\t" ], [ 'connection', 'close' ], [ 'transfer-encoding', 'chunked' ] ] } );
    }
    elsif ( $path eq '/trailers-cl' || $path eq '/trailers-cl-late' ) {
        my $conn = $scope->{'pagi.connection'};
        await $send->( { type => 'http.response.start', status => 200, trailers => 1,
            headers => [ [ 'content-type', 'text/plain' ], [ 'content-length', 4 ] ] } );
        await $send->( { type => 'http.response.body', body => 'data', more => 0 } );
        # The late variant computes its trailers for a moment first.
        await Future::IO->sleep(0.3) if $path eq '/trailers-cl-late';
        my $ok = eval { await $send->( { type => 'http.response.trailers', headers => [ [ 'x-t', '1' ] ] } ); 1 };
        my $err = $@ // '';
        $err =~ s/\s+\z//;
        report( ( $ok ? 'ok' : "failed: $err" ) . '; reason=' . ( $conn->disconnect_reason // 'none' ) . "\n" );
    }
    elsif ( $path eq '/head' ) {
        await $start->( 200, [ 'content-length', 11 ] );
        await $send->( { type => 'http.response.body', body => 'hello world', more => 0 } );
    }
    elsif ( $path eq '/fullflush' ) {
        await $start->(200);
        await $send->( { type => 'http.response.body', body => 'before-flush;', more => 1 } );
        my $f = $send->( { type => 'http.fullflush' } );
        my $r = await Future->wait_any(
            $f->then( sub { Future->done('resolved') } ),
            Future::IO->sleep(3)->then( sub { Future->done('timeout') } ),
        );
        await $send->( { type => 'http.response.body', body => "fullflush=$r", more => 0 } );
    }
    elsif ( $path =~ m{^/fullflush-after/(\d+)$} ) {
        # The whole body is queued before the network has taken the head;
        # a 204 or 304 then never writes it, and the flush must still end.
        await $start->($1);
        await $send->( { type => 'http.response.body', body => 'yyy', more => 0 } );
        my $r = await settled_within( $send->( { type => 'http.fullflush' } ), 3 );
        report("fullflush=$r\n");
    }
    elsif ( $path =~ m{^/(file|fh)-after/(\d+)$} ) {
        # A body larger than the producer's window on a response that never
        # writes one: the send must end all the same.
        my ( $kind, $status ) = ( $1, $2 );
        await $start->($status);
        my %body = ( file => $BIG );
        if ( $kind eq 'fh' ) { open my $fh, '<:raw', $BIG or die $!; %body = ( fh => $fh ) }
        my $r = await settled_within( $send->( { type => 'http.response.body', %body } ), 3 );
        report("$kind=$r\n");
    }
    elsif ( $path =~ m{^/pipe-(endless|stalled)/(\d+)$} ) {
        # A pipe that never ends, or falls silent after its first line, as
        # the body of a response that writes none: once the head is out,
        # the server stops reading it.
        my ( $kind, $status ) = ( $1, $2 );
        await $start->($status);
        my @cmd = $kind eq 'endless' ? ('yes') : ( 'sh', '-c', 'echo hi; exec sleep 30' );
        my $pid = open my $fh, '-|', @cmd or die "open @cmd: $!";
        my $r = await settled_within( $send->( { type => 'http.response.body', fh => $fh } ), 4 );
        kill 'TERM', $pid;
        close $fh;
        report("$kind=$r\n");
    }
    elsif ( $path eq '/big' ) {
        my $body = join '', map { sprintf '%07d', $_ } 0 .. 142_856;    # 1 000 000 bytes
        await $start->(200);
        await $send->( { type => 'http.response.body', body => $body, more => 0 } );
    }
    else {
        my $b = "path=$path";
        await $start->( 200, [ 'content-length', length $b ] );
        await $send->( { type => 'http.response.body', body => $b, more => 0 } );
    }
};
$app;
APP

my $server = start_server( '--no-access-log', $app );
my $port = $server->port;

sub get {
    my ( $path, %o ) = @_;
    my $method = $o{method} // 'GET';
    my $req = "$method $path HTTP/1.1\r\nHost: 127.0.0.1:$port\r\nConnection: close\r\n";
    $req .= "$_->[0]: $_->[1]\r\n" for @{ $o{headers} // [] };
    $req .= "\r\n";
    my $raw = raw_request( $port, $req, timeout => 10 );
    return ( $raw, parse_response($raw) // { status => 0 } );
}

# The response ended with its framing intact: the 0 chunk for chunked, all
# the declared bytes for Content-Length.
sub terminated {
    my ($res) = @_;
    my $te = join ',', @{ $res->{headers}{'transfer-encoding'} // [] };
    return $te =~ /chunked/i ? !!$res->{complete} : ( defined $res->{headers}{'content-length'} && !$res->{incomplete} );
}

# GET (or $o{method}) $path and the line the app then reports, waited for
# up to 8 s: the app reports after its response is out.
sub get_then_report {
    my ( $path, %o ) = @_;
    unlink $report;
    my ( $raw, $res ) = get( $path, %o );
    my $deadline = time + 8;
    sleep 0.05 while !-s $report && time < $deadline;
    return ( $raw, $res, slurp($report) );
}

sub head_of { my ($raw) = @_; my $i = index $raw, "\r\n\r\n"; $i < 0 ? $raw : substr $raw, 0, $i + 4 }
sub body_of { my ($raw) = @_; my $i = index $raw, "\r\n\r\n"; $i < 0 ? '' : substr $raw, $i + 4 }

# ---------------------------------------------------------------------------
subtest 'body in several chunks is chunk-framed on the wire' => sub {
    my ( $raw, $res ) = get('/chunks');
    is $res->{status}, 200, 'status 200';
    like head_of($raw), qr/^transfer-encoding:\s*chunked\r$/mi, 'Transfer-Encoding: chunked';
    unlike head_of($raw), qr/^content-length:/mi, 'no Content-Length';
    my @sizes = chunk_sizes( body_of($raw) );
    ok @sizes >= 2 && $sizes[-1] == 0, 'chunks, then the 0 chunk' or diag explain \@sizes;
    ok !( grep { $_ == 0 } @sizes[ 0 .. $#sizes - 1 ] ), 'no empty chunk before the end';
    like body_of($raw), qr/\r\n0\r\n\r\n\z/, 'the wire ends with the 0 chunk';
    is $res->{body}, 'aaabbbbcc', 'de-chunked body';
};

# Body events queued before the network takes them leave together: the
# framing is the server's (Www 0.6), and one chunk per tiny event would cost
# a chunk header and a pass through hyper each.
subtest 'small body events sent in a row share chunks' => sub {
    my ( $raw, $res ) = get('/lines');
    is $res->{status}, 200, 'status 200';
    is $res->{body}, join( '', map { "line $_\n" } 1 .. 200 ), 'every line, in order';
    ok $res->{complete}, 'ended by the 0 chunk';
    my @sizes = chunk_sizes( body_of($raw) );
    cmp_ok scalar(@sizes) - 1, '<', 20, '200 events in far fewer chunks' or diag explain \@sizes;
};

# The sizes of the chunks in a raw chunked body, the final 0 included.
sub chunk_sizes {
    my ($body) = @_;
    my @sizes;
    while ( $body =~ s/^([0-9a-fA-F]+)\r\n// ) {
        my $len = hex $1;
        push @sizes, $len;
        last if $len == 0;
        substr( $body, 0, $len + 2, '' );
    }
    return @sizes;
}

subtest 'Content-Length from the app => no chunking; Date present' => sub {
    my ( $raw, $res ) = get('/cl');
    is $res->{status}, 200, 'status 200';
    is_deeply $res->{headers}{'content-length'}, ['5'], 'exactly one Content-Length: 5';
    ok !exists $res->{headers}{'transfer-encoding'}, 'no Transfer-Encoding';
    is body_of($raw), 'hello', 'raw body is exactly the 5 bytes (two sends, no framing)';
    like $res->{headers}{date}[0] // '', qr/^(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d\d (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) \d{4} \d\d:\d\d:\d\d GMT$/,
      'Date header in IMF-fixdate format';
    is scalar @{ $res->{headers}{date} // [] }, 1, 'one Date header';
    my ( $raw2, $res2 ) = get('/chunks');
    ok $res2->{headers}{date}, 'Date also on a chunked response';
};

subtest 'app-supplied Transfer-Encoding and Connection are not on the wire' => sub {
    my $sock = connect_port($port);
    $sock->syswrite("GET /hop HTTP/1.1\r\nHost: 127.0.0.1:$port\r\n\r\n");
    my ($raw) = read_sock( $sock, qr/\r\n\r\nok/, 5 );
    my $res = parse_response($raw) // {};
    is $res->{status}, 200, 'status 200';
    ok !exists $res->{headers}{'transfer-encoding'}, 'app Transfer-Encoding: chunked is not on the wire (CL response)';
    ok !exists $res->{headers}{connection}, 'app Connection: close is not on the wire';
    is_deeply $res->{headers}{'x-app'}, ['kept'], 'other app headers are kept';
    is $res->{body}, 'ok', 'body intact under Content-Length framing';
    # The app's "Connection: close" must not decide the connection's fate.
    $sock->syswrite("GET /second HTTP/1.1\r\nHost: 127.0.0.1:$port\r\nConnection: close\r\n\r\n");
    my ($raw2) = read_sock( $sock, qr/path=\/second/, 5 );
    like $raw2, qr{^HTTP/1\.1 200 .*path=/second}s, 'connection stayed open: second request answered';

    my ( $raw3, $res3 ) = get('/hop-nocl');
    is $res3->{status}, 200, 'no-CL variant: status 200';
    is_deeply $res3->{headers}{'transfer-encoding'}, ['chunked'], 'server framing (chunked) replaces the app\'s "identity"';
    my @conn = grep { !/^close$/i } @{ $res3->{headers}{connection} // [] };
    is scalar(@conn), 0, 'no app Connection value on the wire';
    is $res3->{body}, 'streamed', 'body intact';
};

# ---------------------------------------------------------------------------
subtest 'file bodies' => sub {
    my ( undef, $res ) = get('/file');
    is $res->{status}, 200, 'file: status 200';
    is length( $res->{body} ), length $content, 'file: full length (100000)';
    is sha1_hex( $res->{body} ), sha1_hex($content), 'file: exact contents';
    ok terminated($res), 'file: response complete';

    ( undef, $res ) = get('/file-range');
    is $res->{body}, substr( $content, 1000, 2500 ), 'file offset=1000 length=2500: exactly that range';

    ( undef, $res ) = get('/file-eof');
    is $res->{status}, 200, 'offset beyond EOF: status 200';
    is $res->{body}, '', 'offset beyond EOF: empty body';
    ok terminated($res), 'offset beyond EOF: response properly terminated';

    ( undef, $res ) = get('/file-missing');
    is $res->{status}, 200, 'missing file: the already-started response goes on';
    like $res->{body}, qr/^404 fallback; send failed: .*does-not-exist\.bin/, 'missing file: the send Future failed (app caught it, error names the file) and the app sent its own body';
    ok terminated($res), 'missing file: response complete (state not mutated by the failed send)';

    ( undef, $res ) = get('/file-missing-404');
    is $res->{status}, 404, 'missing file checked before start: client gets 404';
    is $res->{body}, 'not found', 'with the app body';
};

subtest 'fh bodies' => sub {
    my ( undef, $res ) = get('/fh');
    is $res->{status}, 200, 'fh: status 200';
    is sha1_hex( $res->{body} ), sha1_hex($content), 'fh: whole file, exact';

    ( undef, $res ) = get('/fh-range');
    is $res->{body}, substr( $content, 5000, 1234 ), 'fh offset=5000 length=1234: exactly that range';

    ( undef, $res ) = get('/fh-mem');
    is $res->{body}, "in-memory handle contents\n" x 100, 'in-memory fh: whole string';
    ok terminated($res), 'in-memory fh: response terminated';

    ( undef, $res ) = get('/fh-mem-range');
    is $res->{body}, 'defgh', 'in-memory fh with offset=3 length=5';
};

# ---------------------------------------------------------------------------
subtest 'trailers' => sub {
    my ( $raw, $res ) = get( '/trailers', headers => [ [ 'TE', 'trailers' ] ] );
    is $res->{status}, 200, 'status 200';
    is_deeply $res->{headers}{'transfer-encoding'}, ['chunked'], 'chunked framing';
    is $res->{body}, 'trailer-body', 'body';
    like body_of($raw), qr/\r\n0\r\nx-checksum: abc123\r\n\r\n\z/i, 'with TE: trailers, the trailer follows the 0 chunk';
    is $res->{trailers}{'x-checksum'}, 'abc123', 'trailer parsed';

    ( $raw, $res ) = get('/trailers');
    is $res->{body}, 'trailer-body', 'without TE: trailers: body';
    ok terminated($res), 'without TE: trailers: response still terminated';

    my $reported;
    ( $raw, $res, $reported ) = get_then_report( '/trailers-unnamed-big', headers => [ [ 'TE', 'trailers' ] ] );
    is $reported, "body=resolved flush=resolved trailers=resolved\n",
      'trailers not named in the head: a body over the mark and a flush before the trailers settle';
    is length( $res->{body} // '' ), 300_000, 'and the whole body arrives';
    is_deeply $res->{headers}{trailer}, ['x-t'], 'the head names the trailer';
    is $res->{trailers}{'x-t'}, '1', 'the trailer follows the body';

    ( $raw, $res ) = get( '/untidy-fields', headers => [ [ 'TE', 'trailers' ] ] );
    like $raw, qr/\r\nx-pad: padded\r\n/i, 'spaces and tabs around a value are trimmed';
    like $raw, qr/\r\nx-blank: \r\n/i, '... a value of a tab alone is empty';
    is_deeply $res->{headers}{trailer}, ['x-checksum'],
      'the head names only the trailers that may be trailers (not content-length, connection, transfer-encoding)';
    like body_of($raw), qr/\r\n0\r\nx-checksum: abc\r\n\r\n\z/i, '... and only that one follows the 0 chunk, trimmed';

    unlink $report;
    ( $raw, $res ) = get('/trailers-cl');
    is $res->{status}, 200, 'trailers + Content-Length: status 200';
    is $res->{body}, 'data', 'trailers + Content-Length: body delivered';
    my $deadline = time + 5;
    sleep 0.05 while !-s $report && time < $deadline;
    my $got = slurp($report);
    like $got, qr/^failed: .*content-length/is, 'trailers after a Content-Length response: the send Future failed';
    note "report: $got";

    unlink $report;
    ( $raw, $res ) = get('/trailers-cl-late');
    is $res->{body}, 'data', 'trailers (sent 0.3 s late) + Content-Length: body delivered';
    $deadline = time + 5;
    sleep 0.05 while !-s $report && time < $deadline;
    $got = slurp($report);
    like $got, qr/^failed: .*content-length/is, 'trailers sent 0.3 s after the CL body: the send Future still fails';
    unlike $got, qr/reason=client_closed/, 'and the request is not reported as client_closed (the client never closed)';
    note "report: $got";
};

# ---------------------------------------------------------------------------
subtest 'HEAD: no body bytes, Content-Length passed through' => sub {
    my ( $raw, $res ) = get( '/head', method => 'HEAD' );
    is $res->{status}, 200, 'HEAD status 200';
    is_deeply $res->{headers}{'content-length'}, ['11'], 'app Content-Length: 11 passed through';
    is body_of($raw), '', 'no body bytes on the wire';

    ( $raw, $res ) = get( '/chunks', method => 'HEAD' );
    is $res->{status}, 200, 'HEAD of a streamed response: status 200';
    is body_of($raw), '', 'HEAD of a streamed response: no body bytes (not even a 0 chunk)';

    ( $raw, $res ) = get( '/file', method => 'HEAD' );
    is body_of($raw), '', 'HEAD of a file response: no body bytes';

    # HEAD on a keep-alive connection, then a GET: framing must stay in sync.
    my $sock = connect_port($port);
    $sock->syswrite("HEAD /head HTTP/1.1\r\nHost: x\r\n\r\nGET /after-head HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    ($raw) = read_sock( $sock, undef, 5 );
    my @status = $raw =~ m{^HTTP/1\.1 (\d{3})}mg;
    is_deeply \@status, [ 200, 200 ], 'HEAD then GET on one connection: two responses';
    like $raw, qr{\r\n\r\nHTTP/1\.1 200 .*\r\n\r\npath=/after-head\z}s, 'the GET response follows the HEAD head directly';
};

# ---------------------------------------------------------------------------
subtest 'keep-alive and pipelining' => sub {
    my $sock = connect_port($port);
    $sock->syswrite("GET /one HTTP/1.1\r\nHost: x\r\n\r\n");
    my ( $raw1, $closed1 ) = read_sock( $sock, qr/path=\/one/, 5 );
    like $raw1, qr{^HTTP/1\.1 200 .*path=/one\z}s, 'first request answered';
    ok !$closed1, 'connection still open';
    $sock->syswrite("GET /two HTTP/1.1\r\nHost: x\r\n\r\n");
    my ($raw2) = read_sock( $sock, qr/path=\/two/, 5 );
    like $raw2, qr{^HTTP/1\.1 200 .*path=/two\z}s, 'second request on the same connection answered';
    close $sock;

    $sock = connect_port($port);
    $sock->syswrite( join '', map { "GET /p$_ HTTP/1.1\r\nHost: x\r\n\r\n" } 1 .. 3 );
    my ($raw) = read_sock( $sock, qr/path=\/p3/, 5 );
    my @bodies;
    my $rest = $raw;
    while ( length $rest ) {
        my $r = parse_response($rest) or last;
        push @bodies, $r->{body};
        last if $r->{incomplete};
        $rest = $r->{rest};
    }
    is_deeply \@bodies, [ map {"path=/p$_"} 1 .. 3 ],
      'three pipelined requests: three responses, in order';
};

subtest 'HTTP/1.0' => sub {
    my $sock = connect_port($port);
    $sock->syswrite("GET /ten HTTP/1.0\r\nHost: x\r\n\r\n");
    my ( $raw, $closed ) = read_sock( $sock, undef, 5 );
    like $raw, qr{^HTTP/1\.[01] 200 .*path=/ten\z}s, 'HTTP/1.0 request answered';
    ok $closed, 'HTTP/1.0 without keep-alive: connection closed after the response';

    $sock = connect_port($port);
    $sock->syswrite("GET /ka1 HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n");
    my ( $raw1, $closed1 ) = read_sock( $sock, qr/path=\/ka1/, 5 );
    like $raw1, qr{^HTTP/1\.[01] 200 .*path=/ka1\z}s, 'HTTP/1.0 keep-alive: first response';
    like head_of($raw1), qr/^connection:\s*keep-alive\r$/mi, 'response says Connection: keep-alive';
    ok !$closed1, 'connection left open';
    $sock->syswrite("GET /ka2 HTTP/1.0\r\nHost: x\r\n\r\n");
    my ( $raw2, $closed2 ) = read_sock( $sock, undef, 5 );
    like $raw2, qr{^HTTP/1\.[01] 200 .*path=/ka2\z}s, 'second request on the HTTP/1.0 keep-alive connection answered';
    ok $closed2, 'and then (no keep-alive asked) closed';

    $sock = connect_port($port);
    $sock->syswrite("GET /chunks HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n");
    my ( $raw3, $closed3 ) = read_sock( $sock, undef, 5 );
    like $raw3, qr{\r\n\r\naaabbbbcc\z}, 'HTTP/1.0 streamed (no CL) body is sent unchunked';
    ok $closed3, 'and delimited by closing the connection';
};

# ---------------------------------------------------------------------------
subtest 'http.fullflush resolves' => sub {
    my ( $raw, $res ) = get('/fullflush');
    is $res->{status}, 200, 'status 200';
    is $res->{body}, 'before-flush;fullflush=resolved', 'the fullflush Future resolved (not timed out)';
};

subtest 'http.fullflush after a response with no body on the wire (204, 304, HEAD)' => sub {
    for my $case ( [ GET => 204 ], [ GET => 304 ], [ HEAD => 200 ] ) {
        my ( $method, $status ) = @$case;
        my ( $raw, $res, $reported ) = get_then_report( "/fullflush-after/$status", method => $method );
        is $res->{status}, $status, "$method $status: status";
        is body_of($raw), '', "$method $status: no body bytes";
        is $reported, "fullflush=resolved\n", "$method $status: the flush queued behind the unwritten body resolved";
    }
};

# A file and a handle larger than a file producer's window (256 KiB), and
# pipes that never end or stall after a line: on a response that writes
# no body, the send ends all the same.
subtest 'file, fh and pipe bodies on a 204 or 304 end' => sub {
    for my $case ( [ file => '/file-after' ], [ fh => '/fh-after' ], [ endless => '/pipe-endless' ],
        [ stalled => '/pipe-stalled' ] )
    {
        my ( $kind, $route ) = @$case;
        for my $status ( 204, 304 ) {
            my ( $raw, $res, $reported ) = get_then_report("$route/$status");
            is $res->{status}, $status, "$kind $status: status";
            is body_of($raw), '', "$kind $status: no body bytes";
            is $reported, "$kind=resolved\n", "$kind $status: the body's send resolved";
        }
    }
};

subtest '1 MB body in one send' => sub {
    my $expect = join '', map { sprintf '%07d', $_ } 0 .. 142_856;
    my ( $raw, $res ) = get('/big');
    is $res->{status}, 200, 'status 200';
    is length( $res->{body} ), length $expect, 'length 1000000';
    is sha1_hex( $res->{body} ), sha1_hex($expect), 'exact bytes';
    ok terminated($res), 'terminated';
};

ok $server->is_running, 'server still running';
is $server->stop('TERM'), 0, 'SIGTERM exits 0';
done_testing;
