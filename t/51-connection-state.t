use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;
use File::Temp qw(tempdir);
use IO::Socket::INET;
use JSON::PP;
use Time::HiRes qw(time sleep);

# pagi.connection: per-request connection state, terminal callbacks,
# disconnect_future, and what $receive / $send do once the request is over.

my $dir = tempdir( CLEANUP => 1 );
my $J = JSON::PP->new->canonical->allow_nonref;

my $app = write_app( <<"APP" );
use strict; use warnings; use Future::AsyncAwait; use Future::IO; use JSON::PP;
use Time::HiRes qw(time);
my \$dir = '$dir';
my \$J = JSON::PP->new->canonical->allow_nonref;
sub rec {
    my (\$file, \$data) = \@_;
    open my \$fh, '>>', "\$dir/\$file" or die "open \$dir/\$file: \$!";
    print \$fh \$J->encode(\$data), "\\n";
    close \$fh;
}
sub state_of {
    my (\$c) = \@_;
    return { is_connected => \$c->is_connected, reason => \$c->disconnect_reason,
             started => \$c->response_started, complete => \$c->response_complete };
}
my \$plain = [['content-type', 'text/plain']];
my \$app = async sub {
    my (\$scope, \$receive, \$send) = \@_;
    return if \$scope->{type} eq 'lifespan';
    my \$path = \$scope->{path};
    my \$c = \$scope->{'pagi.connection'};

    if (\$path eq '/ok') {
        await \$send->({ type => 'http.response.start', status => 200, headers => \$plain });
        await \$send->({ type => 'http.response.body', body => 'ok', more => 0 });
        return;
    }
    if (\$path eq '/normal') {
        \$c->on_complete(sub { rec('normal.cb', { event => 'complete', state => state_of(\$c) }) });
        \$c->on_disconnect(sub { rec('normal.cb', { event => 'disconnect', reason => \$_[0] }) });
        my %o;
        \$o{initial} = state_of(\$c);
        my \$ev = await \$receive->();
        \$o{first_receive} = \$ev->{type};
        \$o{after_receive} = state_of(\$c);
        await \$send->({ type => 'http.response.start', status => 200, headers => \$plain });
        \$o{after_start} = state_of(\$c);
        await \$send->({ type => 'http.response.body', body => 'part1-', more => 1 });
        \$o{after_partial_body} = state_of(\$c);
        await \$send->({ type => 'http.response.body', body => 'part2', more => 0 });
        \$o{after_final_body} = state_of(\$c);
        my \$rf = \$receive->();
        \$o{receive_after_complete_ready} = \$rf->is_ready ? 1 : 0;
        \$o{receive_after_complete_type} = \$rf->is_ready && !\$rf->failure ? \$rf->get->{type} : undef;
        rec('normal.obs', \\%o);
        return;
    }
    if (\$path eq '/late-complete') {
        await \$send->({ type => 'http.response.start', status => 200, headers => \$plain });
        await \$send->({ type => 'http.response.body', body => 'done', more => 0 });
        await Future::IO->sleep(0.4);    # the response has certainly been delivered by now
        my %o = (after_delivery => state_of(\$c));
        my \$fired = 0;
        \$c->on_complete(sub { \$fired++; rec('late.cb', { event => 'complete' }) });
        \$c->on_disconnect(sub { rec('late.cb', { event => 'disconnect', reason => \$_[0] }) });
        \$o{fired_synchronously} = \$fired;
        rec('late.obs', \\%o);
        return;
    }
    if (\$path eq '/waits-for-end') {
        # A long poll: waits for the client to leave, writing nothing.
        my \$name = \$scope->{query_string};
        my \$t0 = time;
        await \$receive->();
        rec("\$name.started", 1);
        my \$ev = await Future->wait_any(\$receive->(),
            Future::IO->sleep(5)->then(sub { Future->done({ type => 'still waiting' }) }));
        rec("\$name.end", { type => \$ev->{type}, reason => \$c->disconnect_reason, after => time - \$t0 });
        return;
    }
    if (\$path eq '/slow') {
        my (\$rf, \$cb_count) = (undef, 0);
        my \$df = \$c->disconnect_future;
        \$df->on_done(sub {
            rec('slow.order', { event => 'future', value => \$_[0], state => state_of(\$c), callbacks_ran => \$cb_count });
        });
        \$c->on_disconnect(sub {
            \$cb_count++;
            rec('slow.order', { event => 'on_disconnect', reason => \$_[0], state => state_of(\$c),
                future_ready => \$df->is_ready ? 1 : 0,
                receive_ready => (\$rf && \$rf->is_ready) ? 1 : 0 });
        });
        \$c->on_complete(sub { rec('slow.order', { event => 'on_complete' }) });
        my \$ev = await \$receive->();
        \$rf = \$receive->();    # body consumed: this one stays pending
        \$rf->on_done(sub {
            rec('slow.order', { event => 'receive', type => \$_[0]{type}, callbacks_ran => \$cb_count, state => state_of(\$c) });
        });
        rec('slow.started', { first_receive => \$ev->{type}, second_receive_ready => \$rf->is_ready ? 1 : 0 });
        await Future::IO->sleep(1.5);
        my %o = (after_sleep => state_of(\$c));
        \$o{future_ready}  = \$df->is_ready ? 1 : 0;
        \$o{future_value}  = \$df->is_ready && \$df->is_done ? (\$df->get)[0] : undef;
        \$o{receive_ready} = \$rf->is_ready ? 1 : 0;
        \$o{receive_type}  = \$rf->is_ready && \$rf->is_done ? \$rf->get->{type} : undef;
        my \$df2 = \$c->disconnect_future;
        \$o{new_future_ready} = \$df2->is_ready ? 1 : 0;
        \$o{new_future_value} = \$df2->is_ready && \$df2->is_done ? (\$df2->get)[0] : undef;
        my \$late;
        \$c->on_disconnect(sub { \$late = \$_[0] });
        \$o{late_callback_reason} = \$late;
        my \$late_complete = 0;
        \$c->on_complete(sub { \$late_complete++ });
        \$o{late_on_complete_fired} = \$late_complete;
        my \$sf = \$send->({ type => 'http.response.start', status => 200, headers => \$plain });
        \$o{send_start_ready}  = \$sf->is_ready ? 1 : 0;
        \$o{send_start_failed} = \$sf->is_ready && \$sf->failure ? '' . \$sf->failure : undef;
        my \$ok = eval {
            await \$sf;
            await \$send->({ type => 'http.response.body', body => 'too late', more => 0 });
            1;
        };
        \$o{send_exception} = \$ok ? undef : "\$@";
        \$o{after_sends} = state_of(\$c);
        rec('slow.obs', \\%o);
        return;
    }
    if (\$path eq '/incomplete') {
        \$c->on_disconnect(sub { rec('incomplete.cb', { event => 'disconnect', reason => \$_[0], state => state_of(\$c) }) });
        \$c->on_complete(sub { rec('incomplete.cb', { event => 'complete' }) });
        await \$send->({ type => 'http.response.start', status => 200, headers => \$plain });
        await \$send->({ type => 'http.response.body', body => 'partial', more => 1 });
        return;    # never sends the final body
    }
    if (\$path eq '/die') {
        \$c->on_disconnect(sub { rec('die.cb', { event => 'disconnect', reason => \$_[0], state => state_of(\$c) }) });
        \$c->on_complete(sub { rec('die.cb', { event => 'complete' }) });
        rec('die.before', state_of(\$c));
        die "connection-state-test-death\\n";
    }
    if (\$path eq '/hang') {
        my \$t0 = time;
        \$c->on_disconnect(sub { rec('hang.cb', { event => 'disconnect', reason => \$_[0], after => time - \$t0, state => state_of(\$c) }) });
        \$c->on_complete(sub { rec('hang.cb', { event => 'complete' }) });
        await Future::IO->sleep(5);
        return;
    }
    await \$send->({ type => 'http.response.start', status => 404, headers => \$plain });
    await \$send->({ type => 'http.response.body', body => 'not found', more => 0 });
};
\$app;
APP

sub read_json_lines {
    my ($name) = @_;
    open my $fh, '<', "$dir/$name" or return ();
    my @r;
    while ( my $l = <$fh> ) { chomp $l; push @r, eval { $J->decode($l) } // { bad => $l } }
    return @r;
}

sub wait_json {
    my ( $name, $pred, $timeout ) = @_;
    my $deadline = time + ( $timeout // 5 );
    while ( time < $deadline ) {
        my @r = read_json_lines($name);
        return @r if @r && ( !$pred || grep { $pred->($_) } @r );
        sleep 0.05;
    }
    return read_json_lines($name);
}

sub st { my ($h) = @_; $h ? join( ',', map { "$_=" . ( $h->{$_} // 'undef' ) } sort keys %$h ) : 'missing' }

my $server = start_server( $app );
my $port   = $server->port;

# ---------------------------------------------------------------------------
# A normal request.
{
    my $res = http_request( $port, 'GET', '/normal' );
    is $res->{status}, 200, 'normal: 200';
    is $res->{body}, 'part1-part2', 'normal: body';
    my ($o) = wait_json('normal.obs');
    ok $o, 'normal: the app recorded its observations';
    $o //= {};
    is st( $o->{initial} ), 'complete=0,is_connected=1,reason=undef,started=0',
      'normal: before anything: is_connected 1, disconnect_reason undef, response_started 0, response_complete 0';
    is $o->{first_receive}, 'http.request', 'normal: first receive is http.request';
    is st( $o->{after_start} ), 'complete=0,is_connected=1,reason=undef,started=1',
      'normal: after http.response.start: response_started 1, response_complete 0';
    is st( $o->{after_partial_body} ), 'complete=0,is_connected=1,reason=undef,started=1',
      'normal: after a more=>1 body: response_complete still 0';
    is $o->{after_final_body}{complete}, 1, 'normal: after the final body: response_complete 1';
    is $o->{after_final_body}{reason}, undef, 'normal: after the final body: disconnect_reason still undef';
    is $o->{receive_after_complete_ready}, 1, 'normal: $receive after the response completed is ready immediately';
    is $o->{receive_after_complete_type}, 'http.disconnect', 'normal: ... and returns http.disconnect';

    my @cb = wait_json( 'normal.cb', sub { $_[0]{event} eq 'complete' }, 5 );
    sleep 0.5;    # anything else that was going to fire has had time to
    @cb = read_json_lines('normal.cb');
    my @complete = grep { $_->{event} eq 'complete' } @cb;
    my @disc     = grep { $_->{event} eq 'disconnect' } @cb;
    is scalar(@complete), 1, 'normal: on_complete fired exactly once' or diag explain \@cb;
    is scalar(@disc), 0, 'normal: on_disconnect never fired' or diag explain \@cb;
    is $complete[0] ? $complete[0]{state}{reason} : 'no on_complete', undef,
      'normal: inside on_complete, disconnect_reason is undef';
}

# on_complete registered after the response was delivered still fires.
{
    my $res = http_request( $port, 'GET', '/late-complete' );
    is $res->{status}, 200, 'late on_complete: 200';
    my ($o) = wait_json('late.obs');
    ok $o, 'late on_complete: the app recorded its observations';
    is $o ? $o->{after_delivery}{reason} : 'missing', undef,
      'late on_complete: disconnect_reason is undef after a clean, delivered response';
    my @cb = wait_json( 'late.cb', sub { 1 }, 1.5 );
    is join( ',', map { $_->{event} . ( $_->{reason} ? ":$_->{reason}" : '' ) } @cb ), 'complete',
      'late on_complete: on_complete registered after delivery fires (and on_disconnect does not)';
}

# ---------------------------------------------------------------------------
# A client that pipelined a request behind a long poll and then reset the
# connection: hyper holds that request and reads nothing while the poll is
# in flight, yet the app hears the reset at once (http1/reset_watch.rs).  A
# FIN there is a half-close, answered in turn (t/45-framing-hardening.t).
{
    my $sock = IO::Socket::INET->new( PeerAddr => '127.0.0.1', PeerPort => $port, Proto => 'tcp', Timeout => 5 )
      or die "connect: $!";
    $sock->syswrite( "GET /waits-for-end?pipelined HTTP/1.1\r\nHost: 127.0.0.1:$port\r\n\r\n"
          . "GET /ok HTTP/1.1\r\nHost: 127.0.0.1:$port\r\n\r\n" );
    ok scalar wait_json('pipelined.started'), 'pipelined reset: the long poll started';
    sleep 0.2;
    abort_close($sock);
    my ($end) = wait_json( 'pipelined.end', undef, 8 );
    is $end ? $end->{type} : 'nothing', 'http.disconnect', 'pipelined reset: the waiting receive hears the end';
    is $end ? $end->{reason} : undef, 'client_closed', 'pipelined reset: client_closed';
    cmp_ok $end ? $end->{after} : 99, '<', 3, 'pipelined reset: at once, not at the receive\'s own 5 s timeout';
}

# ---------------------------------------------------------------------------
# The client goes away while the app is busy.
{
    my $sock = IO::Socket::INET->new( PeerAddr => '127.0.0.1', PeerPort => $port, Proto => 'tcp', Timeout => 5 )
      or die "connect: $!";
    $sock->syswrite("GET /slow HTTP/1.1\r\nHost: 127.0.0.1:$port\r\n\r\n");
    my ($started) = wait_json('slow.started');
    ok $started, 'disconnect: the app started';
    is $started ? $started->{second_receive_ready} : undef, 0, 'disconnect: a $receive after the body is pending';
    # A reset: a FIN alone after a complete request is a half-close, which
    # the server serves (t/45-framing-hardening.t).
    abort_close($sock);
    my ($o) = wait_json( 'slow.obs', undef, 5 );
    ok $o, 'disconnect: the app finished its observations';
    $o //= {};
    is $o->{after_sleep}{is_connected}, 0, 'disconnect: is_connected is 0';
    is $o->{after_sleep}{reason}, 'client_closed', 'disconnect: disconnect_reason is client_closed';
    is "$o->{future_ready}/" . ( $o->{future_value} // 'undef' ), '1/client_closed',
      'disconnect: disconnect_future (taken before) resolved with client_closed';
    is "$o->{new_future_ready}/" . ( $o->{new_future_value} // 'undef' ), '1/client_closed',
      'disconnect: disconnect_future taken after the disconnect is already resolved with client_closed';
    is "$o->{receive_ready}/" . ( $o->{receive_type} // 'undef' ), '1/http.disconnect',
      'disconnect: the pending $receive returned http.disconnect';
    is $o->{late_callback_reason}, 'client_closed',
      'disconnect: on_disconnect registered after the disconnect fires immediately with client_closed';
    is $o->{late_on_complete_fired}, 0, 'disconnect: on_complete registered after the disconnect does not fire';
    is $o->{send_start_ready}, 1, 'disconnect: $send after the disconnect resolves at once';
    is $o->{send_start_failed}, undef, 'disconnect: ... successfully (not failed)';
    is $o->{send_exception}, undef, 'disconnect: awaiting sends after the disconnect throws nothing';
    is $o->{after_sends}{started}, 0, 'disconnect: a send after the disconnect did nothing (response_started stays 0)';

    sleep 0.3;
    my @ord = read_json_lines('slow.order');
    my @names = map { $_->{event} } @ord;
    is "@names", 'future on_disconnect receive',
      'disconnect: order is future resolved, then on_disconnect, then http.disconnect to $receive (on_complete never)';
    my ($fut) = grep { $_->{event} eq 'future' } @ord;
    my ($cb)  = grep { $_->{event} eq 'on_disconnect' } @ord;
    my ($rcv) = grep { $_->{event} eq 'receive' } @ord;
    is scalar( grep { $_->{event} eq 'on_disconnect' } @ord ), 1, 'disconnect: on_disconnect fired exactly once';
    is $cb ? $cb->{reason} : undef, 'client_closed', 'disconnect: on_disconnect got client_closed';
    is $cb ? "$cb->{state}{is_connected}/" . ( $cb->{state}{reason} // 'undef' ) : 'missing', '0/client_closed',
      'disconnect: inside on_disconnect, is_connected is already 0 and the reason already set';
    is $cb ? $cb->{future_ready} : undef, 1, 'disconnect: inside on_disconnect, disconnect_future is already ready';
    is $cb ? $cb->{receive_ready} : undef, 0, 'disconnect: inside on_disconnect, http.disconnect not yet delivered to $receive';
    is $fut ? "$fut->{state}{is_connected}/" . ( $fut->{state}{reason} // 'undef' ) . "/$fut->{callbacks_ran}" : 'missing',
      '0/client_closed/0', 'disconnect: when disconnect_future resolves, is_connected is 0, reason set, callbacks not yet run';
    is $rcv ? "$rcv->{type}/$rcv->{callbacks_ran}" : 'missing', 'http.disconnect/1',
      'disconnect: $receive gets http.disconnect after on_disconnect ran';
    unlike $server->output, qr/PAGI application/,
      'disconnect: nothing logged as an application error (no faulty request has run yet)';
}

# ---------------------------------------------------------------------------
# Incomplete response: started, one more=>1 chunk, then the app returns.
# Repeated on fresh connections: what the client sees must not depend on
# whether the server flushed before the app returned.
{
    my $N = 20;
    my ( @bad, $slowest );
    $slowest = 0;
    for my $i ( 1 .. $N ) {
        my $t0 = time;
        my $raw = raw_request( $port, "GET /incomplete HTTP/1.1\r\nHost: 127.0.0.1:$port\r\n\r\n", timeout => 6 );
        my $elapsed = time - $t0;
        $slowest = $elapsed if $elapsed > $slowest;
        my $res = parse_response($raw) // {};
        my $te = join( ',', @{ $res->{headers}{'transfer-encoding'} // [] } );
        my $why =
            ( $res->{status} // 0 ) != 200       ? 'no 200 head'
          : $te !~ /chunked/i                   ? 'not chunked'
          : ( $res->{body} // '' ) ne 'partial' ? "body '" . ( $res->{body} // '' ) . "'"
          : $res->{complete}                    ? 'terminating 0-chunk present'
          : !$res->{incomplete}                 ? 'not truncated'
          :                                       undef;
        push @bad, "#$i: $why (raw " . length($raw) . " bytes)" if $why;
    }
    is scalar(@bad), 0,
      "incomplete: every one of $N attempts shows a 200 chunked head, the 'partial' chunk and no terminating 0-chunk"
      or diag join "\n", @bad;
    cmp_ok $slowest, '<', 4, sprintf( 'incomplete: the server closed the connection each time (slowest %.2f s)', $slowest );
    my @cb = wait_json( 'incomplete.cb', sub { 1 }, 3 );
    sleep 0.3;
    @cb = read_json_lines('incomplete.cb');
    is join( ',', map { $_->{event} . ( $_->{reason} ? ":$_->{reason}" : '' ) } @cb ),
      join( ',', ('disconnect:server_error') x $N ),
      'incomplete: on_disconnect fired once per request with server_error (never on_complete)';
    ok $server->wait_output( qr/incomplete response/, 3 ), 'incomplete: stderr says "incomplete response"';
}

# ---------------------------------------------------------------------------
# 500 backstop: the app dies before starting a response.
{
    my $res = http_request( $port, 'GET', '/die' );
    is $res->{status}, 500, 'die: 500 backstop';
    my ($before) = wait_json('die.before');
    is $before ? $before->{started} : undef, 0, 'die: response_started was 0 before the die';
    my @cb = wait_json( 'die.cb', sub { 1 }, 3 );
    is join( ',', map { $_->{event} . ( $_->{reason} ? ":$_->{reason}" : '' ) } @cb ), 'disconnect:server_error',
      'die: on_disconnect fired with server_error (no on_complete)';
    is $cb[0] ? $cb[0]{state}{started} : undef, 1, 'die: the 500 backstop sets response_started to 1';
    is $cb[0] ? $cb[0]{state}{reason} : undef, 'server_error', 'die: disconnect_reason is server_error';
    ok $server->wait_output( qr/PAGI application error: connection-state-test-death/, 3 ),
      'die: stderr has the application error';
}

my $ok = http_request( $port, 'GET', '/ok' );
is "$ok->{status} " . ( $ok->{body} // '' ), '200 ok', 'the server still serves after all of the above';
is $server->stop('TERM'), 0, 'server exits 0 on SIGTERM';

# ---------------------------------------------------------------------------
# --request-timeout 1 with an app that never responds.
{
    my $s2 = start_server( '--request-timeout', 1, '--shutdown-timeout', 2, $app );
    my $t0 = time;
    my $raw = raw_request( $s2->port, "GET /hang HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", timeout => 6 );
    my $elapsed = time - $t0;
    is $raw, '', 'request timeout: no response bytes at all';
    cmp_ok $elapsed, '>=', 0.9, sprintf( 'request timeout: not closed before the timeout (%.2f s)', $elapsed );
    cmp_ok $elapsed, '<', 3, sprintf( 'request timeout: the connection was closed within ~1-3 s (%.2f s)', $elapsed );
    my @cb = wait_json( 'hang.cb', sub { 1 }, 3 );
    is join( ',', map { $_->{event} . ( $_->{reason} ? ":$_->{reason}" : '' ) } @cb ), 'disconnect:client_timeout',
      'request timeout: the app sees on_disconnect with client_timeout';
    is $cb[0] ? $cb[0]{state}{reason} : undef, 'client_timeout', 'request timeout: disconnect_reason is client_timeout';
    my $ok2 = http_request( $s2->port, 'GET', '/ok' );
    is $ok2->{status}, 200, 'request timeout: a prompt request on the same server is fine';
    $s2->stop('TERM', 10);
}

done_testing;
