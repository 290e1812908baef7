use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;
use PagiRS::WS;
use File::Temp qw(tempdir);
use JSON::PP;
use Time::HiRes qw(time sleep);

# WebSocket under PAGI Www 0.6: the scope's version keys, the full
# pagi.connection, refusing the handshake with an ordinary HTTP response,
# the terminal-event rule (1011 for an app that leaves an open socket), close
# truthfulness (websocket.disconnect only once the transport is really
# closed, each closing phase bounded by --ws-close-timeout), sends after the
# peer's Close, abort(), how a pending receive and a parked send settle at an
# abnormal end, the bound on receives after the end, and what
# disconnect_detail may not contain.
#
# The app records what it observes as JSON lines in files under $dir named
# after the connection ("<name>.<what>"); the test reads them back.

my $dir = tempdir( CLEANUP => 1 );
my $J   = JSON::PP->new->canonical->utf8->allow_nonref;

# Every pagi.connection member Www 0.6 lists, and the subset PAGI-Tools
# 0.002003 calls on a websocket scope.
my @CONNECTION_API = qw(is_connected disconnect_reason disconnect_detail on_disconnect on_complete on_end
  end_future disconnect_future response_started response_complete abort close_code close_reason);
my @PAGI_TOOLS_API = qw(response_started is_connected on_end disconnect_reason disconnect_detail close_code close_reason);

( my $app_code = <<'APP' ) =~ s/__DIR__/$dir/g;
use strict; use warnings;
use Future; use Future::AsyncAwait; use Future::IO;
use JSON::PP; use Scalar::Util qw(blessed); use Time::HiRes qw(time);
my $dir = '__DIR__';
my $J = JSON::PP->new->canonical->utf8->allow_nonref;
my @API = qw(is_connected disconnect_reason disconnect_detail on_disconnect on_complete on_end
  end_future disconnect_future response_started response_complete abort close_code close_reason);

# Which of the app's own calls ($send, $receive, abort) is running right now:
# a callback that sees it set ran inside that call, which the spec forbids.
our $INSIDE = '';
my %KEEP;    # Futures the app leaves pending after returning

sub rec {
    my ($file, $data) = @_;
    open my $fh, '>>', "$dir/$file" or die "open $dir/$file: $!";
    print $fh $J->encode($data), "\n";
    close $fh;
}
sub query { my ($s) = @_; return { map { split /=/, $_, 2 } split /&/, $s->{query_string} // '' } }

# Every fact pagi.connection reports, read now.
sub facts {
    my ($c) = @_;
    return { map { $_ => scalar $c->$_() }
        qw(is_connected disconnect_reason disconnect_detail response_started response_complete close_code close_reason) };
}

# Record every end notification, with whether it ran inside one of the app's calls.
sub watch_end {
    my ($c, $name) = @_;
    $c->on_disconnect(sub { rec("$name.cb", { event => 'disconnect', reason => $_[0], detail => $_[1], inside => $INSIDE, at => time }) });
    $c->on_complete(sub { rec("$name.cb", { event => 'complete', args => scalar(@_), inside => $INSIDE, at => time }) });
    $c->on_end(sub { rec("$name.cb", { event => 'end', reason => $_[0], detail => $_[1], inside => $INSIDE, at => time }) });
}

# Await a send: 'ok' or 'fail: <message>'.
async sub try_send {
    my ($send, $ev) = @_;
    my $ok = eval { await $send->($ev); 1 };
    return $ok ? 'ok' : 'fail: ' . $@;
}

# Receive until websocket.disconnect, recording what came.
async sub drain {
    my ($receive, $file) = @_;
    while (1) {
        my $ev = await $receive->();
        rec($file, $ev) if $file;
        return $ev if $ev->{type} eq 'websocket.disconnect';
    }
}

# Poll (without cancelling anything) until $f is ready or $secs pass.
async sub ready_within {
    my ($f, $secs) = @_;
    my $deadline = time + $secs;
    await Future::IO->sleep(0.02) while !$f->is_ready && time < $deadline;
    return $f->is_ready;
}

my $app = async sub {
    my ($scope, $receive_raw, $send_raw) = @_;
    return if $scope->{type} eq 'lifespan';
    my $receive = sub { local $INSIDE = 'receive'; $receive_raw->(@_) };
    my $send    = sub { local $INSIDE = 'send'; $send_raw->(@_) };
    my $path = $scope->{path};
    my $q = query($scope);
    my $name = $q->{name} // 'x';
    my $c = $scope->{'pagi.connection'};

    if ($scope->{type} ne 'websocket') {
        await $send->({ type => 'http.response.start', status => 200, headers => [['content-type', 'text/plain']] });
        await $send->({ type => 'http.response.body', body => 'not a websocket' });
        return;
    }

    if ($path eq '/scope') {
        my %r;
        $r{pagi} = $scope->{pagi};
        $r{extensions} = $scope->{extensions};
        $r{can} = [ grep { blessed($c) && $c->can($_) } @API ];
        $r{before_accept} = facts($c);
        await $receive->();
        await $send->({ type => 'websocket.accept' });
        $r{after_accept} = facts($c);
        rec("$name.scope", \%r);
        await $send->({ type => 'websocket.send', text => 'recorded' });
        await drain($receive);
        return;
    }

    if ($path eq '/refuse') {
        my $status = $q->{status};
        watch_end($c, $name);
        await $receive->();    # websocket.connect
        # A receive left pending across the refusal.
        my $pending = $receive->();
        $KEEP{$name} = $pending;
        my %r;
        for my $low (200, 101) {
            push @{ $r{low} }, await try_send($send, { type => 'http.response.start', status => $low,
                headers => [['content-type', 'text/plain']] });
        }
        $r{started_after_low} = $c->response_started ? 1 : 0;
        await Future::IO->sleep(0.2);    # a wrongly written head would be on the wire by now
        my @h = (['content-type', 'text/plain'], ['x-refused', $name]);
        push @h, ['www-authenticate', 'Basic realm="t87"'] if $status == 401;
        $r{start} = await try_send($send, { type => 'http.response.start', status => $status, headers => \@h });
        $r{started} = $c->response_started ? 1 : 0;
        $r{accept_mid} = await try_send($send, { type => 'websocket.accept' });
        $r{body1} = await try_send($send, { type => 'http.response.body', body => 'part1-', more => 1 });
        await Future::IO->sleep(0.3);
        $r{body2} = await try_send($send, { type => 'http.response.body', body => 'part2', more => 0 });
        $r{accept_after} = await try_send($send, { type => 'websocket.accept' });
        rec("$name.refuse", \%r);
        my $how = await $c->end_future;
        my %a = (end_future => $how, facts => facts($c));
        $a{pending_ready} = await ready_within($pending, 2);
        $a{pending} = $pending->is_done ? $pending->get : undef;
        $a{receive_after} = await $receive->();
        rec("$name.after", \%a);
        return;
    }

    if ($path eq '/after-accept-http') {
        await $receive->();
        await $send->({ type => 'websocket.accept' });
        my @r;
        push @r, await try_send($send, { type => 'http.response.start', status => 403, headers => [['content-type', 'text/plain']] });
        push @r, await try_send($send, { type => 'http.response.body', body => 'LEAK-BODY', more => 0 });
        await Future::IO->sleep(0.2);
        await $send->({ type => 'websocket.send', text => join '|', map { s/\s+\z//r } @r });
        await drain($receive);
        return;
    }

    if ($path eq '/legacy-deny') {
        await $receive->();
        my @r;
        push @r, await try_send($send, { type => 'websocket.http.response.start', status => 403, headers => [] });
        push @r, await try_send($send, { type => 'websocket.http.response.body', body => 'LEAK-BODY' });
        rec("$name.legacy", \@r);
        await Future::IO->sleep(0.2);
        # Still undecided: an ordinary refusal decides it (0.6); under 0.3 the
        # denial above already did, and this one fails.
        await try_send($send, { type => 'http.response.start', status => 409, headers => [['content-type', 'text/plain']] });
        await try_send($send, { type => 'http.response.body', body => 'conflict' });
        return;
    }

    if ($path eq '/return') {
        await $receive->();
        return;
    }

    if ($path eq '/close-first') {
        await $receive->();
        my $r = await try_send($send, { type => 'websocket.close', code => 1000 });
        rec("$name.close", { result => $r });
        if ($q->{stop}) { return }    # 0.3: the close refused the handshake
        await Future::IO->sleep(0.3);    # a 403 written by the close would reach the client first
        await $send->({ type => 'websocket.accept' });
        await $send->({ type => 'websocket.send', text => $r });
        await drain($receive);
        return;
    }

    if ($path eq '/return-open') {
        watch_end($c, $name);
        await $receive->();
        await $send->({ type => 'websocket.accept' });
        await $send->({ type => 'websocket.send', text => 'bye' });
        # Left pending when the app returns: what would it have heard?
        my $rf = $receive->();
        $KEEP{$name} = $rf;
        $rf->on_ready(sub {
            my $f = shift;
            rec("$name.pending", { event => $f->is_done ? $f->get : undef, facts => facts($c) });
            delete $KEEP{$name};
        });
        return;
    }

    if ($path eq '/app-close') {
        # The app starts the closing handshake when the client says so.
        watch_end($c, $name);
        await $receive->();
        await $send->({ type => 'websocket.accept' });
        await $send->({ type => 'websocket.send', text => 'ready' });
        my $ev = await $receive->();
        my $closed_at = time;
        my $r = await try_send($send, { type => 'websocket.close', code => 1000, reason => 'app-bye' });
        my $end = await drain($receive);
        rec("$name.end", { event => $end, at => time, closed_at => $closed_at, close => $r, facts => facts($c) });
        return;
    }

    if ($path eq '/peer-close') {
        # The client decides how it ends; the app just listens.
        watch_end($c, $name);
        await $receive->();
        await $send->({ type => 'websocket.accept' });
        await $send->({ type => 'websocket.send', text => 'ready' });
        my $end = await drain($receive, "$name.events");
        rec("$name.end", { event => $end, at => time, facts => facts($c) });
        if ($q->{abort_after}) {
            { local $INSIDE = 'abort'; $c->abort('late-abort'); }
            await Future::IO->sleep(0.3);    # a notification would have run by now
            rec("$name.after_abort", { facts => facts($c) });
        }
        if (my $n = $q->{extra}) {
            my @out;
            for my $i (1 .. $n) {
                my $f = $receive->();
                push @out, !$f->is_ready ? { state => 'pending' }
                  : $f->is_failed ? { state => 'failed', failure => ($f->failure)[0] }
                  : { state => 'done', event => $f->get };
            }
            rec("$name.extra", \@out);
        }
        return;
    }

    if ($path eq '/tick') {
        # Send every 50 ms until the receive (pending from the start) is ready.
        watch_end($c, $name);
        await $receive->();
        await $send->({ type => 'websocket.accept' });
        await $send->({ type => 'websocket.send', text => 'ready' });
        my $rf = $receive->();
        my @sends;
        my $i = 0;
        while (!$rf->is_ready && $i < 200) {
            my $at = time;
            my $r = await try_send($send, { type => 'websocket.send', text => "tick$i" });
            push @sends, { i => $i, at => $at, result => $r };
            $i++;
            await Future::IO->sleep(0.05);
        }
        rec("$name.end", { event => $rf->is_ready ? $rf->get : undef, at => time, sends => \@sends, facts => facts($c) });
        return;
    }

    if ($path eq '/abort-pre') {
        watch_end($c, $name);
        await $receive->();    # websocket.connect
        my $rf = $receive->();
        { local $INSIDE = 'abort'; $c->abort('pre-accept-detail'); }
        my $now = facts($c);
        my $ready = await ready_within($rf, 3);
        rec("$name.end", { now => $now, event => $ready && $rf->is_done ? $rf->get : undef, facts => facts($c) });
        return;
    }

    if ($path eq '/abort-post') {
        watch_end($c, $name);
        await $receive->();
        await $send->({ type => 'websocket.accept' });
        await $send->({ type => 'websocket.send', text => 'ready' });
        await $receive->();    # the client's "abort-now"
        my $rf = $receive->();
        { local $INSIDE = 'abort'; $c->abort('post-accept-detail'); }
        my $now = facts($c);
        my $ready = await ready_within($rf, 3);
        rec("$name.end", { now => $now, event => $ready && $rf->is_done ? $rf->get : undef, facts => facts($c) });
        return;
    }

    if ($path eq '/settle') {
        # A receive pending and a send parked on backpressure when the client
        # goes away: the order in which the app hears of it.
        my @order;
        my %inside;
        $c->on_disconnect(sub { push @order, 'on_disconnect'; $inside{on_disconnect} = $INSIDE; $inside{reason} = $_[0] });
        await $receive->();
        await $send->({ type => 'websocket.accept' });
        my $rf = $receive->();
        $rf->on_ready(sub { push @order, 'receive' });
        my $chunk = 'x' x 262144;
        my ($parked, $n);
        for my $i (1 .. 400) {
            my $f = $send->({ type => 'websocket.send', bytes => $chunk });
            next if await ready_within($f, 0.5);
            ($parked, $n) = ($f, $i);
            last;
        }
        if (!$parked) { rec("$name.parked", { parked => 0 }); return }
        $parked->on_ready(sub { push @order, 'send' });
        rec("$name.parked", { parked => 1, i => $n, receive_ready => $rf->is_ready ? 1 : 0 });
        await ready_within($rf, 5);
        await ready_within($parked, 2);
        rec("$name.end", {
            order => \@order, inside => \%inside,
            receive => !$rf->is_ready ? 'pending' : $rf->is_done ? $rf->get : 'failed: ' . ($rf->failure)[0],
            send    => !$parked->is_ready ? 'pending' : $parked->is_done ? 'done' : 'failed: ' . ($parked->failure)[0],
            facts   => facts($c),
        });
        return;
    }

    await $send->({ type => 'http.response.start', status => 404, headers => [] });
    await $send->({ type => 'http.response.body', body => 'no such test path' });
};
$app;
APP
my $app = write_app($app_code);

sub records {
    my ($file) = @_;
    return map { $J->decode($_) } file_lines("$dir/$file");
}

# Poll until the app has written at least $n records to $file.
sub wait_records {
    my ( $file, $n, $timeout ) = @_;
    return map { $J->decode($_) } wait_file_lines( "$dir/$file", $n // 1, $timeout );
}

# The app's end notifications for $name as "event:reason" strings (after a
# short wait, so that one arriving late would be seen too).
sub callbacks {
    my ($name) = @_;
    sleep 0.2;
    return map { $_->{event} . ( defined $_->{reason} ? ":$_->{reason}" : '' ) } records("$name.cb");
}

# No end notification of $name ran inside the app's own $send/$receive/abort.
sub callbacks_outside {
    my ( $name, $what ) = @_;
    my @in = grep { $_->{inside} ne '' } records("$name.cb");
    ok !@in, "$what: no callback ran inside the app's own call"
      or diag explain \@in;
}

my $n = 0;
sub next_name { return 'c' . ++$n }

# A client on $path that has read the app's 'ready'.
sub ready_conn {
    my ( $port, $path, %o ) = @_;
    my $ws = PagiRS::WS->connect( $port, path => $path, %o );
    my $m  = $ws->recv_message(3);
    die "no 'ready' from $path" unless $m && $m->{type} eq 'text' && $m->{data} eq 'ready';
    return $ws;
}

my $s    = start_server( '--ws-close-timeout', 1, $app );
my $port = $s->port;
my $legacy      = start_server( '--spec-version', '0.3', '--ws-close-timeout', 1, $app );
my $legacy_port = $legacy->port;

# ---------------------------------------------------------------------------
subtest 'scope: pagi versions, extensions, the pagi.connection object' => sub {
    for my $case ( [ '0.6', $port, { version => '0.5', spec_version => '0.6' }, {} ],
        [ '0.3', $legacy_port, { version => '0.4', spec_version => '0.3' }, { 'websocket.http.response' => {} } ] )
    {
        my ( $spec, $p, $pagi, $ext ) = @$case;
        my $name = next_name();
        my $ws   = PagiRS::WS->connect( $p, path => "/scope?name=$name" );
        ok $ws->upgraded, "$spec: upgraded";
        my $m = $ws->recv_message(3);
        is $m && $m->{data}, 'recorded', "$spec: the app recorded its scope";
        my ($r) = wait_records("$name.scope");
        ok $r, "$spec: scope record" or next;
        is_deeply $r->{pagi}, $pagi, "$spec: scope pagi is {version => '$pagi->{version}', spec_version => '$spec'}";
        is_deeply $r->{extensions}, $ext,
          $spec eq '0.6' ? "0.6: no 'websocket.http.response' extension" : "0.3: the 'websocket.http.response' extension";
        is_deeply $r->{can}, \@CONNECTION_API, "$spec: pagi.connection has every member"
          or diag explain $r->{can};
        my %can = map { $_ => 1 } @{ $r->{can} };
        ok !grep( { !$can{$_} } @PAGI_TOOLS_API ), "$spec: and what PAGI-Tools 0.002003 calls on a websocket scope";
        # While open: connected, nothing to report yet.
        is $r->{before_accept}{response_started}, 0, "$spec: response_started false before accept";
        is $r->{after_accept}{response_started},  1, "$spec: response_started true after accept";
        is_deeply [ @{ $r->{after_accept} }{qw(is_connected disconnect_reason disconnect_detail response_complete close_code close_reason)} ],
          [ 1, undef, undef, 0, undef, undef ], "$spec: while open: connected, no reason/detail/close_code, not complete";
        $ws->close(1000);
        $ws->wait_close(3);
    }
};

# ---------------------------------------------------------------------------
subtest 'refusal with an ordinary HTTP response (Www 0.6)' => sub {
    for my $status ( 403, 401 ) {
        my $name = next_name();
        my $t0   = time;
        my $ws   = PagiRS::WS->connect( $port, path => "/refuse?name=$name&status=$status" );
        my $took = time - $t0;
        ok !$ws->upgraded, "$status: not upgraded";
        is $ws->status, $status, "$status: the app's status (the failed 200/101 starts sent nothing)";
        is $ws->header('x-refused'), $name, "$status: the app's header";
        like $ws->header('content-type') // '', qr{^text/plain}, "$status: the app's content-type";
        is $ws->header('www-authenticate'), 'Basic realm="t87"', '401: WWW-Authenticate' if $status == 401;
        is lc( $ws->header('connection') // '' ), 'close', "$status: Connection: close";
        ok !defined $ws->header('upgrade') && !defined $ws->header('sec-websocket-accept'), "$status: no upgrade headers";
        is $ws->body, 'part1-part2', "$status: the streamed body, both parts";
        ok $took >= 0.45, sprintf( '%d: the body waited for its last part (%.2fs)', $status, $took );
        ok $ws->eof_within(2), "$status: the server closes the connection after the refusal";

        my ($r) = wait_records("$name.refuse");
        ok $r, "$status: refusal record" or next;
        like $r->{low}[0], qr/^fail: .*300/, "$status: a refusal with status 200 fails";
        like $r->{low}[1], qr/^fail: .*300/, "$status: a refusal with status 101 fails";
        is $r->{started_after_low}, 0, "$status: the failed starts did not start a response";
        is $r->{start}, 'ok', "$status: http.response.start $status is taken";
        is $r->{started}, 1, "$status: response_started after the refusal's start";
        like $r->{accept_mid},   qr/^fail: /, "$status: websocket.accept fails once the refusal started";
        is $r->{body1}, 'ok', "$status: first body part";
        is $r->{body2}, 'ok', "$status: last body part";
        like $r->{accept_after}, qr/^fail: /, "$status: websocket.accept fails after the refusal completed";

        my ($a) = wait_records( "$name.after", 1, 5 );
        ok $a, "$status: end_future resolved" or next;
        is $a->{end_future}, undef, "$status: end_future resolved with undef: a clean end";
        is_deeply [ @{ $a->{facts} }{qw(is_connected disconnect_reason disconnect_detail response_started response_complete)} ],
          [ 0, undef, undef, 1, 1 ], "$status: facts: ended, no reason, started, complete";
        is $a->{pending_ready}, 1, "$status: the receive left pending across the refusal is resolved";
        is_deeply $a->{pending}, { type => 'http.disconnect' }, "$status: with http.disconnect (no websocket.disconnect)";
        is_deeply $a->{receive_after}, { type => 'http.disconnect' }, "$status: a receive after the end gets http.disconnect";
        is_deeply [ callbacks($name) ], [ 'complete', 'end' ], "$status: on_complete and on_end fired, on_disconnect did not";
        callbacks_outside( $name, $status );
    }

    # After accept, http.response.* fail and nothing reaches the wire.
    my $ws = PagiRS::WS->connect( $port, path => '/after-accept-http' );
    ok $ws->upgraded, 'after accept: upgraded';
    my $f = $ws->recv_frame(3);
    is $f && $f->{type}, 'text', 'after accept: the first frame is the app\'s text (no HTTP bytes before it)';
    my @r = split /\|/, $f ? $f->{payload} : '';
    is scalar(@r), 2, 'after accept: two results';
    like $r[0] // '', qr/^fail: /, 'after accept: http.response.start fails';
    like $r[1] // '', qr/^fail: /, 'after accept: http.response.body fails';
    unlike $ws->{buf}, qr/LEAK-BODY|HTTP\/1\.1/, 'after accept: no refusal bytes on the wire';
    $ws->close(1000);
    $ws->wait_close(3);

    # Www 0.3's denial events are not recognised under 0.6.
    my $name = next_name();
    $ws = PagiRS::WS->connect( $port, path => "/legacy-deny?name=$name" );
    is $ws->status, 409, '0.6: websocket.http.response.* sent nothing; the later ordinary refusal answered';
    is $ws->body, 'conflict', '0.6: its body';
    my ($l) = wait_records("$name.legacy");
    like $l->[0] // '', qr/^fail: .*Unrecognized event type/, '0.6: websocket.http.response.start fails as unrecognised';
    like $l->[1] // '', qr/^fail: .*Unrecognized event type/, '0.6: websocket.http.response.body fails as unrecognised';

    # Returning without a decision: the 500 backstop (0.3: 403).
    $ws = PagiRS::WS->connect( $port, path => '/return' );
    is $ws->status, 500, '0.6: returning without accept or refusal gives 500';
    $ws = PagiRS::WS->connect( $legacy_port, path => '/return' );
    is $ws->status, 403, '0.3: returning without a decision gives 403';
};

# ---------------------------------------------------------------------------
subtest 'websocket.close before accept fails; the app can still accept' => sub {
    my $name = next_name();
    my $t0   = time;
    my $ws   = PagiRS::WS->connect( $port, path => "/close-first?name=$name" );
    my $took = time - $t0;
    ok $ws->upgraded, 'the later accept upgraded (101)';
    is $ws->status, 101, 'status 101';
    ok $took >= 0.25, sprintf( 'the failed close answered nothing (the 101 came after the app\'s pause: %.2fs)', $took );
    my $m = $ws->recv_message(3);
    like $m && $m->{data}, qr/^fail: .*before websocket\.accept/, 'the close send failed';
    $ws->close(1000);
    is scalar( $ws->wait_close(3) ), 1000, 'the socket works and closes normally';

    # Under 0.3 the same close refuses with 403.
    $name = next_name();
    $ws   = PagiRS::WS->connect( $legacy_port, path => "/close-first?name=$name&stop=1" );
    is $ws->status, 403, '0.3: a close before accept answers 403';
    my ($r) = wait_records("$name.close");
    is $r->{result}, 'ok', '0.3: and the close send succeeds';
};

# ---------------------------------------------------------------------------
subtest 'app returns from an accepted socket without closing => 1011, server_error' => sub {
    my $name = next_name();
    my $ws   = PagiRS::WS->connect( $port, path => "/return-open?name=$name" );
    my $m    = $ws->recv_message(3);
    is $m && $m->{data}, 'bye', 'the message sent before returning arrives';
    $m = $ws->recv_message(3);
    is $m && $m->{type}, 'close', 'then a Close frame';
    is $m && $m->{code}, 1011, 'with code 1011';
    ok $ws->eof_within(3), 'the server closes TCP after the closing handshake';
    my ($p) = wait_records( "$name.pending", 1, 5 );
    is_deeply $p && $p->{event}, { type => 'websocket.disconnect', code => 1011, reason => 'server_error' },
      'the receive left pending gets websocket.disconnect 1011 server_error';
    is $p && $p->{facts}{disconnect_reason}, 'server_error', 'disconnect_reason server_error';
    is $p && $p->{facts}{response_complete}, 0, 'response_complete false';
    my @cb = callbacks($name);
    is_deeply \@cb, [ 'disconnect:server_error', 'end:server_error' ], "on_disconnect('server_error') and on_end fired"
      or diag explain \@cb;
    callbacks_outside( $name, '1011' );
    ok $s->wait_output( qr/ERROR[^\n]*returned from an accepted WebSocket without a closing handshake/, 3 ),
      'an error is logged';
};

# ---------------------------------------------------------------------------
subtest 'close truthfulness: websocket.disconnect only when the transport is closed' => sub {
    # Clean, started by the app: the client answers, then closes TCP 0.5 s later.
    {
        my $name = next_name();
        my $ws   = ready_conn( $port, "/app-close?name=$name", auto_close_reply => 0, hold_open => 1 );
        $ws->send_text('close-please');
        my $m = $ws->recv_message(3);
        is_deeply [ $m && @$m{qw(type code reason)} ], [ 'close', 1000, 'app-bye' ], 'app close: the app\'s Close frame';
        $ws->close( 4100, 'client-ok' );
        my $t_reply = time;
        ok $ws->eof_within(2), 'app close: after the handshake the server closes its side (FIN)';
        ok time - $t_reply < 0.8, 'app close: promptly';
        ok !-e "$dir/$name.end", 'app close: no disconnect yet while the client keeps its side open';
        sleep 0.5;
        my $t_close = time;
        $ws->disconnect( graceful => 1 );
        my ($e) = wait_records( "$name.end", 1, 5 );
        ok $e, 'app close: the app heard the end' or return;
        is_deeply $e->{event}, { type => 'websocket.disconnect', code => 4100, reason => 'client-ok' },
          'app close: websocket.disconnect with the peer\'s code and reason';
        ok $e->{at} >= $t_close, sprintf( 'app close: only after the client closed TCP (%.3fs after)', $e->{at} - $t_close );
        ok $e->{at} - $t_close < 0.8, 'app close: and promptly then (not by a timeout)';
        is_deeply [ @{ $e->{facts} }{qw(is_connected disconnect_reason disconnect_detail response_complete close_code close_reason)} ],
          [ 0, undef, undef, 1, 4100, 'client-ok' ], 'app close: clean facts, close_code/close_reason from the peer';
        my @cb = callbacks($name);
        is_deeply \@cb, [ 'complete', 'end' ], 'app close: on_complete (and on_end), no on_disconnect' or diag explain \@cb;
        my ($cb) = grep { $_->{event} eq 'complete' } records("$name.cb");
        ok $cb && $cb->{at} >= $t_close, 'app close: on_complete also only after the TCP close';
        callbacks_outside( $name, 'app close' );
    }

    # Clean, started by the client.
    {
        my $name = next_name();
        my $ws   = ready_conn( $port, "/peer-close?name=$name", hold_open => 1 );
        $ws->close( 4001, 'client-init' );
        is scalar( $ws->wait_close(3) ), 4001, 'client close: the server answers with the same code';
        ok $ws->eof_within(2), 'client close: then closes its side';
        sleep 0.5;
        ok !-e "$dir/$name.end", 'client close: no disconnect while the client keeps its side open';
        my $t_close = time;
        $ws->disconnect( graceful => 1 );
        my ($e) = wait_records( "$name.end", 1, 5 );
        ok $e, 'client close: the app heard the end' or return;
        is_deeply $e->{event}, { type => 'websocket.disconnect', code => 4001, reason => 'client-init' },
          'client close: the peer\'s code and reason';
        ok $e->{at} >= $t_close, 'client close: only after the client closed TCP';
        is_deeply [ @{ $e->{facts} }{qw(disconnect_reason disconnect_detail response_complete close_code close_reason)} ],
          [ undef, undef, 1, 4001, 'client-init' ], 'client close: clean facts';
        is_deeply [ callbacks($name) ], [ 'complete', 'end' ], 'client close: on_complete, no on_disconnect';
    }

    # The client never answers the app's Close: close_timeout after 1 s.
    {
        my $name = next_name();
        my $ws   = ready_conn( $port, "/app-close?name=$name", auto_close_reply => 0 );
        $ws->send_text('close-please');
        my $m = $ws->recv_message(3);
        is $m && $m->{type}, 'close', 'close_timeout: the app\'s Close arrives; the client does not answer';
        my $t0   = time;
        my $eof  = $ws->eof_within(4);
        my $took = time - $t0;
        ok $eof, 'close_timeout: the server drops the connection';
        ok $took > 0.7 && $took < 2.5, sprintf( 'close_timeout: after --ws-close-timeout 1 (%.2fs)', $took );
        my ($e) = wait_records( "$name.end", 1, 5 );
        ok $e, 'close_timeout: the app heard the end' or return;
        is_deeply $e->{event}, { type => 'websocket.disconnect', code => 1006, reason => 'close_timeout' },
          'close_timeout: websocket.disconnect 1006 close_timeout';
        my $waited = $e->{at} - $e->{closed_at};
        ok $waited > 0.7 && $waited < 2.5, sprintf( 'close_timeout: about 1 s after the app\'s close (%.2fs)', $waited );
        my $f = $e->{facts};
        is $f->{disconnect_reason}, 'close_timeout', 'close_timeout: disconnect_reason';
        like $f->{disconnect_detail} // '', qr/\b1\s*s\b/, 'close_timeout: disconnect_detail describes the interval';
        is $f->{response_complete}, 0, 'close_timeout: response_complete false';
        is $f->{close_code}, 1006, 'close_timeout: close_code 1006 (no peer Close)';
        is $f->{close_reason}, undef, 'close_timeout: close_reason undef';
        is_deeply [ callbacks($name) ], [ 'disconnect:close_timeout', 'end:close_timeout' ], 'close_timeout: on_disconnect, not on_complete';
        $ws->disconnect;
    }

    # The client answers the app's Close but never closes TCP: close_incomplete.
    {
        my $name = next_name();
        my $ws   = ready_conn( $port, "/app-close?name=$name", auto_close_reply => 0, hold_open => 1 );
        $ws->send_text('close-please');
        $ws->recv_message(3);
        $ws->close( 4002, 'reply-text' );
        ok $ws->eof_within(2), 'close_incomplete: the server closes its side after the handshake';
        my ($e) = wait_records( "$name.end", 1, 4 );
        my $t_client = time;    # the client still holds its side open here
        ok $e, 'close_incomplete: the app heard the end while the client kept TCP open' or return;
        ok $e->{at} < $t_client, 'close_incomplete: before the client closed';
        is_deeply $e->{event}, { type => 'websocket.disconnect', code => 1006, reason => 'close_incomplete' },
          'close_incomplete: websocket.disconnect 1006 close_incomplete';
        my $waited = $e->{at} - $e->{closed_at};
        ok $waited > 0.7 && $waited < 2.5, sprintf( 'close_incomplete: about 1 s after the handshake (%.2fs)', $waited );
        my $f = $e->{facts};
        is $f->{disconnect_reason}, 'close_incomplete', 'close_incomplete: disconnect_reason';
        like $f->{disconnect_detail} // '', qr/\b1\s*s\b/, 'close_incomplete: disconnect_detail describes the interval';
        is $f->{response_complete}, 0, 'close_incomplete: response_complete false';
        is $f->{close_code},   4002,         'close_incomplete: close_code is the peer\'s';
        is $f->{close_reason}, 'reply-text', 'close_incomplete: close_reason is the peer\'s';
        is_deeply [ callbacks($name) ], [ 'disconnect:close_incomplete', 'end:close_incomplete' ],
          'close_incomplete: on_disconnect, not on_complete';
        $ws->disconnect( graceful => 1 );
    }

    # The same when the client started the handshake.
    {
        my $name = next_name();
        my $ws   = ready_conn( $port, "/peer-close?name=$name", hold_open => 1 );
        my $t0   = time;
        $ws->close( 4003, 'never-fin' );
        $ws->wait_close(3);
        ok $ws->eof_within(2), 'client close, no FIN: the server closes its side';
        my ($e) = wait_records( "$name.end", 1, 4 );
        ok $e, 'client close, no FIN: the app heard the end' or return;
        is_deeply $e->{event}, { type => 'websocket.disconnect', code => 1006, reason => 'close_incomplete' },
          'client close, no FIN: 1006 close_incomplete';
        ok $e->{at} - $t0 > 0.7, sprintf( 'client close, no FIN: after the close timeout (%.2fs)', $e->{at} - $t0 );
        is $e->{facts}{close_code}, 4003, 'client close, no FIN: close_code is the peer\'s';
        $ws->disconnect( graceful => 1 );
    }
};

# ---------------------------------------------------------------------------
subtest 'after the peer\'s Close is answered, websocket.send is a no-op' => sub {
    my $name = next_name();
    my $ws   = ready_conn( $port, "/tick?name=$name" );
    my @before;
    while ( @before < 3 ) {
        my $f = $ws->recv_frame(3) or last;
        push @before, $f if $f->{type} eq 'text';
    }
    is scalar(@before), 3, 'ticks arrive while open';
    $ws->close( 1000, 'stop' );
    my $t_close = time;
    # Read everything until the server closes its side.
    my @frames;
    while ( my $f = eval { $ws->recv_frame(3) } ) { push @frames, $f }
    ok $ws->eof, 'the server closed its side';
    my @close = grep { $frames[$_]{type} eq 'close' } 0 .. $#frames;
    is scalar(@close), 1, 'exactly one Close frame from the server';
    is $frames[-1] && $frames[-1]{type}, 'close', 'the last frame is the Close';
    my @after = @close ? @frames[ $close[0] + 1 .. $#frames ] : ();
    is_deeply [ map { $_->{type} } @after ], [], 'nothing follows the server\'s Close';
    # Keep TCP open a little so the app sends into the window.
    sleep 0.4;
    $ws->disconnect( graceful => 1 );
    my ($e) = wait_records( "$name.end", 1, 5 );
    ok $e, 'the app finished its loop' or return;
    is_deeply $e->{event}, { type => 'websocket.disconnect', code => 1000, reason => 'stop' }, 'the app heard 1000 stop';
    # The transport stayed open 0.4 s after the peer's Close, so the app's
    # receive was not ready yet and it kept sending into that window: the
    # case this subtest is about.
    my @late = grep { $_->{at} > $t_close + 0.1 } @{ $e->{sends} };
    ok @late >= 3, sprintf( 'the app sent %d times between the peer\'s Close and the transport\'s end', scalar @late );
    is_deeply [ grep { $_->{result} ne 'ok' } @{ $e->{sends} } ], [], 'every send succeeded (those after the Close as no-ops)';
    callbacks_outside( $name, 'no-op sends' );
};

# ---------------------------------------------------------------------------
subtest 'abort' => sub {
    my $log_from = length $s->output;

    # Before accept: no HTTP response at all.
    my $name = next_name();
    my $ws   = PagiRS::WS->connect( $port, path => "/abort-pre?name=$name" );
    is $ws->status, 0, 'before accept: the connection closes with no HTTP response';
    is $ws->body, '', 'before accept: not a byte';
    my ($e) = wait_records( "$name.end", 1, 5 );
    ok $e, 'before accept: record' or return;
    is $e->{now}{is_connected}, 0, 'before accept: is_connected false as soon as abort returns';
    is_deeply $e->{event}, { type => 'websocket.disconnect', code => 1006, reason => 'app_abort' },
      'before accept: the pending receive gets websocket.disconnect 1006 app_abort';
    is_deeply [ @{ $e->{facts} }{qw(disconnect_reason disconnect_detail response_complete close_code)} ],
      [ 'app_abort', 'pre-accept-detail', 0, 1006 ], 'before accept: reason, the app\'s detail, close_code 1006';
    is_deeply [ callbacks($name) ], [ 'disconnect:app_abort', 'end:app_abort' ], 'before accept: on_disconnect(app_abort)';
    my ($d) = grep { $_->{event} eq 'disconnect' } records("$name.cb");
    is $d && $d->{detail}, 'pre-accept-detail', 'before accept: on_disconnect gets the detail';
    callbacks_outside( $name, 'before accept' );

    # After accept: dropped, no Close frame.
    $name = next_name();
    $ws   = ready_conn( $port, "/abort-post?name=$name" );
    $ws->send_text('abort-now');
    my @frames;
    while ( my $f = eval { $ws->recv_frame(3) } ) { push @frames, $f }
    ok $ws->eof, 'after accept: the connection is dropped';
    is_deeply [ map { $_->{type} } @frames ], [], 'after accept: no Close frame (no frame at all) before EOF';
    ($e) = wait_records( "$name.end", 1, 5 );
    ok $e, 'after accept: record' or return;
    is_deeply $e->{event}, { type => 'websocket.disconnect', code => 1006, reason => 'app_abort' },
      'after accept: websocket.disconnect 1006 app_abort';
    is_deeply [ @{ $e->{facts} }{qw(is_connected disconnect_reason disconnect_detail response_started response_complete close_code close_reason)} ],
      [ 0, 'app_abort', 'post-accept-detail', 1, 0, 1006, undef ], 'after accept: facts';
    is_deeply [ callbacks($name) ], [ 'disconnect:app_abort', 'end:app_abort' ], 'after accept: on_disconnect(app_abort)';
    callbacks_outside( $name, 'after accept' );

    # After the end: a no-op.
    $name = next_name();
    $ws   = ready_conn( $port, "/peer-close?name=$name&abort_after=1" );
    $ws->close( 1000, 'done' );
    $ws->wait_close(3);
    $ws->eof_within(2);
    $ws->disconnect( graceful => 1 );
    my ($a) = wait_records( "$name.after_abort", 1, 5 );
    ok $a, 'after the end: record' or return;
    is_deeply [ @{ $a->{facts} }{qw(disconnect_reason disconnect_detail response_complete close_code)} ],
      [ undef, undef, 1, 1000 ], 'after the end: abort changed nothing';
    is_deeply [ callbacks($name) ], [ 'complete', 'end' ], 'after the end: no on_disconnect';

    sleep 0.2;
    my $log = substr( $s->output, $log_from );
    unlike $log, qr/ERROR/, 'no error logged for aborted scopes' or diag $log;
};

# ---------------------------------------------------------------------------
subtest 'abnormal end: a pending receive and a parked send settle' => sub {
    my $name = next_name();
    my $ws   = PagiRS::WS->connect( $port, path => "/settle?name=$name", timeout => 10 );
    ok $ws->upgraded, 'upgraded';
    # Do not read: the app's sends fill the buffers until one parks.
    my ($p) = wait_records( "$name.parked", 1, 20 );
    ok $p && $p->{parked}, 'a send parked on backpressure' or return;
    is $p->{receive_ready}, 0, 'the receive is pending meanwhile';
    $ws->shutdown_write;    # the client goes away without a Close (FIN)
    my ($e) = wait_records( "$name.end", 1, 8 );
    ok $e, 'the app got past both' or return;
    is_deeply $e->{receive}, { type => 'websocket.disconnect', code => 1006, reason => 'client_closed' },
      'the pending receive resolves with websocket.disconnect 1006 client_closed';
    is $e->{send}, 'done', 'the parked send resolves successfully';
    is $e->{order}[0], 'on_disconnect', 'on_disconnect ran first' or diag explain $e->{order};
    is_deeply [ sort @{ $e->{order} } ], [qw(on_disconnect receive send)], 'each exactly once';
    is $e->{inside}{reason}, 'client_closed', 'on_disconnect(client_closed)';
    is $e->{inside}{on_disconnect}, '', 'on_disconnect did not run inside $send or $receive';
    is $e->{facts}{close_code}, 1006, 'close_code 1006';
    $ws->disconnect;
};

# ---------------------------------------------------------------------------
subtest 'receives after the end: --max-disconnect-receives 3, then failure' => sub {
    my $s2   = start_server( '--max-disconnect-receives', 3, '--ws-close-timeout', 1, $app );
    my $name = next_name();
    my $ws   = ready_conn( $s2->port, "/peer-close?name=$name&extra=5" );
    $ws->close( 4005, 'bye' );
    $ws->wait_close(3);
    $ws->eof_within(2);
    $ws->disconnect( graceful => 1 );
    my ($x) = wait_records( "$name.extra", 1, 5 );
    ok $x, 'record' or return;
    my $end = { type => 'websocket.disconnect', code => 4005, reason => 'bye' };
    is_deeply [ map { $_->{event} } @$x[ 0 .. 2 ] ], [ $end, $end, $end ], 'three more receives get the same disconnect';
    is $x->[3]{state}, 'failed', 'the fourth fails';
    like $x->[3]{failure} // '', qr/not checking for websocket\.disconnect/, 'saying why';
    is $x->[4]{state}, 'failed', 'and so does the next';
    ok $s2->wait_output( qr/receive\(\) called 4 times after the scope ended/, 2 ), 'logged once the bound is passed';
    $s2->stop;
};

# ---------------------------------------------------------------------------
subtest 'disconnect_detail carries no peer data' => sub {
    # A message, then a drop: abnormal, with a detail, but not the payload.
    my $name = next_name();
    my $ws   = ready_conn( $port, "/peer-close?name=$name", headers => [ [ 'X-Secret', 'SECRET-HEADER' ] ] );
    $ws->send_text('SECRET-PAYLOAD');
    my ($ev) = wait_records( "$name.events", 1, 3 );
    is $ev && $ev->{text}, 'SECRET-PAYLOAD', 'the message reached the app';
    $ws->disconnect;
    my ($e) = wait_records( "$name.end", 1, 5 );
    ok $e, 'drop: the app heard the end' or return;
    is $e->{event}{reason}, 'client_closed', 'drop: client_closed';
    ok defined $e->{facts}{disconnect_detail}, 'drop: there is a detail';
    unlike $e->{facts}{disconnect_detail} // '', qr/SECRET/, 'drop: it has neither the payload nor a header';
    my ($d) = grep { $_->{event} eq 'disconnect' } records("$name.cb");
    unlike $d && $d->{detail} // '', qr/SECRET/, 'drop: nor does on_disconnect\'s detail';

    # Invalid UTF-8 after a secret: the rule is the detail, not the bytes.
    $name = next_name();
    $ws   = ready_conn( $port, "/peer-close?name=$name" );
    $ws->send_frame( opcode => 'text', payload => "SECRET-PAYLOAD\xff" );
    is scalar( $ws->wait_close(3) ), 1007, 'bad UTF-8: Close 1007';
    $ws->disconnect;
    ($e) = wait_records( "$name.end", 1, 5 );
    ok defined $e && defined $e->{facts}{disconnect_detail}, 'bad UTF-8: there is a detail';
    unlike $e->{facts}{disconnect_detail} // '', qr/SECRET/, 'bad UTF-8: without the payload';

    # A Close reason on a clean end: close_reason has it, the detail is undef.
    $name = next_name();
    $ws   = ready_conn( $port, "/peer-close?name=$name" );
    $ws->close( 1000, 'SECRET-REASON' );
    $ws->wait_close(3);
    $ws->eof_within(2);
    $ws->disconnect( graceful => 1 );
    ($e) = wait_records( "$name.end", 1, 5 );
    is $e && $e->{facts}{close_reason}, 'SECRET-REASON', 'clean: close_reason is the peer\'s text';
    is $e && $e->{facts}{disconnect_detail}, undef, 'clean: disconnect_detail undef';

    # ... and on an abnormal end after the peer's Close, the detail leaves it out.
    $name = next_name();
    $ws   = ready_conn( $port, "/peer-close?name=$name", hold_open => 1 );
    $ws->close( 1000, 'SECRET-REASON' );
    $ws->wait_close(3);    # then keep TCP open: close_incomplete
    ($e) = wait_records( "$name.end", 1, 4 );
    is $e && $e->{event}{reason}, 'close_incomplete', 'no FIN: close_incomplete';
    is $e && $e->{facts}{close_reason}, 'SECRET-REASON', 'no FIN: close_reason is the peer\'s text';
    ok $e && defined $e->{facts}{disconnect_detail}, 'no FIN: there is a detail';
    unlike $e && $e->{facts}{disconnect_detail} // '', qr/SECRET/, 'no FIN: without the peer\'s reason';
    $ws->disconnect( graceful => 1 );
};

$s->stop;
$legacy->stop;
done_testing;
