use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;
use Time::HiRes qw(sleep time);
use IO::Select;

# Response bodies of 16 KiB and more are lent to the network without a copy
# (src/interp/c/lend.c, src/interp/lent.rs): the network reads the app's
# own string buffer, shared copy-on-write, and gives it back to the
# interpreter to free.  What the client gets must not change whatever the
# app does with its string after the send, however many sends share one
# buffer; and the lent strings must be freed, also when the server goes
# idle right after a large response.
#
# `make asan-test` runs this file too (PAGI_RS_SANITIZED set): there the
# loans' frees are checked by AddressSanitizer, and RSS, which its
# quarantine of freed memory inflates, is not compared.
my $sanitized = $ENV{PAGI_RS_SANITIZED};

my $app = write_app( <<'PERL', 'lent_bodies_app.pl' );
use strict; use warnings; use Future::AsyncAwait;
my $text = [ [ 'content-type', 'application/octet-stream' ] ];
my $chunk = join '', map { chr( 97 + $_ % 26 ) x 1024 } 0 .. 19;    # 20 KiB
my %h;
# The app changes its string in every way Perl writes in place, at once
# after each send, while the network may still be reading it.
$h{'/mutate'} = async sub {
    my ($send) = @_;
    await $send->({ type => 'http.response.start', status => 200, headers => $text });
    my $buf = 'a' x 100_000;
    my $f1 = $send->({ type => 'http.response.body', body => $buf, more => 1 });
    substr( $buf, 0, 5, 'ZZZZZ' );
    vec( $buf, 10, 8 ) = 90;
    $buf =~ tr/a/b/;
    $buf .= 'tail';
    my $buf2 = 'c' x 50_000;
    my $f2 = $send->({ type => 'http.response.body', body => $buf2, more => 1 });
    open my $fh, '<', \( 'd' x 50_000 ) or die;
    read $fh, $buf2, 50_000;    # into the same scalar
    undef $buf2;
    await Future->needs_all( $f1, $f2 );
    await $send->({ type => 'http.response.body', body => 'END', more => 0 });
};
# Sends without awaiting, all taken at once (the server runs with a large
# --write-high-watermark): more loans of one buffer than Perl's
# copy-on-write count can hold (255), so later ones are copies.
$h{'/many'} = async sub {
    my ($send) = @_;
    await $send->({ type => 'http.response.start', status => 200, headers => $text });
    my @f = map { $send->({ type => 'http.response.body', body => $chunk, more => 1 }) } 1 .. 300;
    await Future->needs_all(@f);
    await $send->({ type => 'http.response.body', body => '', more => 0 });
};
# A fresh 64 KiB string for every send: loans never given back would add up.
$h{'/unique'} = async sub {
    my ($send, $n) = @_;
    await $send->({ type => 'http.response.start', status => 200, headers => $text });
    for my $i ( 1 .. $n ) {
        my $s = sprintf( '%08d', $i ) x 8192;
        await $send->({ type => 'http.response.body', body => $s, more => 1 });
    }
    await $send->({ type => 'http.response.body', body => '', more => 0 });
};
# One 48 MiB string, gone from the app as soon as it is sent; nothing
# happens on the server after this response.
$h{'/big'} = async sub {
    my ($send) = @_;
    await $send->({ type => 'http.response.start', status => 200, headers => $text });
    my $big = 'x';
    $big x= 48 << 20;
    my $f = $send->({ type => 'http.response.body', body => $big, more => 0 });
    undef $big;
    await $f;
};
async sub {
    my ( $scope, $receive, $send ) = @_;
    return if $scope->{type} eq 'lifespan';
    my ($n) = ( $scope->{query_string} // '' ) =~ /n=(\d+)/;
    my $h = $h{ $scope->{path} } or die "no route $scope->{path}";
    await $h->( $send, $n );
};
PERL

sub get_body {
    my ( $s, $path ) = @_;
    my $r = parse_response(
        raw_request( $s->port, "GET $path HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", timeout => 30 ) );
    return $r && $r->{status} == 200 ? $r->{body} : undef;
}

# The size of a large body, read by curl: Perl reading hundreds of MB into
# one string would take minutes.
sub body_size {
    my ( $s, $path ) = @_;
    my $out = `curl -sS -o /dev/null -w '%{http_code} %{size_download}' 'http://127.0.0.1:${\ $s->port}$path' 2>&1`;
    return $out =~ /^200 (\d+)$/ ? $1 : "failed: $out";
}

# Read a large chunked response on a connection left open afterwards (so
# that its end brings the server no other event); returns the socket and
# the raw bytes read, counted, not kept.  A pause before the last $hold
# bytes leaves the network holding the end of the body while the app is
# done with it.
sub fetch_keep_open {
    my ( $s, $path, $size, $hold ) = @_;
    my $sock = connect_port( $s->port );
    $sock->syswrite("GET $path HTTP/1.1\r\nHost: x\r\n\r\n");
    my ( $total, $tail, $buf ) = ( 0, '' );
    my $sel = IO::Select->new($sock);
    my $deadline = time + 60;
    while ( time < $deadline && $sel->can_read( $deadline - time ) ) {
        my $n = sysread( $sock, $buf, 1 << 20 ) or last;
        sleep 1 if $total < $size - $hold && $total + $n >= $size - $hold;
        $total += $n;
        $tail = substr( $tail . $buf, -16 );
        last if $tail =~ /\r\n0\r\n\r\n\z/;
    }
    return ( $sock, $total );
}

sub rss_kb {
    my ($pid) = @_;
    open my $fh, '<', "/proc/$pid/status" or return 0;
    while (<$fh>) { return $1 if /^VmRSS:\s+(\d+)/ }
    return 0;
}

subtest 'the app changing its string after the send does not change what is sent' => sub {
    my $s = start_server( '--no-access-log', $app );
    for my $round ( 1 .. 3 ) {
        my $body = get_body( $s, '/mutate' );
        ok defined $body && $body eq ( 'a' x 100_000 ) . ( 'c' x 50_000 ) . 'END', "round $round: the bytes as sent"
          or diag 'got ' . length( $body // '' ) . ' bytes, first difference at '
          . ( ( ( $body // '' ) ^ ( ( 'a' x 100_000 ) . ( 'c' x 50_000 ) . 'END' ) ) =~ /^(\0*)/ ? length $1 : '?' );
    }
    $s->stop;
};

subtest 'more loans of one string than copy-on-write can count' => sub {
    my $s = start_server( '--no-access-log', '--write-high-watermark', 64 << 20, $app );
    my $chunk = join '', map { chr( 97 + $_ % 26 ) x 1024 } 0 .. 19;
    my $body  = get_body( $s, '/many' );
    is length( $body // '' ), 300 * length $chunk, 'every send arrived';
    ok defined $body && $body eq $chunk x 300, 'each one whole and in order';
    $s->stop;
};

subtest 'lent strings are freed' => sub {
    my $s   = start_server( '--no-access-log', $app );
    my $pid = $s->{pid};
    body_size( $s, '/unique?n=50' );    # warm up
    my $before = rss_kb($pid);
    is body_size( $s, '/unique?n=3000' ), 3000 * 65536, 'the whole response: 192 MB of distinct strings';
    my $grew = rss_kb($pid) - $before;
  SKIP: {
        skip "RSS under $sanitized sanitizer: its quarantine keeps freed memory", 1 if $sanitized;
        cmp_ok $grew, '<', 64 * 1024, "RSS grew by $grew kB over 192 MB sent: the loans were freed";
    }

    # The server is idle after this one, its connection open and quiet:
    # what the network gives back must still be freed, with no further
    # request to drive the interpreter (lent.rs's tests check the wake-up
    # that makes sure of it).
    my $idle = rss_kb($pid);
    my ( $sock, $read ) = fetch_keep_open( $s, '/big', 48 << 20, 8 << 20 );
    cmp_ok $read, '>', 48 << 20, 'the 48 MiB response, to its last chunk';
  SKIP: {
        skip "RSS under $sanitized sanitizer: its quarantine keeps freed memory", 1 if $sanitized;
        my ( $rss, $deadline ) = ( 0, time + 5 );
        while ( time < $deadline ) {
            $rss = rss_kb($pid);
            last if $rss - $idle < 24 * 1024;
            sleep 0.1;
        }
        cmp_ok $rss - $idle, '<', 24 * 1024, 'the idle server freed the 48 MiB string (RSS back within 24 MiB)';
    }
    $s->stop;
};

done_testing;
