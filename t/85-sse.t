use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;
use PagiRS::SSE;
use PagiRS::WS;
use File::Temp qw(tempdir);
use HTTP::Tiny;
use IO::Select;
use JSON::PP;
use Time::HiRes qw(time sleep);

# Server-Sent Events over HTTP/1.1 (Spec/Www.pod, "Server-Sent Events"):
# detection by Accept, the sse scope, sse.start's head, the exact wire form
# of sse.send / sse.comment / sse.keepalive, sse.close and keep-alive,
# declining with a plain HTTP response, sse.disconnect reasons, the idle
# timeout, SIGTERM, and backpressure.  Real binary, real sockets.

my $dir = tempdir( CLEANUP => 1 );
my $J   = JSON::PP->new->canonical->allow_nonref;

my $app = write_app( <<"APP" );
use strict; use warnings; use Future::AsyncAwait; use Future::IO; use JSON::PP;
use Time::HiRes qw(time);
use Scalar::Util qw(blessed);
my \$dir = '$dir';
my \$J = JSON::PP->new->canonical->allow_nonref;
sub rec {
    my (\$file, \$data) = \@_;
    open my \$fh, '>>', "\$dir/\$file" or die "open \$dir/\$file: \$!";
    print \$fh \$J->encode(\$data), "\\n";
    close \$fh;
}
# Run a send; '' if it resolved, else the failure message.
async sub try_send {
    my (\$send, \$ev) = \@_;
    my \$ok = eval { await \$send->(\$ev); 1 };
    return \$ok ? '' : ("\$@" || 'failed');
}
sub ev { my (\$send, %e) = \@_; \$send->({ type => 'sse.send', %e }) }
sub dump_scope {
    my (\$scope, \$requests) = \@_;
    my %d = (keys => [ sort keys %\$scope ]);
    \$d{\$_} = \$scope->{\$_} for grep { exists \$scope->{\$_} }
        qw(type method http_version scheme path raw_path query_string root_path client server state);
    \$d{headers} = \$scope->{headers};
    for my \$k (qw(pagi.connection pagi.transport)) {
        my \$v = \$scope->{\$k};
        \$d{\$k} = blessed(\$v) ? ref(\$v) : undef;
    }
    my \$t = \$scope->{'pagi.transport'};
    \$d{transport_can} = [ grep { \$t && \$t->can(\$_) }
        qw(buffered_amount high_water_mark low_water_mark on_high_water on_drain) ];
    \$d{requests} = \$requests;
    return \$J->encode(\\%d);
}
my \$plain = [['content-type', 'text/plain']];
async sub http_reply {
    my (\$send, \$status, \$body) = \@_;
    await \$send->({ type => 'http.response.start', status => \$status, headers => \$plain });
    await \$send->({ type => 'http.response.body', body => \$body, more => 0 });
}

my \$app = async sub {
    my (\$scope, \$receive, \$send) = \@_;
    return if \$scope->{type} eq 'lifespan';
    my \$path = \$scope->{path};
    my \$type = \$scope->{type};

    if (\$path eq '/scope') {
        if (\$type eq 'websocket') {
            my \$c = await \$receive->();
            await \$send->({ type => 'websocket.accept' });
            await \$send->({ type => 'websocket.send', text => dump_scope(\$scope, [\$c]) });
            await \$send->({ type => 'websocket.close' });
            return;
        }
        my \@req;
        while (1) {
            my \$e = await \$receive->();
            push \@req, \$e;
            last unless \$e->{more};
        }
        my \$out = dump_scope(\$scope, \\\@req);
        if (\$type eq 'sse') {
            await \$send->({ type => 'sse.start' });
            await ev(\$send, event => 'scope', data => \$out);
            await \$send->({ type => 'sse.close' });
            return;
        }
        await http_reply(\$send, 200, \$out);
        return;
    }
    if (\$path eq '/ok') {
        await http_reply(\$send, 200, "ok \$type");
        return;
    }
    die "unexpected scope type \$type for \$path" unless \$type eq 'sse';

    if (\$path eq '/head') {
        # The head must leave at sse.start, before any event.
        await \$send->({ type => 'sse.start', headers => [['x-custom', 'yes']] });
        rec('head', { started => time });
        await Future::IO->sleep(1.2);
        await ev(\$send, data => 'after-sleep');
        await \$send->({ type => 'sse.close' });
        return;
    }
    if (\$path eq '/head-own') {
        await \$send->({ type => 'sse.start', status => 201, headers => [
            ['Content-Type', 'text/event-stream; charset=utf-8'], ['cache-control', 'no-store'], ['x-a', '1']] });
        await ev(\$send, data => 'x');
        await \$send->({ type => 'sse.close' });
        return;
    }
    if (\$path eq '/status') {
        # The query is the status: 'v' as given, 'v&nv' as a number.
        my (\$status, \$as_number) = split /&/, \$scope->{query_string};
        \$status += 0 if \$as_number;
        my \$err = await try_send(\$send, { type => 'sse.start', status => \$status });
        if (\$err eq '') {
            await ev(\$send, data => 'started');
            await \$send->({ type => 'sse.close' });
            return;
        }
        # Www 0.6 refuses a stream with an ordinary response.
        await \$send->({ type => 'http.response.start', status => 200, headers => \$plain });
        await \$send->({ type => 'http.response.body', body => "refused: \$err", more => 0 });
        return;
    }
    if (\$path eq '/short') {
        await \$send->({ type => 'sse.start' });
        await ev(\$send, event => 'greet', data => 'hello', id => '1');
        await ev(\$send, data => "two\\nlines");
        await \$send->({ type => 'sse.close' });
        return;
    }
    if (\$path eq '/wire') {
        await \$send->({ type => 'sse.start' });
        await ev(\$send, event => 'tick', data => '1', id => '7', retry => 3000);
        await ev(\$send, data => "a\\nb\\r\\nc\\rd");
        await ev(\$send, data => '');
        await ev(\$send, data => "x\\n");
        await ev(\$send, event => '', data => 'noname', id => '');
        await ev(\$send, event => undef, data => 'undefs', id => undef, retry => undef);
        await ev(\$send, data => 'r0', retry => 0);
        await ev(\$send, data => 42);
        await ev(\$send, event => "\\x{fc}n\\x{ef}", data => "caf\\x{e9} \\x{263a}\\n\\x{1F600}", id => "\\x{2603}");
        my \$latin1 = "caf\\xe9";    # a byte string: its characters are encoded too
        utf8::downgrade(\$latin1);
        await ev(\$send, data => \$latin1);
        await ev(\$send, data => "\\n");
        await ev(\$send, data => ': not a comment');
        await \$send->({ type => 'sse.close' });
        return;
    }
    if (\$path eq '/errors') {
        await \$send->({ type => 'sse.start' });
        await ev(\$send, data => 'A');
        my %err;
        my %bad = (
            event_lf   => { event => "a\\nb", data => 'x' },
            event_cr   => { event => "a\\rb", data => 'x' },
            event_crlf => { event => "a\\r\\nb", data => 'x' },
            id_cr      => { id => "1\\r", data => 'x' },
            id_lf      => { id => "1\\n2", data => 'x' },
            retry_neg  => { retry => -1, data => 'x' },
            retry_abc  => { retry => 'abc', data => 'x' },
            retry_frac => { retry => '1.5', data => 'x' },
            no_data    => { event => 'e' },
            undef_data => { data => undef },
        );
        for my \$k (sort keys %bad) {
            \$err{\$k} = await try_send(\$send, { type => 'sse.send', %{ \$bad{\$k} } });
        }
        \$err{comment_missing} = await try_send(\$send, { type => 'sse.comment' });
        await ev(\$send, event => 'errors', data => \$J->encode(\\%err));
        await \$send->({ type => 'sse.close' });
        return;
    }
    if (\$path eq '/comment') {
        await \$send->({ type => 'sse.start' });
        await \$send->({ type => 'sse.comment', comment => 'hello' });
        await \$send->({ type => 'sse.comment', comment => ':already' });
        await \$send->({ type => 'sse.comment', comment => "a\\nb" });
        await \$send->({ type => 'sse.comment', comment => '' });
        await ev(\$send, data => 'after');
        await \$send->({ type => 'sse.close' });
        return;
    }
    if (\$path eq '/keepalive') {
        await \$send->({ type => 'sse.start' });
        await \$send->({ type => 'sse.keepalive', interval => 0.2 });
        await Future::IO->sleep(0.7);
        await ev(\$send, data => 'p1');
        await \$send->({ type => 'sse.keepalive', interval => 0.2, comment => 'ping' });
        await Future::IO->sleep(0.5);
        await ev(\$send, data => 'p2');
        await \$send->({ type => 'sse.keepalive', interval => 0.2, comment => ':own' });
        await Future::IO->sleep(0.5);
        await ev(\$send, data => 'p3');
        # Last setting wins: the comment...
        await \$send->({ type => 'sse.keepalive', interval => 0.15, comment => 'first' });
        await \$send->({ type => 'sse.keepalive', interval => 0.15, comment => 'second' });
        await Future::IO->sleep(0.5);
        await ev(\$send, data => 'p4');
        # ...and the interval.
        await \$send->({ type => 'sse.keepalive', interval => 0.1, comment => 'fast' });
        await \$send->({ type => 'sse.keepalive', interval => 30, comment => 'slow' });
        await Future::IO->sleep(0.5);
        await ev(\$send, data => 'p5');
        # Traffic postpones the keepalive: events every 0.1 s, interval 0.35.
        await \$send->({ type => 'sse.keepalive', interval => 0.35, comment => 'busy' });
        for my \$i (1 .. 7) {
            await Future::IO->sleep(0.1);
            await ev(\$send, data => "b\$i");
        }
        await ev(\$send, data => 'p6');
        # interval 0 stops it.
        await \$send->({ type => 'sse.keepalive', interval => 0.15, comment => 'stopme' });
        await \$send->({ type => 'sse.keepalive', interval => 0 });
        await Future::IO->sleep(0.5);
        await ev(\$send, data => 'p7');
        await \$send->({ type => 'sse.close' });
        return;
    }
    if (\$path eq '/close' || \$path eq '/close-default') {
        await \$send->({ type => 'sse.start' });
        await ev(\$send, data => 'x');
        my %o;
        \$o{first_receive} = await \$receive->();
        \$o{close1} = await try_send(\$send, { type => 'sse.close',
            (\$path eq '/close' ? (reason => 'done_here') : ()) });
        \$o{close2} = await try_send(\$send, { type => 'sse.close', reason => 'again' });
        \$o{send_after}      = await try_send(\$send, { type => 'sse.send', data => 'late' });
        \$o{comment_after}   = await try_send(\$send, { type => 'sse.comment', comment => 'late' });
        \$o{keepalive_after} = await try_send(\$send, { type => 'sse.keepalive', interval => 0.1 });
        my \$f = \$receive->();
        \$o{disconnect} = await Future->wait_any(\$f, Future::IO->sleep(2)->then(sub { Future->done('timeout') }));
        rec(substr(\$path, 1), \\%o);
        return;
    }
    if (\$path eq '/return') {
        await \$send->({ type => 'sse.start' });
        await ev(\$send, data => 'bye');
        return;
    }
    if (\$path eq '/decline' || \$path eq '/decline204') {
        my %o;
        my \$no_content = \$path eq '/decline204';
        \$o{start} = await try_send(\$send, { type => 'sse.http.response.start',
            status => \$no_content ? 204 : 404, headers => \$no_content ? [] : [['content-type', 'text/plain']] });
        if (\$no_content) {
            \$o{body} = await try_send(\$send, { type => 'sse.http.response.body', body => '', more => 0 });
        }
        else {
            \$o{body1} = await try_send(\$send, { type => 'sse.http.response.body', body => 'no ', more => 1 });
            \$o{body2} = await try_send(\$send, { type => 'sse.http.response.body', body => 'stream', more => 0 });
        }
        \$o{sse_start} = await try_send(\$send, { type => 'sse.start' });
        \$o{sse_send}  = await try_send(\$send, { type => 'sse.send', data => 'x' });
        rec(substr(\$path, 1), \\%o);
        return;
    }
    if (\$path eq '/late-decline') {
        await \$send->({ type => 'sse.start' });
        my \$e = await try_send(\$send, { type => 'sse.http.response.start', status => 404, headers => \$plain });
        my \$b = await try_send(\$send, { type => 'sse.http.response.body', body => 'x', more => 0 });
        await ev(\$send, event => 'result', data => \$J->encode({ start => \$e, body => \$b }));
        await \$send->({ type => 'sse.close' });
        return;
    }
    if (\$path eq '/wait' || \$path eq '/wait-ka') {
        # Stream until the connection ends; record what receive() said.
        my \$name = substr(\$path, 1) . (\$scope->{query_string} ? '-' . \$scope->{query_string} : '');
        await \$send->({ type => 'sse.start' });
        await \$send->({ type => 'sse.keepalive', interval => 0.3 }) if \$path eq '/wait-ka';
        await ev(\$send, data => 'hi');
        my \$first = await \$receive->();
        rec(\$name, { stage => 'waiting', first => \$first, t => time });
        my \$ev = await \$receive->();
        rec(\$name, { stage => 'ended', event => \$ev, t => time });
        return;
    }
    if (\$path eq '/bp') {
        # 64 KiB events, each awaited; once the kernel buffers are full a
        # send must stay pending until the client reads.
        my \$t = \$scope->{'pagi.transport'};
        my (\$high, \$drain) = (0, 0);
        \$t->on_high_water(sub { \$high++ });
        \$t->on_drain(sub { \$drain++ });
        await \$send->({ type => 'sse.start' });
        my \$chunk = 'x' x 65536;
        my \$n = 0;
        for my \$i (1 .. 600) {
            \$n = \$i;
            my \$f = ev(\$send, data => \$chunk, id => \$i);
            if (!\$f->is_ready) {
                await Future->wait_any(\$f->without_cancel, Future::IO->sleep(0.3));
                if (!\$f->is_ready) {
                    rec('bp', { stage => 'stuck', i => \$i, buffered => \$t->buffered_amount,
                        high_mark => \$t->high_water_mark, high => \$high, t => time });
                    await \$f;
                    rec('bp', { stage => 'resolved', i => \$i, t => time });
                    last;
                }
            }
            await \$f;
        }
        await ev(\$send, event => 'end', data => "\$n");
        await \$send->({ type => 'sse.close' });
        rec('bp', { stage => 'done', high => \$high, drain => \$drain, buffered => \$t->buffered_amount });
        return;
    }
    # Refuse: Www 0.6 with an ordinary response, 0.3 with its sse.http.response.*.
    my \$refusal = \$scope->{pagi}{spec_version} eq '0.3' ? 'sse.http.response' : 'http.response';
    await \$send->({ type => "\$refusal.start", status => 404, headers => \$plain });
    await \$send->({ type => "\$refusal.body", body => 'not found', more => 0 });
};
\$app;
APP

my $access_log = "$dir/access.log";
my $server = start_server( '--access-log', $access_log, $app );
my $port   = $server->port;
# What Www 0.3 does differently (a returned stream ends cleanly, refusals
# with sse.http.response.*) under --spec-version 0.3; the Www 0.6 side of
# each is in t/86-www06.t.
my $legacy_log  = "$dir/legacy-access.log";
my $legacy      = start_server( '--spec-version', '0.3', '--access-log', $legacy_log, $app );
my $legacy_port = $legacy->port;

sub rec_lines {
    my ($name) = @_;
    return map { $J->decode($_) } file_lines("$dir/$name");
}

sub wait_rec {
    my ( $name, $re, $timeout ) = @_;
    my $l = wait_file_line( "$dir/$name", $re // qr/./, $timeout // 5 );
    return defined $l ? $J->decode($l) : undef;
}

# A request with exactly these Accept headers on a fresh connection; returns
# the scope dump (from an sse event or the http body) and the response.
sub scope_for {
    my (@accept) = @_;
    my $req = "GET /scope?q=1 HTTP/1.1\r\nHost: 127.0.0.1:$port\r\nConnection: close\r\n";
    $req .= "Accept: $_\r\n" for @accept;
    my $res = parse_response( raw_request( $port, "$req\r\n" ) ) // {};
    my $body = $res->{body} // '';
    $body = $1 if $body =~ /\Aevent: scope\ndata: (.*)\n\n\z/;
    my $d = eval { $J->decode($body) } // {};
    return ( $d, $res );
}

# The response's single header value (parse_response keeps a list).
sub hv { my ( $res, $n ) = @_; join ', ', @{ $res->{headers}{$n} // [] } }

subtest 'detection: Accept lists text/event-stream => sse' => sub {
    for my $case (
        [ 'exact',                  'text/event-stream' ],
        [ 'upper/mixed case',       'TEXT/Event-Stream' ],
        [ 'with parameters',        'text/event-stream; charset=utf-8' ],
        [ 'in a list with q',       'text/html, application/json;q=0.9, text/event-stream;q=0.5' ],
        [ 'padded list member',     'text/html ,  text/event-stream ;q=1' ],
        [ 'second Accept header',   'text/html', 'text/event-stream' ],
      )
    {
        my ( $name, @accept ) = @$case;
        my ( $d, $res ) = scope_for(@accept);
        is $d->{type}, 'sse', "$name: type sse";
        is hv( $res, 'content-type' ), 'text/event-stream', "$name: answered with an event stream";
    }
    for my $case (
        [ 'no Accept' ],
        [ 'other type',                'application/json' ],
        [ 'prefix is not enough',      'text/event-streams' ],
        [ 'not a media range',         'text/event' ],
        [ 'wildcard',                  '*/*' ],
        [ 'only as a parameter value', 'text/html; x=text/event-stream' ],
      )
    {
        my ( $name, @accept ) = @$case;
        my ( $d, $res ) = scope_for(@accept);
        is $d->{type}, 'http', "$name: type http";
        is $res->{status}, 200, "$name: plain response 200";
    }
};

subtest 'plain HTTP::Tiny request stays http' => sub {
    my $r = HTTP::Tiny->new( timeout => 5 )->get("http://127.0.0.1:$port/scope");
    is $r->{status}, 200, 'status 200';
    is $r->{headers}{'content-type'}, 'text/plain', 'plain content-type';
    my $d = eval { $J->decode( $r->{content} ) } // {};
    is $d->{type}, 'http', 'type http';
    is_deeply [ map { $_->{type} } @{ $d->{requests} || [] } ], ['http.request'], 'receive gives http.request';
};

subtest 'a WebSocket upgrade with Accept: text/event-stream stays websocket' => sub {
    my $ws = PagiRS::WS->connect( $port, path => '/scope', headers => [ [ 'Accept', 'text/event-stream' ] ] );
    is $ws->upgraded, 1, 'upgraded (101)';
    my $m = $ws->recv_message(5) // {};
    my $d = eval { $J->decode( $m->{data} // '' ) } // {};
    is $d->{type}, 'websocket', 'type websocket';
    is $d->{requests}[0]{type}, 'websocket.connect', 'first receive websocket.connect';
    my ($code) = $ws->wait_close(5);
    is $code, 1000, 'closed normally';
};

subtest 'sse scope keys are like http' => sub {
    my ( $d, $res ) = scope_for('text/event-stream');
    is $res->{status}, 200, 'status 200';
    my %keys = map { $_ => 1 } @{ $d->{keys} || [] };
    for my $k (qw(type pagi http_version method scheme path raw_path query_string root_path headers client server
        state extensions pagi.connection pagi.transport))
    {
        ok $keys{$k}, "scope has '$k'";
    }
    ok !$keys{subprotocols}, 'no subprotocols key';
    is $d->{type},         'sse',    "type 'sse'";
    is $d->{method},       'GET',    'method GET';
    is $d->{http_version}, '1.1',    "http_version '1.1'";
    is $d->{scheme},       'http',   "scheme 'http'";
    is $d->{path},         '/scope', 'path';
    is $d->{raw_path},     '/scope', 'raw_path';
    is $d->{query_string}, 'q=1',    'query_string';
    is $d->{root_path},    '',       'root_path';
    is $d->{client}[0], '127.0.0.1', 'client';
    is $d->{server}[1], $port,       'server port';
    is_deeply [ grep { $_->[0] eq 'accept' } @{ $d->{headers} || [] } ], [ [ 'accept', 'text/event-stream' ] ],
      'accept header in headers, name lower-case';
    ok $d->{'pagi.connection'}, "pagi.connection is an object ($d->{'pagi.connection'})";
    ok $d->{'pagi.transport'},  "pagi.transport is an object ($d->{'pagi.transport'})";
    is_deeply $d->{transport_can}, [qw(buffered_amount high_water_mark low_water_mark on_high_water on_drain)],
      'pagi.transport has the flow-control methods';
    is_deeply $d->{requests}, [ { type => 'sse.request', body => '', more => 0 } ],
      'GET: one sse.request with empty body, more 0';
};

subtest 'POST with a body: sse.request events' => sub {
    my $body = 'name=value&' . ( 'z' x 100_000 );
    my $c = PagiRS::SSE->open( $port, '/scope', method => 'POST', body => $body,
        headers => [ [ 'Content-Type', 'application/x-www-form-urlencoded' ] ] );
    is $c->status, 200, 'status 200';
    my $e = $c->next_event(5) // {};
    my $d = eval { $J->decode( $e->{data} // '' ) } // {};
    is $d->{type},   'sse',  'type sse';
    is $d->{method}, 'POST', 'method POST';
    my @r = @{ $d->{requests} || [] };
    ok @r >= 1, scalar(@r) . ' sse.request event(s)';
    is_deeply [ grep { $_->{type} ne 'sse.request' } @r ], [], 'every one is sse.request';
    is join( '', map { $_->{body} } @r ), $body, 'bodies concatenate to the request body';
    is_deeply [ map { $_->{more} ? 1 : 0 } @r ], [ ( (1) x $#r ), 0 ], 'more set on all but the last';

    # Chunked request body, sent in two parts with a pause in between.
    my $sock = connect_port($port);
    $sock->syswrite( "POST /scope HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\nConnection: close\r\n"
          . "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n" );
    sleep 0.2;
    $sock->syswrite("6\r\n world\r\n0\r\n\r\n");
    my ($raw) = read_sock( $sock, undef, 5 );
    my $res = parse_response($raw) // {};
    my ($json) = ( $res->{body} // '' ) =~ /^data: (.*)$/m;
    my $d2 = eval { $J->decode( $json // '' ) } // {};
    my @r2 = @{ $d2->{requests} || [] };
    is join( '', map { $_->{body} } @r2 ), 'hello world', 'chunked body arrives whole';
    ok @r2 >= 2, 'in more than one sse.request (' . scalar(@r2) . ')';
    is $r2[-1]{more}, 0, 'the last has more 0';
    is_deeply [ grep { !$_->{more} } @r2[ 0 .. $#r2 - 1 ] ], [], 'the others have more 1';
};

subtest 'sse.start: the head leaves at once, with the default headers' => sub {
    unlink "$dir/head";
    my $t0 = time;
    my $c  = eval { PagiRS::SSE->open( $port, '/head', timeout => 1 ) };
    my $dt = time - $t0;
    ok $c, 'head within 1 s' or return diag $@;
    ok $dt < 0.9, sprintf( 'head arrived while the app sleeps (%.2fs)', $dt );
    is $c->status, 200, 'status defaults to 200';
    is $c->header('content-type'),      'text/event-stream', 'content-type text/event-stream added';
    is $c->header('cache-control'),     'no-cache',          'cache-control no-cache added';
    is $c->header('connection'),        'keep-alive',        'connection keep-alive';
    is $c->header('transfer-encoding'), 'chunked',           'chunked';
    like $c->header('date') // '', qr/^\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT$/, 'date header';
    is $c->header('x-custom'), 'yes', "the app's own header";
    ok !defined $c->header('content-length'), 'no content-length';
    is $c->raw, '', 'no body yet';
    my $e = $c->next_event(3);
    is $e && $e->{data}, 'after-sleep', 'the event follows after the sleep';
    ok time - $t0 > 1.0, 'and not before';
    ok $c->wait_eof(3) && $c->complete, 'stream ends';

    my $o = PagiRS::SSE->open( $port, '/head-own' );
    is $o->status, 201, 'status from sse.start';
    is $o->header('content-type'),  'text/event-stream; charset=utf-8', "the app's content-type kept";
    is $o->header('cache-control'), 'no-store', "the app's cache-control kept";
    is scalar( grep { $_->[0] eq 'content-type' } @{ $o->header_list } ),  1, 'one content-type';
    is scalar( grep { $_->[0] eq 'cache-control' } @{ $o->header_list } ), 1, 'one cache-control';
    is $o->header('x-a'), '1', 'extra header';
    is $o->header('connection'), 'keep-alive', 'connection keep-alive';
    ok $o->wait_eof(3), 'ends';
    is $o->raw, "data: x\n\n", 'body';
};

subtest 'sse.start status: an integer value, else the send fails' => sub {
    for my $q ( '201', '201.0', '201.0&nv', '2.01e2' ) {
        my $c = PagiRS::SSE->open( $port, "/status?$q" );
        is $c->status, 201, "$q: a value that is an integer is that status";
        ok $c->wait_eof(3), "$q: the stream ends";
        is $c->raw, "data: started\n\n", "$q: the stream's event";
    }
    # A fraction was refused by a pattern in SSE.pm before; it must not be
    # truncated to 200 or 404 now that C reads the value.
    for my $q ( '200.5', '404.25&nv', 'abc', '0x10' ) {
        my $c = PagiRS::SSE->open( $port, "/status?$q" );
        is $c->status, 200, "$q: the app declined after the failure";
        ok $c->wait_eof(3), "$q: the response ends";
        like $c->raw, qr/^refused: sse\.start: .*'status' must be an integer/, "$q: a clear error";
    }
    for my $q ( '600', '99', '101' ) {
        my $c = PagiRS::SSE->open( $port, "/status?$q" );
        ok $c->wait_eof(3), "$q: the response ends";
        like $c->raw, qr/^refused: sse\.start: /, "$q: not a final status, refused";
    }
};

subtest 'HTTP::Tiny reads a complete short stream' => sub {
    my $r = HTTP::Tiny->new( timeout => 5 )
      ->get( "http://127.0.0.1:$port/short", { headers => { Accept => 'text/event-stream' } } );
    is $r->{status}, 200, 'status 200';
    ok $r->{success}, 'success';
    is $r->{headers}{'content-type'},      'text/event-stream', 'content-type';
    is $r->{headers}{'cache-control'},     'no-cache',          'cache-control';
    is $r->{headers}{'transfer-encoding'}, 'chunked',           'chunked';
    is $r->{content}, "event: greet\ndata: hello\nid: 1\n\ndata: two\ndata: lines\n\n", 'body exact';
};

subtest 'sse.send: exact wire bytes' => sub {
    my $c = PagiRS::SSE->open( $port, '/wire' );
    ok $c->wait_eof(5), 'stream ends';
    ok $c->complete, 'with the chunked terminator';
    my $expect = join '',
      "event: tick\ndata: 1\nid: 7\nretry: 3000\n\n",
      "data: a\ndata: b\ndata: c\ndata: d\n\n",
      "data: \n\n",
      "data: x\ndata: \n\n",
      "data: noname\n\n",
      "data: undefs\n\n",
      "data: r0\nretry: 0\n\n",
      "data: 42\n\n",
      "event: \xc3\xbcn\xc3\xaf\ndata: caf\xc3\xa9 \xe2\x98\xba\ndata: \xf0\x9f\x98\x80\nid: \xe2\x98\x83\n\n",
      "data: caf\xc3\xa9\n\n",
      "data: \ndata: \n\n",
      "data: : not a comment\n\n";
    my $raw = $c->raw;
    is $raw, $expect, 'raw body exact' or diag_bytes( $raw, $expect );

    # The same through the EventSource parser.
    my $p = PagiRS::SSE->open( $port, '/wire' );
    my @ev = $p->all_events(5);
    is scalar(@ev), 12, '12 events dispatched';
    is_deeply [ @{ $ev[0] }{qw(event data id retry)} ], [ 'tick', '1', '7', 3000 ], 'event/data/id/retry';
    is $ev[1]{data}, "a\nb\nc\nd", 'multi-line data';
    is $ev[2]{data}, '', 'empty data';
    is $ev[3]{data}, "x\n", 'trailing newline kept';
    is $ev[4]{event}, 'message', "event '' omitted => message";
    is $ev[6]{retry}, 0, 'retry 0';
    is $ev[10]{data}, "\n", 'data "\n" is two empty lines';
    is_deeply [ @{ $ev[8] }{qw(event data id)} ], [ "\x{fc}n\x{ef}", "caf\x{e9} \x{263a}\n\x{1F600}", "\x{2603}" ],
      'unicode round-trips';
    is $ev[-1]{data}, ': not a comment', 'data starting with a colon is still data';
    is_deeply [ $p->comments ], [], 'no comments';
};

subtest 'sse.send errors: the send fails, nothing is written, the stream goes on' => sub {
    my $c = PagiRS::SSE->open( $port, '/errors' );
    ok $c->wait_eof(5), 'stream ends';
    my $raw = $c->raw;
    like $raw, qr/\Adata: A\n\nevent: errors\ndata: [^\n]*\n\n\z/,
      'only the good event and the report are on the wire' or diag_bytes( $raw, '' );
    my ($json) = $raw =~ /^event: errors\ndata: (.*)$/m;
    my $err = eval { $J->decode( $json // '' ) } // {};
    for my $k (qw(event_lf event_cr event_crlf id_cr id_lf)) {
        like $err->{$k} // '', qr/newline/i, "$k: fails (newline)";
    }
    for my $k (qw(retry_neg retry_abc retry_frac)) {
        like $err->{$k} // '', qr/retry.*non-negative integer/i, "$k: fails (retry)";
    }
    like $err->{no_data},         qr/requires 'data'/, 'missing data fails';
    like $err->{undef_data},      qr/requires 'data'/, 'undef data fails';
    like $err->{comment_missing}, qr/comment/,         'sse.comment without comment fails';
};

subtest 'sse.comment' => sub {
    my $c = PagiRS::SSE->open( $port, '/comment' );
    ok $c->wait_eof(5), 'stream ends';
    is $c->raw, ":hello\n\n:already\n\n:a\n:b\n\n:\n\ndata: after\n\n", 'comment wire bytes';
    my @ev = $c->all_events(1);
    is_deeply [ map { $_->{data} } @ev ], ['after'], 'comments dispatch no event';
    is_deeply [ $c->comments ], [ 'hello', 'already', 'a', 'b', '' ], 'parsed as comments';
};

subtest 'sse.keepalive' => sub {
    my $c = PagiRS::SSE->open( $port, '/keepalive' );
    ok $c->wait_eof(8), 'stream ends';
    my $raw = $c->raw;
    my @seg = split /data: p\d\n\n/, $raw, -1;
    is scalar(@seg), 8, '7 phases' or diag_bytes( $raw, '' );
    like $seg[0], qr/\A(?::\n\n)+\z/, 'default comment is ":\n\n"';
    my $k1 = () = $seg[0] =~ /:\n\n/g;
    ok $k1 >= 2 && $k1 <= 4, "interval 0.2 over 0.7 s: $k1 comments (2..4)";
    like $seg[1], qr/\A(?::ping\n\n){1,3}\z/, 'custom comment ":ping"';
    like $seg[2], qr/\A(?::own\n\n){1,3}\z/, 'a leading ":" is not doubled';
    like $seg[3], qr/\A(?::second\n\n){1,4}\z/, 'last setting wins (comment)';
    is $seg[4], '', 'last setting wins (interval 30 after 0.1: no comment in 0.5 s)';
    like $seg[5], qr/\A(?:data: b\d\n\n){7}\z/, 'events every 0.1 s hold off a 0.35 s keepalive';
    is $seg[6], '', 'interval 0 stops the keepalive';
    is $seg[7], '', 'nothing after the last event';
};

subtest 'sse.close: terminator, keep-alive, idempotent, later sends fail' => sub {
    for my $case ( [ '/close', 'done_here' ], [ '/close-default', 'app_closed' ] ) {
        my ( $path, $reason ) = @$case;
        my $name = substr $path, 1;
        unlink "$dir/$name";
        my $c = PagiRS::SSE->open( $port, $path );
        ok $c->wait_eof(5), "$path: body ends";
        ok $c->complete, "$path: properly (last chunk)";
        is $c->raw, "data: x\n\n", "$path: body";
        like $c->wire, qr/0\r\n\r\n\z/, "$path: wire ends with 0 CRLF CRLF";
        unlike $c->wire . $c->raw_head, qr/$reason|again/, "$path: the reason is not on the wire";
        ok !$c->eof, "$path: connection still open";

        # The same connection serves the next request.
        $c->sock->syswrite("GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        my ($raw) = read_sock( $c->sock, undef, 5 );
        my $res = parse_response($raw) // {};
        is $res->{status}, 200, "$path: second request on the same socket answered";
        is $res->{body}, 'ok http', "$path: with its body";

        my $o = wait_rec($name);
        $o //= {};
        is_deeply $o->{first_receive}, { type => 'sse.request', body => '', more => 0 }, "$path: first receive";
        is $o->{close1}, '', "$path: sse.close resolves";
        is $o->{close2}, '', "$path: a second sse.close resolves too";
        like $o->{send_after},      qr/after sse\.close/, "$path: sse.send after close fails";
        like $o->{comment_after},   qr/after sse\.close/, "$path: sse.comment after close fails";
        like $o->{keepalive_after}, qr/after sse\.close/, "$path: sse.keepalive after close fails";
        is_deeply $o->{disconnect}, { type => 'sse.disconnect' }, "$path: receive gives sse.disconnect, no reason";
        ok wait_file_line( $access_log, qr{"GET \Q$path\E" 200 .* reason=\Q$reason\E$} ),
          "$path: access log has reason=$reason"
          or diag slurp($access_log);
    }
};

subtest '0.3: app returning after sse.start ends the stream cleanly' => sub {
    my $c = PagiRS::SSE->open( $legacy_port, '/return' );
    ok $c->wait_eof(5), 'body ends';
    ok $c->complete, 'with the last chunk';
    is $c->raw, "data: bye\n\n", 'body';
    $c->sock->syswrite("GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    my ($raw) = read_sock( $c->sock, undef, 5 );
    is( ( parse_response($raw) // {} )->{status}, 200, 'connection reusable' );
    ok wait_file_line( $legacy_log, qr{"GET /return" 200 .* reason=app_returned$} ),
      'access log reason=app_returned' or diag slurp($legacy_log);
    unlike slurp($legacy_log) // '', qr{"GET /ok[^\n]*reason=}, 'plain requests have no reason suffix';
};

subtest '0.3: decline with sse.http.response.*' => sub {
    unlink "$dir/decline", "$dir/decline204";
    my $c = PagiRS::SSE->open( $legacy_port, '/decline' );
    is $c->status, 404, 'status 404';
    is $c->header('content-type'), 'text/plain', 'app content-type';
    ok !defined $c->header('cache-control'), 'no SSE headers added';
    ok $c->wait_eof(5) && $c->complete, 'body complete';
    is $c->raw, 'no stream', 'streamed body';
    my $o = wait_rec('decline');
    $o //= {};
    is $o->{start}, '', 'sse.http.response.start resolves';
    is $o->{body1}, '', 'body (more) resolves';
    is $o->{body2}, '', 'final body resolves';
    like $o->{sse_start}, qr/after sse\.http\.response\.start/, 'sse.start after decline fails';
    like $o->{sse_send},  qr/after sse\.http\.response\.start/, 'sse.send after decline fails';

    my $r = HTTP::Tiny->new( timeout => 5 )
      ->get( "http://127.0.0.1:$legacy_port/decline", { headers => { Accept => 'text/event-stream' } } );
    is $r->{status}, 404, 'HTTP::Tiny: 404';
    is $r->{content}, 'no stream', 'HTTP::Tiny: body';

    my $n = PagiRS::SSE->open( $legacy_port, '/decline204' );
    is $n->status, 204, 'status 204';
    ok !defined $n->header('content-type'), 'no content-type';
    ok !defined $n->header('transfer-encoding'), 'no transfer-encoding';
    $n->sock->syswrite("GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    my ($raw) = read_sock( $n->sock, undef, 5 );
    like $raw, qr{\AHTTP/1\.1 200 }, 'nothing after the 204 head: the next response follows directly';
    my $o2 = wait_rec('decline204');
    is $o2 && $o2->{body}, '', '204: body send resolves';
    like $o2 && $o2->{sse_start}, qr/after sse\.http\.response\.start/, '204: sse.start after decline fails';

    my $l = PagiRS::SSE->open( $legacy_port, '/late-decline' );
    is $l->status, 200, 'late decline: the stream is already 200';
    my $e = $l->next_event(5) // {};
    my $res = eval { $J->decode( $e->{data} // '' ) } // {};
    like $res->{start}, qr/after sse\.start/, 'sse.http.response.start after sse.start fails';
    isnt $res->{body} // '', '', 'sse.http.response.body after sse.start fails';
    ok $l->wait_eof(3), 'ends';
    is $l->raw, "event: result\ndata: $e->{data}\n\n", 'nothing else on the wire';
};

subtest 'sse.disconnect reason client_closed' => sub {
    unlink "$dir/wait-a";
    my $c = PagiRS::SSE->open( $port, '/wait?a' );
    is( ( $c->next_event(5) // {} )->{data}, 'hi', 'event' );
    my $w = wait_rec( 'wait-a', qr/waiting/ );
    is_deeply $w && $w->{first}, { type => 'sse.request', body => '', more => 0 }, 'first receive sse.request';
    $c->close;
    my $t0 = time;
    my $e = wait_rec( 'wait-a', qr/ended/, 5 );
    is_deeply $e && $e->{event}, { type => 'sse.disconnect', reason => 'client_closed' },
      'pending receive gets sse.disconnect client_closed';
    ok $e && $e->{t} - $t0 < 1.5, 'promptly';
};

# ---------------------------------------------------------------------------
# Idle timeout (its own server).
# ---------------------------------------------------------------------------
{
    my $s2 = start_server( '--sse-idle-timeout', 1, '--no-access-log', $app );
    my $p2 = $s2->port;

    subtest '--sse-idle-timeout 1' => sub {
        unlink "$dir/wait-idle", "$dir/wait-ka-alive";
        my $t0 = time;
        my $c  = PagiRS::SSE->open( $p2, '/wait?idle' );
        my $k  = PagiRS::SSE->open( $p2, '/wait-ka?alive' );
        is( ( $c->next_event(3) // {} )->{data}, 'hi', 'event' );
        ok $c->wait_tcp_eof(3), 'the idle stream is closed';
        my $dt = time - $t0;
        ok $dt >= 0.9 && $dt < 2.5, sprintf( 'after about 1 s (%.2fs)', $dt );
        my $e = wait_rec( 'wait-idle', qr/ended/, 3 );
        is_deeply $e && $e->{event}, { type => 'sse.disconnect', reason => 'idle_timeout' },
          'app gets sse.disconnect idle_timeout';

        # Keepalive comments count as traffic.
        sleep 0.6 if time - $t0 < 1.6;
        ok !$k->wait_tcp_eof(0), 'a stream with keepalive 0.3 is still open after 1.6 s';
        ok !wait_rec( 'wait-ka-alive', qr/ended/, 0 ), 'its app is still waiting';
        $k->wait_eof(0);
        my $nk = () = $k->raw =~ /^:\n\n/mg;
        ok $nk >= 3, "keepalive comments arrived ($nk)";
        $k->close;
        my $e2 = wait_rec( 'wait-ka-alive', qr/ended/, 3 );
        is $e2 && $e2->{event}{reason}, 'client_closed', 'then client_closed when the client goes';
    };

    subtest 'SIGTERM closes open streams at once (server_shutdown)' => sub {
        unlink "$dir/wait-ka-term";
        my $c = PagiRS::SSE->open( $p2, '/wait-ka?term' );
        is( ( $c->next_event(3) // {} )->{data}, 'hi', 'streaming' );
        ok wait_rec( 'wait-ka-term', qr/waiting/ ), 'app waiting';
        my $t0 = time;
        kill 'TERM', $s2->pid;
        ok $c->wait_tcp_eof(3), 'stream closed';
        my $dt = time - $t0;
        ok $dt < 1.5, sprintf( 'at once (%.2fs)', $dt );
        my $e = wait_rec( 'wait-ka-term', qr/ended/, 3 );
        is_deeply $e && $e->{event}, { type => 'sse.disconnect', reason => 'server_shutdown' },
          'app gets sse.disconnect server_shutdown';
        my $t1 = time;
        sleep 0.02 while $s2->is_running && time - $t1 < 5;
        ok !$s2->is_running, 'server exited';
        is $s2->{exit_code}, 0, 'with code 0';
        ok time - $t0 < 3, sprintf( 'promptly (%.2fs), not after --shutdown-timeout', time - $t0 );
    };
}

# ---------------------------------------------------------------------------
# Backpressure (small water marks).
# ---------------------------------------------------------------------------
subtest 'pagi.transport backpressure: sse.send waits for a client that does not read' => sub {
    my $s3 = start_server( '--write-high-watermark', 16384, '--write-low-watermark', 4096, '--no-access-log', $app );
    unlink "$dir/bp";
    my $c = PagiRS::SSE->open( $s3->port, '/bp' );
    my $p = wait_rec( 'bp', qr/stuck/, 10 );
    ok $p, 'an sse.send stayed pending while the client did not read' or return;
    ok $p->{i} < 600, "at event $p->{i} of 600";
    is $p->{high_mark}, 16384, 'high_water_mark from --write-high-watermark';
    ok $p->{buffered} >= $p->{high_mark}, "buffered_amount $p->{buffered} >= high mark";
    ok $p->{high} >= 1, 'on_high_water fired';
    sleep 0.4;
    is scalar( grep { $_->{stage} eq 'resolved' } rec_lines('bp') ), 0, 'still pending 0.4 s later';

    my @ev = $c->all_events(10);
    my $r = wait_rec( 'bp', qr/resolved/, 3 );
    ok $r, 'resolved once the client read';
    ok $r && $r->{t} - $p->{t} >= 0.35, 'not before';
    is scalar(@ev), $p->{i} + 1, 'every event arrived';
    is $ev[-1]{event}, 'end', 'then the end event';
    is $ev[-1]{data}, $p->{i}, 'no event after the pending one was sent';
    is_deeply [ grep { length( $_->{data} ) != 65536 } @ev[ 0 .. $#ev - 1 ] ], [], 'each with its 64 KiB data';
    is_deeply [ map { $_->{id} } @ev[ 0 .. $#ev - 1 ] ], [ 1 .. $p->{i} ], 'ids in order';
    ok $c->complete, 'stream complete';
    my $d = wait_rec( 'bp', qr/done/, 3 ) // {};
    ok $d->{drain} >= 1, 'on_drain fired';
    $s3->stop( 'TERM', 5 );
};

sub diag_bytes {
    my ( $got, $exp ) = @_;
    my $q = sub { ( my $s = shift ) =~ s/([^\x20-\x7e])/sprintf '\\x%02x', ord $1/ge; $s };
    diag "got:      " . $q->($got);
    diag "expected: " . $q->($exp);
}

ok $server->is_running, 'main server still running';
unlike $server->output, qr/\b(?:ERROR|WARN)\b/, 'main server logged no errors or warnings'
  or diag $server->output;
is $server->stop( 'TERM', 10 ), 0, 'main server exits 0';

done_testing;
