# A `file` body whose bytes are in the page cache is read on the network
# thread as it is sent; one that must come from the disk is read on the
# blocking pool, so that a slow disk never stalls the other connections.
# Either way the client gets exactly the file's bytes, with offsets and
# lengths across chunk boundaries.
use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;
use File::Temp qw(tempdir);
use IO::Socket::INET;

my $dir  = tempdir( CLEANUP => 1 );
my $file = "$dir/data.bin";
my $size = 3 * 1024 * 1024 + 12345;    # several 64 KiB chunks and a short one
my $content = join '', map { pack 'N', $_ * 2654435761 % 4294967296 } 0 .. $size / 4;
$content = substr $content, 0, $size;
open my $fh, '>:raw', $file or die;
print $fh $content;
close $fh;
# Written out, so that no page of it is still under writeback (a read of
# such a page may wait, and so goes to the pool).
system( 'sync', $file ) == 0 or die "sync: $?";

my $app = write_app(<<"APP");
use strict; use warnings; use Future::AsyncAwait;
my \$app = async sub {
    my (\$scope, \$receive, \$send) = \@_;
    return if \$scope->{type} eq 'lifespan';
    my (\$offset, \$length) = (\$scope->{query_string} // '') =~ /offset=(\\d+)&length=(\\d+)/;
    my \$size = \$length // -s '$file';
    await \$send->({ type => 'http.response.start', status => 200,
        headers => [ [ 'content-type', 'application/octet-stream' ], [ 'content-length', \$size ] ] });
    await \$send->({ type => 'http.response.body', file => '$file',
        defined \$offset ? ( offset => \$offset, length => \$length ) : () });
};
\$app;
APP

# Threads of the network runtime: its workers, and the blocking pool's
# threads once it has been used (tokio names both tokio-runtime-worker).
sub runtime_threads {
    my ($pid) = @_;
    my $n = 0;
    for my $comm ( glob "/proc/$pid/task/*/comm" ) {
        open my $c, '<', $comm or next;
        $n++ if <$c> =~ /^tokio-rt/;
    }
    return $n;
}

# Requests for the cached file, whole, by offset and length across chunk
# boundaries, and several at once, each from its own connection.
sub serve_cached {
    my ( $port, $attempt ) = @_;
    for my $i ( 1 .. 5 ) {
        my $res = http_request( $port, 'GET', '/' );
        is $res->{status}, 200, "attempt $attempt, cached file $i: 200";
        ok $res->{body} eq $content, "attempt $attempt, cached file $i: exactly the file's bytes"
          or diag length( $res->{body} ) . " bytes";
    }
    for my $case ( [ 100, 200_000 ], [ 65_535, 65_538 ], [ $size - 10, 10 ], [ 0, 0 ] ) {
        my ( $offset, $length ) = @$case;
        my $res = http_request( $port, 'GET', "/?offset=$offset&length=$length" );
        ok $res->{body} eq substr( $content, $offset, $length ),
          "attempt $attempt, cached, offset $offset length $length";
    }
    my @socks = map {
        my $s = IO::Socket::INET->new( PeerAddr => '127.0.0.1', PeerPort => $port ) or die "connect: $!";
        print $s "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        $s;
    } 1 .. 8;
    my $whole = 0;
    for my $s (@socks) {
        local $/;
        my $raw = <$s>;
        my ( undef, $body ) = split /\r\n\r\n/, $raw, 2;
        $whole++ if defined $body && $body eq $content;
    }
    is $whole, 8, "attempt $attempt: eight concurrent responses, each the whole file";
}

# The file was just written: its pages are cached, and no read of them
# should need the blocking pool.  The kernel may still refuse a read that
# must not wait (RWF_NOWAIT) now and then for a page that is cached, or
# drop a page under memory pressure from other work on the machine; the
# server then rightly reads on the pool, whose thread stays for seconds.
# So each attempt is a fresh server, after reading the file through once
# (any page that went is back), and one attempt in three must be
# pool-free: a server that used the pool for cached bytes fails all three.
my ( $server, $port, $pid, $before, @pooled );
for my $attempt ( 1 .. 3 ) {
    open my $warm, '<:raw', $file or die "$file: $!";
    1 while read $warm, my $buf, 1 << 20;
    close $warm;
    $server = start_server($app);
    $port   = $server->port;
    $pid    = $server->{pid};
    $before = runtime_threads($pid);
    ok $before >= 1, "attempt $attempt: the runtime's worker threads ($before)";
    serve_cached( $port, $attempt );
    my $after = runtime_threads($pid);
    last if $after == $before;
    push @pooled, "attempt $attempt: $before threads before, $after after";
    last if $attempt == 3;
    is $server->stop('TERM'), 0, "attempt $attempt: clean exit";
}
ok @pooled < 3, 'cached bytes were read without the blocking pool' or diag join "\n", @pooled;
diag "the pool was used for cached bytes: @pooled" if @pooled && @pooled < 3;
# The part below needs a server whose pool has not started.
$before = runtime_threads($pid);

SKIP: {
    skip 'fincore (util-linux-extra) is not installed', 4 unless grep { -x "$_/fincore" } split /:/, $ENV{PATH};
    # Drop the file's pages (clean, since written out), check they went,
    # and ask for the file.  A read that cannot wait still starts the
    # kernel's readahead, and on a disk fast enough (a VM's, backed by its
    # host's cache) every page may be in by the time it is looked at, so
    # that nothing needs the pool: up to five tries, each from a cold cache.
    my ( $served, $exact, $pooled, @tries ) = ( 0, 0, 0 );
    for my $try ( 1 .. 5 ) {
        system( 'dd', "if=$file", 'iflag=nocache', 'count=0', 'status=none' ) == 0 or die "dd: $?";
        my ($resident) = `fincore --bytes --noheadings --output RES '$file'` =~ /(\d+)/;
        skip "this filesystem keeps the file's pages cached ($resident bytes)", 4
          if !defined $resident || $resident > $size / 2;
        my $res = http_request( $port, 'GET', '/' );
        $served++ if $res->{status} == 200;
        $exact++  if $res->{body} eq $content;
        my $threads = runtime_threads($pid);
        push @tries, "$resident bytes resident, $threads threads";
        if ( $threads > $before ) { $pooled = 1; last }
    }
    is $served, scalar @tries, 'uncached file: 200';
    is $exact,  scalar @tries, "uncached file: exactly the file's bytes";
    ok $pooled, 'bytes not in the page cache were read on the blocking pool' or diag join "\n", @tries;
    my $res = http_request( $port, 'GET', '/?offset=70000&length=300000' );
    ok $res->{body} eq substr( $content, 70_000, 300_000 ), 'and again by offset and length, now cached';
}

is $server->stop('TERM'), 0, 'clean exit';
done_testing;
