use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;
use File::Temp qw(tempdir);
use IO::Select;
use Time::HiRes qw(time sleep);

# Outbound flow control: a slow or stalled client must hold the application
# back (its body $send stays pending) instead of the server buffering the
# whole response in memory; pagi.transport reports the queue and fires
# edge-triggered high-water / drain callbacks.

my $dir = tempdir( CLEANUP => 1 );

my $app = write_app( <<"APP" );
use strict; use warnings; use Future::AsyncAwait; use Future::IO;
use Time::HiRes qw(time);
my \$dir = '$dir';
sub rec {
    my (\$file, \@f) = \@_;
    open my \$fh, '>>', "\$dir/\$file" or die "open \$dir/\$file: \$!";
    print \$fh join(' ', \@f), "\\n";
    close \$fh;
}
my \$MB = 1024 * 1024;
my \$app = async sub {
    my (\$scope, \$receive, \$send) = \@_;
    return if \$scope->{type} eq 'lifespan';
    my \$path = \$scope->{path};
    my \$c = \$scope->{'pagi.connection'};
    my \$t = \$scope->{'pagi.transport'};
    my \$start = { type => 'http.response.start', status => 200,
                  headers => [['content-type', 'application/octet-stream']] };

    if (\$path eq '/ok') {
        await \$send->({ type => 'http.response.start', status => 200, headers => [['content-type','text/plain']] });
        await \$send->({ type => 'http.response.body', body => 'ok', more => 0 });
        return;
    }
    if (\$path eq '/marks') {
        await \$send->({ type => 'http.response.start', status => 200, headers => [['content-type','text/plain']] });
        await \$send->({ type => 'http.response.body',
            body => join(' ', \$t->high_water_mark, \$t->low_water_mark), more => 0 });
        return;
    }
    if (\$path eq '/gig') {
        # 1 GiB in 64 KiB chunks, each send awaited.
        \$c->on_disconnect(sub { rec('gig.disconnect', \$_[0] // 'undef') });
        \$c->on_complete(sub { rec('gig.disconnect', 'complete') });
        my \$chunk = 'x' x 65536;
        await \$send->(\$start);
        for my \$i (1 .. 16384) {
            await \$send->({ type => 'http.response.body', body => \$chunk, more => 1 });
            rec('gig.progress', \$i) if \$i % 64 == 0 && \$c->is_connected;
        }
        await \$send->({ type => 'http.response.body', body => '', more => 0 });
        rec('gig.progress', 'finished');
        return;
    }
    if (\$path eq '/big') {
        # One body send far larger than the kernel socket buffers can absorb.
        \$c->on_complete(sub { rec('big.send', 'complete', time, \$t->buffered_amount) });
        \$t->on_high_water(sub { rec('big.events', 'high', time, \$t->buffered_amount) });
        \$t->on_drain(sub { rec('big.events', 'drain', time, \$t->buffered_amount) });
        await \$send->(\$start);
        my \$t0 = time;
        my \$f = \$send->({ type => 'http.response.body', body => 'b' x (8 * \$MB), more => 1 });
        my \$buffered = \$t->buffered_amount;    # synchronously, before awaiting
        rec('big.send', 'issued', \$t0, \$buffered, \$f->is_ready ? 1 : 0);
        await \$f;
        rec('big.send', 'resolved', time, \$t->buffered_amount);
        await \$send->({ type => 'http.response.body', body => 'END', more => 0 });
        return;
    }
    if (\$path eq '/chunks') {
        # 1 MB chunks, each awaited: once the kernel and server buffers are
        # full, a send must stay pending until the client reads.
        \$c->on_complete(sub { rec('chunks.end', 'complete', time, \$t->buffered_amount) });
        \$t->on_high_water(sub { rec('chunks.events', 'high', time, \$t->buffered_amount) });
        \$t->on_drain(sub { rec('chunks.events', 'drain', time, \$t->buffered_amount) });
        await \$send->(\$start);
        my \$chunk = 'c' x \$MB;
        for my \$i (1 .. 12) {
            my \$t0 = time;
            my \$f = \$send->({ type => 'http.response.body', body => \$chunk, more => 1 });
            my \$buffered = \$t->buffered_amount;
            await \$f;
            rec('chunks.send', \$i, \$t0, time, \$buffered);
        }
        await \$send->({ type => 'http.response.body', body => 'END', more => 0 });
        return;
    }
    if (\$path eq '/fill') {
        # One send that exactly fills the empty buffer to the mark: it is
        # taken at once (it found room), and on_high_water fires during the
        # \$send call.  No send waits, yet on_drain hears the drain.
        \$t->on_high_water(sub { rec('fill.events', 'high', \$t->buffered_amount) });
        \$t->on_drain(sub { rec('fill.events', 'drain', \$t->buffered_amount) });
        await \$send->(\$start);
        my \$f = \$send->({ type => 'http.response.body', body => 'f' x 65536, more => 1 });
        rec('fill.send', \$f->is_ready ? 'ready' : 'pending');
        await \$f;
        for my \$try (1 .. 50) {
            last if grep { /^drain/ } do { open my \$in, '<', "\$dir/fill.events"; <\$in> };
            await Future::IO->sleep(0.02);
        }
        await \$send->({ type => 'http.response.body', body => 'END', more => 0 });
        return;
    }
    if (\$path eq '/late') {
        # Register on_high_water only once the queue is already above the mark.
        await \$send->(\$start);
        my \$chunk = 'l' x \$MB;
        my \$registered = 0;
        for my \$i (1 .. 12) {
            my \$f = \$send->({ type => 'http.response.body', body => \$chunk, more => 1 });
            if (!\$registered && !\$f->is_ready) {
                await Future::IO->sleep(0.15);
                my \$b = \$t->buffered_amount;
                if (!\$f->is_ready && \$b >= \$t->high_water_mark) {
                    my \$fired = 0;
                    \$t->on_high_water(sub { \$fired++ });
                    rec('late.reg', \$i, \$b, \$fired);    # fired must already be 1
                    \$registered = 1;
                }
            }
            await \$f;
        }
        rec('late.reg', 'never') unless \$registered;
        await \$send->({ type => 'http.response.body', body => 'END', more => 0 });
        return;
    }
    await \$send->({ type => 'http.response.start', status => 404, headers => [['content-type','text/plain']] });
    await \$send->({ type => 'http.response.body', body => 'not found', more => 0 });
};
\$app;
APP

# The lines the app recorded in $dir/$name; wait for one matching $re.
sub slurp_lines   { file_lines("$dir/$_[0]") }
sub wait_for_line { my ( $name, @wait ) = @_; wait_file_line( "$dir/$name", @wait ) }

# Read everything until the peer closes (or $timeout); returns the bytes.
sub read_all {
    my ( $sock, $timeout ) = @_;
    my $buf = '';
    my $sel = IO::Select->new($sock);
    my $deadline = time + $timeout;
    while ( time < $deadline ) {
        last unless $sel->can_read( $deadline - time );
        my $n = $sock->sysread( $buf, 1 << 20, length $buf );
        last unless $n;
    }
    return $buf;
}

my $server = start_server( '--write-high-watermark', 65536, '--no-access-log', $app );
my $port   = $server->port;
my $pid    = $server->pid;

my $warm = http_request( $port, 'GET', '/ok' );
is $warm->{status}, 200, 'warm-up request to /ok answers 200';

is http_request( $port, 'GET', '/marks' )->{body}, '65536 16384',
  'pagi.transport reports high_water_mark 65536 (--write-high-watermark) and the default low_water_mark 16384';

# ---------------------------------------------------------------------------
# (1) 1 GiB streamed to a slow reader: memory stays bounded.
{
    my $rss0 = vmrss_kb($pid);
    ok defined $rss0, "VmRSS of the server (pid $pid) is readable: ${\ ($rss0 // 'undef')} kB";
    my $sock = connect_port($port);
    $sock->syswrite("GET /gig HTTP/1.1\r\nHost: 127.0.0.1:$port\r\nConnection: close\r\n\r\n");
    my $sel      = IO::Select->new($sock);
    my $read     = 0;
    my $head     = '';
    my $max_rss  = $rss0 // 0;
    my $eof      = 0;
    my $t_start  = time;
    my $next_rss = 0;
    while ( time - $t_start < 10 ) {
        if ( $sel->can_read(1) ) {
            my $buf;
            my $n = $sock->sysread( $buf, 65536 );
            if ( !$n ) { $eof = 1; last }
            $head .= $buf if length $head < 200;
            $read += $n;
        }
        if ( time >= $next_rss ) {
            my $r = vmrss_kb($pid);
            $max_rss = $r if defined $r && $r > $max_rss;
            $next_rss = time + 0.2;
        }
        sleep 0.015;
    }
    my $r = vmrss_kb($pid);
    $max_rss = $r if defined $r && $r > $max_rss;
    my @progress = grep { /^\d+$/ } slurp_lines('gig.progress');
    my $app_sent = @progress ? $progress[-1] * 65536 : 0;

    like $head, qr{^HTTP/1\.1 200 }, '1 GiB stream: response starts with 200';
    ok !$eof, '1 GiB stream: the server did not close the connection during the slow read';
    cmp_ok $read, '>', 5 * 1024 * 1024, sprintf( '1 GiB stream: the slow client read real data (%.1f MB in ~10 s)', $read / 1048576 );
    cmp_ok $read, '<', 200 * 1024 * 1024, '1 GiB stream: the client really was slow (read < 200 MB)';
    my $growth_mb = ( $max_rss - ( $rss0 // 0 ) ) / 1024;
    cmp_ok $growth_mb, '<', 50,
      sprintf( '1 GiB stream: server RSS growth stays under 50 MB (before %d kB, peak %d kB, growth %.1f MB)',
        $rss0 // 0, $max_rss, $growth_mb );
    cmp_ok $app_sent - $read, '<', 32 * 1024 * 1024,
      sprintf( '1 GiB stream: the app is held back by the slow reader (app sent >= %.1f MB, client read %.1f MB)',
        $app_sent / 1048576, $read / 1048576 );

    close $sock;
    my $reason = wait_for_line( 'gig.disconnect', qr/./, 8 );
    is $reason, 'client_closed', '1 GiB stream: after the client closes, on_disconnect fires with client_closed';
    my $after = http_request( $port, 'GET', '/ok' );
    is "$after->{status} " . ( $after->{body} // '' ), '200 ok', '1 GiB stream: the server still answers another request';
    my @d = slurp_lines('gig.disconnect');
    is scalar(@d), 1, '1 GiB stream: exactly one terminal callback fired' or diag "got: @d";
}

# ---------------------------------------------------------------------------
# (2a) one body send much larger than the socket buffers, client not reading.
{
    my $sock = connect_port($port);
    $sock->syswrite("GET /big HTTP/1.1\r\nHost: 127.0.0.1:$port\r\nConnection: close\r\n\r\n");
    sleep 1.0;
    my $t_read = time;
    my $raw = read_all( $sock, 20 );
    my $res = parse_response($raw) // {};
    is $res->{status}, 200, 'big send: 200';
    is length( $res->{body} // '' ), 8 * 1048576 + 3, 'big send: the whole 8 MB + END arrived once the client read';

    my ($resolved) = map { [ split / / ] } grep { /^resolved / } slurp_lines('big.send');
    wait_for_line( 'big.send', qr/^complete /, 5 );
    my ($issued)   = map { [ split / / ] } grep { /^issued / } slurp_lines('big.send');
    my ($complete) = map { [ split / / ] } grep { /^complete / } slurp_lines('big.send');
    my @events = map { [ split / / ] } slurp_lines('big.events');
    ok $issued && $resolved, 'big send: the app recorded issuing and resolving its send';
    $issued   //= [ 'issued', 0, 0, 1 ];
    $resolved //= [ 'resolved', 0, 0 ];
    my $waited = $resolved->[1] - $issued->[1];
    cmp_ok $waited, '>=', 0.8,
      sprintf( 'big send: the 8 MB send to a non-reading client stayed pending until the client read (await took %.3f s)', $waited );
    cmp_ok $resolved->[1], '>=', $t_read - 0.05, 'big send: the send resolved only after the client started reading';
    cmp_ok $issued->[2], '>=', 1048576,
      "big send: buffered_amount read synchronously after \$send is >= 1 MB (got $issued->[2])";
    my @high = grep { $_->[0] eq 'high' } @events;
    my @drain = grep { $_->[0] eq 'drain' } @events;
    is scalar(@high), 1, 'big send: on_high_water fired exactly once';
    ok( ( grep { $_->[1] >= $t_read - 0.05 } @drain ), 'big send: on_drain fired after the client started reading' )
      or diag explain { t_read => $t_read, events => \@events };
    ok $complete, 'big send: on_complete fired';
    is $complete ? $complete->[2] : undef, 0, 'big send: buffered_amount is 0 at the end';
}

# ---------------------------------------------------------------------------
# (2b) a stream of 1 MB sends, client not reading for 1 s.
{
    my $sock = connect_port($port);
    $sock->syswrite("GET /chunks HTTP/1.1\r\nHost: 127.0.0.1:$port\r\nConnection: close\r\n\r\n");
    sleep 1.0;
    my $t_read = time;
    my $raw = read_all( $sock, 20 );
    my $res = parse_response($raw) // {};
    is $res->{status}, 200, '1 MB chunks: 200';
    is length( $res->{body} // '' ), 12 * 1048576 + 3, '1 MB chunks: all 12 MB + END arrived';
    wait_for_line( 'chunks.end', qr/^complete /, 5 );

    my @sends  = map { [ split / / ] } slurp_lines('chunks.send');    # i t0 t1 buffered
    my @events = map { [ split / / ] } slurp_lines('chunks.events');  # kind time buffered
    is scalar(@sends), 12, '1 MB chunks: the app recorded all 12 sends';
    my ($blocked) = sort { ( $b->[2] - $b->[1] ) <=> ( $a->[2] - $a->[1] ) } @sends;
    $blocked //= [ 0, 0, 0, 0 ];
    my $waited = $blocked->[2] - $blocked->[1];
    cmp_ok $waited, '>=', 0.8,
      sprintf( '1 MB chunks: a send stayed pending while the client was not reading (longest await %.3f s, chunk %d)',
        $waited, $blocked->[0] );
    cmp_ok $blocked->[2], '>=', $t_read - 0.05, '1 MB chunks: that send resolved only after the client started reading';
    # Whatever the kernel's socket buffer still absorbed counts as written, so
    # only the part above it is queued; it must be at the high-water mark.
    cmp_ok $blocked->[3], '>=', 65536,
      "1 MB chunks: buffered_amount right after issuing the blocked send is at least the high-water mark (got $blocked->[3])";
    my @high_during = grep { $_->[0] eq 'high' && $_->[1] >= $blocked->[1] && $_->[1] <= $blocked->[2] } @events;
    is scalar(@high_during), 1, '1 MB chunks: on_high_water fired exactly once for the blocked send'
      or diag explain { blocked => $blocked, sends => \@sends, events => \@events };
    ok( ( grep { $_->[0] eq 'drain' && $_->[1] >= $t_read - 0.05 } @events ),
        '1 MB chunks: on_drain fired after the client read' );
    my $seq = join '', map { $_->[0] eq 'high' ? 'H' : 'D' } @events;
    like $seq, qr/^(?:HD)+H?\z/, "1 MB chunks: high/drain callbacks are edge-triggered and alternate (got $seq)";
    ok( ( grep { $_->[0] eq 'drain' && $_->[2] < 16384 } @events ) == ( grep { $_->[0] eq 'drain' } @events ),
        '1 MB chunks: every on_drain saw buffered_amount below the low-water mark' )
      or diag explain \@events;
    my ($end) = map { [ split / / ] } grep { /^complete / } slurp_lines('chunks.end');
    is $end ? $end->[2] : undef, 0, '1 MB chunks: buffered_amount is 0 at the end';
}

# ---------------------------------------------------------------------------
# (3) on_high_water registered while already above the mark fires at once.
{
    my $sock = connect_port($port);
    $sock->syswrite("GET /late HTTP/1.1\r\nHost: 127.0.0.1:$port\r\nConnection: close\r\n\r\n");
    my $line = wait_for_line( 'late.reg', qr/./, 5 );
    my $raw = read_all( $sock, 20 );
    my $res = parse_response($raw) // {};
    is $res->{status}, 200, 'late on_high_water: 200';
    isnt $line, 'never', 'late on_high_water: the app found the queue above the high-water mark';
    my ( $i, $buffered, $fired ) = split / /, $line // '';
    cmp_ok $buffered // 0, '>=', 65536, "late on_high_water: buffered_amount was above the mark at registration ($buffered)";
    is $fired, 1, 'late on_high_water: the callback fired immediately (synchronously) on registration';
}

# ---------------------------------------------------------------------------
# (4) a send that finds room is taken at once, even when it fills the buffer
# to the mark (as in the reference server, which checks before queueing);
# on_drain hears the drain though no send waited for it.
{
    my $sock = connect_port($port);
    $sock->syswrite("GET /fill HTTP/1.1\r\nHost: 127.0.0.1:$port\r\nConnection: close\r\n\r\n");
    my $raw = read_all( $sock, 10 );
    my $res = parse_response($raw) // {};
    is length( $res->{body} // '' ), 65536 + 3, 'filling send: the body arrived';
    is_deeply [ slurp_lines('fill.send') ], ['ready'], 'filling send: the send that brought the empty buffer to the mark resolved at once';
    my @events = slurp_lines('fill.events');
    like $events[0] // '', qr/^high 65536$/, 'filling send: on_high_water fired during the send, at the mark';
    like $events[1] // '', qr/^drain \d+$/, 'filling send: on_drain fired once the buffer drained, with no send waiting'
      or diag explain \@events;
}

ok $server->is_running, 'server still running after the backpressure tests';
is $server->stop('TERM'), 0, 'server exits 0 on SIGTERM';

# ---------------------------------------------------------------------------
# Configured water marks are what pagi.transport reports.
{
    my $s2 = start_server( '--write-high-watermark', 100000, '--write-low-watermark', 20000, '--no-access-log', $app );
    my $res = http_request( $s2->port, 'GET', '/marks' );
    is $res->{body}, '100000 20000',
      'high_water_mark/low_water_mark return --write-high-watermark 100000 / --write-low-watermark 20000';
    is $s2->stop('TERM'), 0, 'second server exits 0';
}

done_testing;
