use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;
use PagiRS::WS;

# PAGI_RS_COUNT_OPS=1 (what bench/bin/cost-per-request uses): the
# interpreter counts the Perl ops it runs and prints them by op type, by
# file and by statement when it is freed at exit.  The app below runs a
# known loop per request, so its statement's count must grow with the
# requests; without the variable nothing is printed.

my $app = write_app( <<'PERL', 'op_count_app.pl' );
use strict; use warnings; use Future::AsyncAwait;
async sub {
    my ($scope, $receive, $send) = @_;
    return if $scope->{type} eq 'lifespan';
    my $n = 0;
    $n += $_ for 1 .. 500;    # the counted loop
    await $send->({ type => 'http.response.start', status => 200,
        headers => [ [ 'content-type', 'text/plain' ] ] });
    await $send->({ type => 'http.response.body', body => "$n" });
};
PERL

sub run_requests {
    my ( $requests, %env ) = @_;
    local @ENV{ keys %env } = values %env;
    my $s = start_server( '--no-access-log', $app );
    for ( 1 .. $requests ) {
        my $r = http_request( $s->port, 'GET', '/' );
        die "request failed: $r->{raw}" unless $r->{status} == 200 && $r->{body} eq '125250';
    }
    is $s->stop, 0, "the server stops cleanly after $requests requests";
    return $s->output;
}

# The ops counted in the file whose path ends in $path (every copy of it:
# embedded modules are named by their loader's address).
sub ops_of_file {
    my ( $out, $path ) = @_;
    my $ops = 0;
    $ops += $1 while $out =~ m{^pagi-rs op count: file \S*\Q$path\E (\d+)$}mg;
    return $ops;
}

sub loop_ops {
    my ($out) = @_;
    my ($n) = $out =~ /^pagi-rs op count: line \S*op_count_app\.pl:6 (\d+)$/m;
    return $n;
}

my $few  = run_requests( 2,  PAGI_RS_COUNT_OPS => 1 );
my $many = run_requests( 12, PAGI_RS_COUNT_OPS => 1 );

like $many, qr/^pagi-rs op count: total \d+$/m, 'a total is printed';
like $many, qr/^pagi-rs op count: op nextstate \d+$/m, 'counts by op type';
like $many, qr/^pagi-rs op count: file \S*op_count_app\.pl \d+$/m, 'counts by file';
my ( $before, $after ) = ( loop_ops($few), loop_ops($many) );
ok defined $before && defined $after, "the app's loop statement is among the busiest" or diag $many;
# 500 iterations of an add and an iteration per request: each request adds
# at least 1,000 ops to that statement.
cmp_ok $after - $before, '>=', 10 * 1000, "ten more requests add at least 10,000 ops to it ($before -> $after)";

# The app's async sub finishes without waiting: its Future comes from C
# (pending.c's Future->AWAIT_NEW_DONE), and http_app.c reads that it is
# done from the object.  Through Future::PP they were 74 ops per request.
my ( $pp_few, $pp_many ) = map { ops_of_file( $_, 'Future/PP.pm' ) } $few, $many;
cmp_ok $pp_many - $pp_few, '<', 10 * 5,
  "ten more requests run almost no Perl of Future::PP ($pp_few -> $pp_many ops)";

# A WebSocket message that a receive waits for is handed to the app from C
# (websocket.c, request.c): WebSocket.pm runs no Perl for it.  Before, its
# _on_message and _receive ran about 80 ops per message (and Bridge.pm's
# dispatch about 30 more).
my $ws_app = write_app( <<'PERL', 'op_count_ws_app.pl' );
use strict; use warnings; use Future::AsyncAwait;
async sub {
    my ($scope, $receive, $send) = @_;
    return if $scope->{type} ne 'websocket';
    await $receive->();
    await $send->({ type => 'websocket.accept' });
    while (1) {
        my $ev = await $receive->();
        return if $ev->{type} eq 'websocket.disconnect';
        await $send->({ type => 'websocket.send', text => $ev->{text} });
    }
};
PERL

sub bridge_ops_for_messages {
    my ($messages) = @_;
    local $ENV{PAGI_RS_COUNT_OPS} = 1;
    my $s  = start_server( '--no-access-log', $ws_app );
    my $ws = PagiRS::WS->connect( $s->port );
    for my $i ( 1 .. $messages ) {
        $ws->send_text("m$i");
        my $m = $ws->recv_message(5);
        die "no echo of m$i" unless $m && $m->{data} eq "m$i";
    }
    $ws->close(1000);
    $ws->wait_close(3);
    $s->stop;
    return ops_of_file( $s->output, 'PAGI/RS/WebSocket.pm' );
}

my ( $ws_few, $ws_many ) = ( bridge_ops_for_messages(10), bridge_ops_for_messages(210) );
cmp_ok $ws_many - $ws_few, '<', 200,
  "200 more WebSocket messages run no Perl of WebSocket.pm ($ws_few -> $ws_many ops)";

# A send that completes at once returns the always-done $DONE, whose
# answers to Future::AsyncAwait's AWAIT_IS_READY and AWAIT_GET are XS
# (send.c): HTTP.pm runs no Perl per awaited send.  As Perl subs they were
# 6 ops per send.
my $sse_app = write_app( <<'PERL', 'op_count_sse_app.pl' );
use strict; use warnings; use Future::AsyncAwait;
async sub {
    my ($scope, $receive, $send) = @_;
    return if $scope->{type} ne 'sse';
    my ($n) = $scope->{query_string} =~ /n=(\d+)/;
    await $send->({ type => 'sse.start', status => 200 });
    for my $i ( 1 .. $n ) { await $send->({ type => 'sse.send', data => "$i" }) }
    await $send->({ type => 'sse.close' });
};
PERL

sub http_pm_ops_for_events {
    my ($events) = @_;
    local $ENV{PAGI_RS_COUNT_OPS} = 1;
    my $s = start_server( '--no-access-log', $sse_app );
    my $r = http_request( $s->port, 'GET', "/?n=$events", headers => [ [ 'Accept', 'text/event-stream' ] ] );
    die "no stream of $events events: $r->{raw}" unless ( $r->{body} // '' ) =~ /^data: $events$/m;
    $s->stop;
    return ops_of_file( $s->output, 'PAGI/RS/HTTP.pm' );
}

my ( $sse_few, $sse_many ) = ( http_pm_ops_for_events(10), http_pm_ops_for_events(2010) );
cmp_ok $sse_many - $sse_few, '<', 500,
  "2,000 more awaited SSE sends run no Perl of HTTP.pm ($sse_few -> $sse_many ops)";

# A final body send that finds the buffer full does not wait (the scope
# ends as it is taken), and send.c ends the request in C as for any final
# send.  Here it always does: 4 KiB leave twice the 1 KiB mark queued.
# Through HTTP.pm's _response_complete and Connection.pm's deferred _notify
# it was about 300 ops per request.
my $final_app = write_app( <<'PERL', 'op_count_final_app.pl' );
use strict; use warnings; use Future::AsyncAwait;
async sub {
    my ($scope, $receive, $send) = @_;
    return if $scope->{type} ne 'http';
    await $send->({ type => 'http.response.start', status => 200,
        headers => [ [ 'content-type', 'text/plain' ] ] });
    await $send->({ type => 'http.response.body', body => 'x' x 4096, more => 0 });
};
PERL

sub end_ops_for_requests {
    my ($requests) = @_;
    local $ENV{PAGI_RS_COUNT_OPS} = 1;
    my $s = start_server( '--no-access-log', '--write-high-watermark', 1024, '--write-low-watermark', 512,
        $final_app );
    for ( 1 .. $requests ) {
        my $r = http_request( $s->port, 'GET', '/' );
        die "request failed: $r->{raw}" unless $r->{status} == 200 && $r->{body} eq 'x' x 4096;
    }
    $s->stop;
    my $out = $s->output;
    return ops_of_file( $out, 'PAGI/RS/HTTP.pm' ) + ops_of_file( $out, 'PAGI/RS/Connection.pm' );
}

my ( $end_few, $end_many ) = ( end_ops_for_requests(2), end_ops_for_requests(22) );
cmp_ok $end_many - $end_few, '<', 20 * 10,
  "20 more requests whose final send finds the buffer full run almost no Perl of HTTP.pm or Connection.pm ($end_few -> $end_many ops)";

my $plain = run_requests(2);
unlike $plain, qr/op count/, 'without PAGI_RS_COUNT_OPS nothing is counted';

done_testing;
