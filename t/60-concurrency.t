use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;
use IO::Socket::INET;
use IO::Select;
use JSON::PP;
use Time::HiRes qw(time sleep);

# Concurrency: requests awaiting timers overlap, a long request never stalls
# short ones, IO::Async::Loop->new is the running loop, pipelining is ordered.

my $app = write_app( <<'PERL', 'concurrency_app.pl' );
use strict; use warnings; use Future::AsyncAwait; use Future::IO; use IO::Async::Loop; use JSON::PP ();
use Scalar::Util qw(refaddr); use Time::HiRes ();
my $app = async sub {
    my ($scope, $receive, $send) = @_;
    return if $scope->{type} eq 'lifespan';
    my $path = $scope->{path};
    my $body;
    if ($path =~ m{\A/sleep/([\d.]+)\z}) {
        my $t0 = Time::HiRes::time();
        await Future::IO->sleep($1);
        $body = sprintf "slept %s %.3f", $1, Time::HiRes::time() - $t0;
    }
    elsif ($path eq '/loop') {
        my $l1 = IO::Async::Loop->new;
        my $l2 = IO::Async::Loop->new;
        my $t0 = Time::HiRes::time();
        await $l1->delay_future(after => 0.2);
        $body = JSON::PP->new->canonical->encode({
            same    => refaddr($l1) == refaddr($l2) ? 1 : 0,
            class   => ref $l1,
            waited  => Time::HiRes::time() - $t0,
        });
    }
    elsif ($path =~ m{\A/pipe/(\w+)\z}) {
        my $name = $1;
        await Future::IO->sleep(0.3) if $name eq 'first';
        $body = "pipe:$name";
    }
    else {
        $body = "quick:$path";
    }
    await $send->({type => 'http.response.start', status => 200,
        headers => [['content-type', 'text/plain'], ['content-length', length $body]]});
    await $send->({type => 'http.response.body', body => $body, more => 0});
};
$app;
PERL

my $s = start_server($app);
my $port = $s->port;

sub connect_one {
    return IO::Socket::INET->new( PeerAddr => '127.0.0.1', PeerPort => $port, Proto => 'tcp', Timeout => 5 );
}

# Read every socket until each closes (Connection: close) or $timeout.
sub read_all {
    my ( $socks, $timeout ) = @_;
    my %buf  = map { $_ => '' } 0 .. $#$socks;
    my %done_at;
    my %idx  = map { ( fileno( $socks->[$_] ) => $_ ) } 0 .. $#$socks;
    my $sel  = IO::Select->new(@$socks);
    my $deadline = time + $timeout;
    while ( $sel->count && time < $deadline ) {
        for my $fh ( $sel->can_read( $deadline - time ) ) {
            my $i = $idx{ fileno $fh };
            my $n = sysread( $fh, $buf{$i}, 65536, length $buf{$i} );
            if ( !$n ) {
                $done_at{$i} = time;
                $sel->remove($fh);
            }
        }
    }
    return ( [ map { $buf{$_} } 0 .. $#$socks ], [ map { $done_at{$_} } 0 .. $#$socks ] );
}

# 100 requests at once, each sleeping $sleep seconds: (seconds taken, how
# many answered 200 after their sleep).
sub hundred_sleeping {
    my ($sleep) = @_;
    my $t0 = time;
    my @socks;
    for ( 1 .. 100 ) {
        my $c = connect_one() or last;
        push @socks, $c;
    }
    $socks[$_]->syswrite("GET /sleep/$sleep HTTP/1.1\r\nHost: h\r\nX-N: $_\r\nConnection: close\r\n\r\n") for 0 .. $#socks;
    my ($bufs) = read_all( \@socks, 15 );
    my $took = time - $t0;
    my @res = map { parse_response($_) // {} } @$bufs;
    my $ok = grep { ( $_->{status} // 0 ) == 200 && ( $_->{body} // '' ) =~ /\Aslept \Q$sleep\E / } @res;
    return ( $took, $ok );
}

# The absolute times depend on how busy the machine is; what proves overlap
# is the time beyond the same work without the sleep, measured just before:
# requests that overlap add about one sleep, in turn they would add 100.
subtest '100 concurrent requests sleeping 1 s take about 1 s more than without the sleep' => sub {
    my ( $baseline, $ok0 ) = hundred_sleeping(0);
    is $ok0, 100, sprintf( 'baseline: 100 requests that do not sleep (%.2f s)', $baseline );
    my ( $took, $ok ) = hundred_sleeping(1);
    is $ok, 100, 'all 100 answered 200 after sleeping';
    my $extra = $took - $baseline;
    ok $extra < 2.5, sprintf( '%.2f s beyond the baseline (< 2.5 s: they overlapped; in turn, 100 s)', $extra );
    ok $took >= 0.95, sprintf( 'and at least the 1 s sleep (%.2f s)', $took );
};

# 20 short requests at once: (seconds taken, how many answered correctly).
sub twenty_short {
    my $t0 = time;
    my @socks = map { connect_one() } 1 .. 20;
    $socks[$_]->syswrite("GET /short/$_ HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n") for 0 .. $#socks;
    my ( $bufs, $done ) = read_all( \@socks, 8 );
    my $took = time - $t0;
    my $ok = 0;
    for my $i ( 0 .. $#socks ) {
        my $r = parse_response( $bufs->[$i] ) // {};
        $ok++ if ( $r->{status} // 0 ) == 200 && ( $r->{body} // '' ) eq "quick:/short/$i";
    }
    return ( $took, $ok );
}

subtest 'a long request does not stall short ones' => sub {
    # The same 20 requests with nothing else in flight, just before.
    my ( $baseline, $ok0 ) = twenty_short();
    is $ok0, 20, sprintf( 'baseline: 20 short requests alone (%.2f s)', $baseline );
    my $long = connect_one() or return fail('connect');
    my $t_long = time;
    $long->syswrite("GET /sleep/3 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n");
    sleep 0.1;    # the long one is in flight
    my ( $took, $ok ) = twenty_short();
    is $ok, 20, '20 short requests answered correctly';
    # Stalled behind the long request they would take its remaining ~2.9 s.
    ok $took - $baseline < 1.5,
      sprintf( 'all 20 done in %.2f s while the 3 s request sleeps, %.2f s beyond the baseline (< 1.5 s)',
        $took, $took - $baseline );

    my ( $lb, $ld ) = read_all( [$long], 6 );
    my $lr = parse_response( $lb->[0] ) // {};
    is $lr->{status}, 200, 'the long request completes too';
    like $lr->{body} // '', qr/\Aslept 3 /, 'after its sleep';
    ok defined $ld->[0] && $ld->[0] - $t_long >= 2.9, 'and only after ~3 s';
};

subtest 'IO::Async::Loop->new inside the app is the running loop' => sub {
    my $t0 = time;
    my $res = http_request( $port, 'GET', '/loop', timeout => 5 );
    is $res->{status}, 200, 'delay_future on IO::Async::Loop->new resolved';
    my $d = eval { decode_json( $res->{body} ) } // {};
    is $d->{same}, 1, 'IO::Async::Loop->new returns the same loop every time';
    ok defined $d->{waited} && $d->{waited} >= 0.19, 'delay_future(after => 0.2) really waited';
    ok time - $t0 < 3, 'and did not hang';
};

subtest 'pipelined requests are answered in order' => sub {
    my $c = connect_one() or return fail('connect');
    $c->syswrite( "GET /pipe/first HTTP/1.1\r\nHost: h\r\n\r\n" . "GET /pipe/second HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n" );
    my ($bufs) = read_all( [$c], 5 );
    my $raw = $bufs->[0];
    my $r1 = parse_response($raw) // {};
    is $r1->{status}, 200, 'first response 200';
    is $r1->{body}, 'pipe:first', 'first response is for the first (slower) request';
    my $r2 = parse_response( $r1->{rest} // '' ) // {};
    is $r2->{status}, 200, 'second response 200';
    is $r2->{body}, 'pipe:second', 'second response is for the second request';
};

is $s->stop('TERM'), 0, 'server exits 0';
done_testing;
