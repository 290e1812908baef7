use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;

# The interpreter thread keeps the memory its app frees (src/interp/malloc.rs):
# 64 KiB strings made and freed, as request bodies are, do not cost a page
# fault each time.  Left at glibc's defaults, freeing half a MiB at the top
# of the thread's heap hands it back to the kernel, and the next strings
# fault it in again, page by page.  The app counts its own thread's minor
# faults (/proc/thread-self/stat) around such a loop.

plan skip_all => 'needs /proc/thread-self' unless -r '/proc/thread-self/stat';

my $app = write_app( <<'PERL', 'allocator_app.pl' );
use strict; use warnings; use Future::AsyncAwait;
sub minor_faults {
    open my $f, '<', '/proc/thread-self/stat' or die "stat: $!";
    my $s = <$f>;
    return ( split ' ', substr( $s, rindex( $s, ')' ) + 2 ) )[7];
}
async sub {
    my ($scope, $receive, $send) = @_;
    return if $scope->{type} eq 'lifespan';
    my $before = minor_faults();
    for ( 1 .. 50 ) {
        my @bodies = map { 'x' x ( 64 * 1024 ) } 1 .. 8;
    }
    my $faults = minor_faults() - $before;
    await $send->({ type => 'http.response.start', status => 200,
        headers => [ [ 'content-type', 'text/plain' ] ] });
    await $send->({ type => 'http.response.body', body => "$faults" });
};
PERL

# The first request may fault the heap in; the third shows the steady state.
sub steady_faults {
    my ($s) = @_;
    my $r;
    $r = http_request( $s->port, 'GET', '/' ) for 1 .. 3;
    is $r->{status}, 200, 'the app answered';
    return $r->{body};
}

{
    local $ENV{GLIBC_TUNABLES};
    delete $ENV{$_} for qw(MALLOC_TRIM_THRESHOLD_ MALLOC_MMAP_THRESHOLD_);
    my $s = start_server( '--no-access-log', $app );
    my $faults = steady_faults($s);
    cmp_ok $faults, '<', 100, "400 strings of 64 KiB made and freed: $faults page faults";
    $s->stop;
}

{
    # A limit the user sets is theirs: glibc's own trim threshold brings
    # the faults back (and shows this test can see them).
    local $ENV{GLIBC_TUNABLES} = 'glibc.malloc.trim_threshold=131072';
    my $s = start_server( '--no-access-log', $app );
    my $faults = steady_faults($s);
    cmp_ok $faults, '>', 1000, "with the user's GLIBC_TUNABLES trim threshold: $faults page faults";
    $s->stop;
}

# mimalloc, the network's allocator, asks for transparent huge pages only
# when built to (Cargo.toml gives it `no_thp`): with them the server's heap
# grew in 2 MiB pages, 6 MiB of them before the first request, and an idle
# connection cost 38 KiB of RSS instead of 24 (bench/bin/conn-memory).
# Where the system leaves huge pages to each process's madvise (Debian's
# default), none may appear, whatever the load.
SKIP: {
    my $thp = eval { slurp('/sys/kernel/mm/transparent_hugepage/enabled') } // '';
    skip 'transparent huge pages are not left to madvise on this system', 2 unless $thp =~ /\[madvise\]/;
    skip 'needs /proc/PID/smaps_rollup', 2 unless -r '/proc/self/smaps_rollup';
    my $hello = write_app( <<'PERL', 'allocator_hello.pl' );
use strict; use warnings; use Future::AsyncAwait;
async sub {
    my ($scope, $receive, $send) = @_;
    return if $scope->{type} eq 'lifespan';
    await $send->({ type => 'http.response.start', status => 200,
        headers => [ [ 'content-type', 'text/plain' ] ] });
    await $send->({ type => 'http.response.body', body => 'hello' });
};
PERL
    my $s = start_server( '--no-access-log', $hello );
    my ( @idle, $answered );
    for ( 1 .. 200 ) {
        my $c = connect_port( $s->port );
        print {$c} "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        my $got = '';
        while ( index( $got, 'hello' ) < 0 ) {
            last unless sysread( $c, $got, 4096, length $got );
        }
        $answered++ if index( $got, 'hello' ) >= 0;
        push @idle, $c;
    }
    is $answered, 200, '200 keep-alive connections answered and held';
    my ($huge) = slurp( '/proc/' . $s->pid . '/smaps_rollup' ) =~ /^AnonHugePages:\s+(\d+)/m;
    is $huge, 0, 'none of the server\'s memory is in transparent huge pages';
    close $_ for @idle;
    $s->stop;
}

done_testing;
