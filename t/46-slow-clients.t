use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;
use File::Temp qw(tempdir);
use IO::Select;
use Time::HiRes qw(time sleep);

# Slow clients: a request head trickled in a byte at a time is cut off by
# --timeout, a deadline the trickle does not extend; a request body slower
# than --body-min-rate (after --body-rate-grace of waiting) gets 408, and
# only the time the server spends waiting for the client counts.

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
my \$app = async sub {
    my (\$scope, \$receive, \$send) = \@_;
    return if \$scope->{type} eq 'lifespan';
    my \$path = \$scope->{path};
    my \$c = \$scope->{'pagi.connection'};
    if (\$path eq '/lazy') {
        await Future::IO->sleep(2.5);    # not reading: the client is not to blame
        rec('lazy', { reading => 1 });
    }
    my (\$len, \$last) = (0, undef);
    while (1) {
        \$last = await \$receive->();
        last if \$last->{type} ne 'http.request';
        \$len += length(\$last->{body} // '');
        last unless \$last->{more};
    }
    rec('body', { path => \$path, len => \$len, last => \$last->{type},
        reason => \$c->disconnect_reason, detail => \$c->disconnect_detail });
    return if \$last->{type} ne 'http.request';
    my \$text = "\$path \$len";
    await \$send->({ type => 'http.response.start', status => 200,
        headers => [['content-type', 'text/plain'], ['content-length', length \$text]] });
    await \$send->({ type => 'http.response.body', body => \$text });
};
\$app;
APP

# Write $bytes in pieces of $step bytes every $every seconds, stopping early
# when the server closes or what came back matches $done; at most $max
# seconds.  Returns (what came back, whether the server closed, seconds from
# the first piece to the end).
sub trickle {
    my ( $sock, $bytes, $step, $every, $max, $done ) = @_;
    my $sel = IO::Select->new($sock);
    my ( $buf, $closed, $t0 ) = ( '', 0, time );
    while ( !$closed && time - $t0 < $max && !( $done && $buf =~ $done ) ) {
        if ( length $bytes ) {
            my $piece = substr( $bytes, 0, $step, '' );
            last unless defined $sock->syswrite($piece);
        }
        my $until = time + ( length $bytes ? $every : $max );
        while ( !$closed && time < $until && !( $done && $buf =~ $done ) ) {
            $sel->can_read( $until - time ) or last;
            my $n = $sock->sysread( $buf, 65536, length $buf );
            $closed = 1 unless $n;
        }
    }
    return ( $buf, $closed, time - $t0 );
}

# ---------------------------------------------------------------------------
my $server = start_server( '--timeout', 2, '--body-min-rate', 100, '--body-rate-grace', 1, $app );
my $port   = $server->port;

subtest 'a request head trickled a byte at a time is closed by the --timeout deadline' => sub {
    my $s = connect_port($port);
    my $head = "GET /trickle HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " . ( 'a' x 40 ) . "\r\n\r\n";
    my ( $buf, $closed, $dt ) = trickle( $s, $head, 1, 0.3, 8 );
    ok $closed, 'the server closed the connection';
    ok $dt >= 1.7 && $dt < 3.5, sprintf( 'after about 2 s although a byte came every 0.3 s (%.2fs)', $dt );
    unlike $buf, qr/^HTTP\/1\.1 200/, 'the request was not served';
    ok !wait_json_record( "$dir/body", sub { $_[0]{path} eq '/trickle' }, 0 ), 'the app never saw it';
};

subtest 'a head sent slowly but complete within the deadline is served, each head on its own clock' => sub {
    my $s = connect_port($port);
    my ( $buf, $closed, $dt ) =
      trickle( $s, "GET /steady HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 11, 0.4, 3, qr{/steady 0\z} );
    like $buf, qr{\r\n\r\n/steady 0\z}, sprintf( 'served (head and answer took %.1fs)', $dt );
    ok !$closed, 'the connection stays open';
    my $dt2;
    ( $buf, $closed, $dt2 ) =
      trickle( $s, "GET /again HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 11, 0.4, 3, qr{/again 0\z} );
    like $buf, qr{\r\n\r\n/again 0\z},
      sprintf( 'the next head gets a deadline of its own (%.1fs + %.1fs > 2 s)', $dt, $dt2 );
};

# ---------------------------------------------------------------------------
subtest 'a body slower than --body-min-rate gets 408 and the app hears client_timeout' => sub {
    my $s = connect_port($port);
    $s->syswrite("POST /slow-body HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n");
    my ( $buf, $closed, $dt ) = trickle( $s, 'b' x 1000, 10, 0.5, 6 );
    my $r = parse_response($buf) // {};
    is $r->{status}, 408, 'status 408';
    is_deeply $r->{headers}{'content-type'}, ['text/plain'], 'text/plain';
    is_deeply $r->{headers}{connection}, ['close'], 'Connection: close';
    ok $closed, 'the connection is closed';
    ok $dt >= 0.9 && $dt < 3, sprintf( 'once the 1 s grace is over (%.2fs)', $dt );
    my $rec = wait_json_record( "$dir/body", sub { $_[0]{path} eq '/slow-body' } );
    is $rec && $rec->{last}, 'http.disconnect', 'the pending receive gets http.disconnect';
    is $rec && $rec->{reason}, 'client_timeout', 'client_timeout';
    like $rec && $rec->{detail}, qr{bytes/s .*below --body-min-rate 100 bytes/s}, 'the detail names the rate'
      and note $rec->{detail};
};

subtest 'a body that keeps up the rate is served' => sub {
    my $s = connect_port($port);
    $s->syswrite("POST /steady-body HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 400\r\n\r\n");
    my ( $buf, $closed, $dt ) = trickle( $s, 'b' x 400, 80, 0.25, 4, qr{/steady-body \d+\z} );
    like $buf, qr{ 200 .*\r\n\r\n/steady-body 400\z}s, sprintf( '320 bytes/s over %.1fs: served', $dt );
};

subtest 'an app that does not read does not count against the client' => sub {
    my $s = connect_port($port);
    $s->syswrite( "POST /lazy HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 300\r\n\r\n" . ( 'c' x 150 ) );
    ok wait_json_record( "$dir/lazy", sub { 1 }, 5 ), 'the app starts reading after 2.5 s';
    sleep 0.2;
    $s->syswrite( 'c' x 150 );
    my ( $buf, $closed ) = read_sock( $s, qr{/lazy \d+\z}, 5 );
    like $buf, qr{ 200 .*\r\n\r\n/lazy 300\z}s,
      'served: 150 bytes over 2.7 s of wall clock, but the server waited only 0.2 s';
};

my $off = start_server( '--body-min-rate', 0, '--body-rate-grace', 1, $app );
subtest '--body-min-rate 0 turns the check off' => sub {
    my $s = connect_port( $off->port );
    $s->syswrite("POST /off HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 30\r\n\r\n");
    my ( $buf, $closed, $dt ) = trickle( $s, 'd' x 30, 5, 0.3, 4, qr{/off \d+\z} );
    like $buf, qr{ 200 .*\r\n\r\n/off 30\z}s, sprintf( '20 bytes/s over %.1fs: served', $dt );
};

ok $server->is_running && $off->is_running, 'the servers are still up';
done_testing;
