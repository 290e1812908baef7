package PagiRS::Deps;

# The Debian packages pagi-rs needs, in two sets, and the check that
# installs the missing ones (as root) or prints the apt-get line (as anyone
# else).  Makefile.PL ensures the run-time set; `make test-deps` (which
# `make test` and the benchmark targets depend on) ensures the test set, so
# that `perl Makefile.PL && make run` never installs a browser.

use strict;
use warnings;

# To build and run pagi-rs:
# libperl-dev: headers and libperl.so that the Rust binary embeds.
# gcc, make:   build.rs compiles the C glue; make runs the Makefile.
# libfuture-perl, libfuture-asyncawait-perl, libio-async-perl,
# libfuture-io-perl: the Perl half of the bridge (and every PAGI app) uses
#              Future, Future::AsyncAwait, IO::Async and Future::IO.
our @RUN = qw(
    libperl-dev gcc make
    libfuture-perl libfuture-asyncawait-perl libio-async-perl libfuture-io-perl
);

# Only for `make test` and the benchmarks:
# curl, wrk, nghttp2-client: HTTP clients of the tests and benchmarks
#              (nghttp2-client has h2load and nghttp).
# libprotocol-websocket-perl, libhttp-tiny-perl: WebSocket and HTTP
#              clients of the Perl tests.
# python3-h2, python3-hyperframe: the frame-level HTTP/2 test client
#              (t/lib/h2client.py, used through t/lib/PagiRS/H2.pm).
# openssl:     throw-away certificates for the TLS tests and benchmarks.
# libio-socket-ssl-perl: t/91-tls.t talks TLS with IO::Socket::SSL.
# chromium, chromium-driver: headless browser for t/90-browser.t.
# nginx-light: the reverse proxy in front of pagi-rs in the nginx test.
# util-linux-extra: fincore, which t/45-file-cache.t uses to see that a
#              file left the page cache.
# libio-async-loop-epoll-perl: IO::Async's preferred loop on Linux, found on
#              many servers; the tests run where it is installed, and
#              t/64-event-loop.t runs apps on it (IO_ASYNC_LOOP=Epoll).
our @TEST = qw(
    curl wrk nghttp2-client
    libprotocol-websocket-perl libhttp-tiny-perl
    python3-h2 python3-hyperframe openssl libio-socket-ssl-perl
    chromium chromium-driver
    nginx-light util-linux-extra libio-async-loop-epoll-perl
);

# Only for the charts of `make bench` and `make bench-all` (bench/bin/charts):
# gnuplot-nox: draws the SVG charts into bench/results/.
our @BENCH = qw(gnuplot-nox);

# Only for `make flamegraphs` (bench/bin/flamegraphs) and `make instructions`
# (bench/bin/instructions):
# linux-perf: samples the server's threads with their call stacks;
# valgrind:   callgrind counts the instructions each thread executes.
our @PROFILE = qw(linux-perf valgrind);

# HTTP::Tiny is part of core perl; its package is only needed on a perl
# without it.
@TEST = grep { $_ ne 'libhttp-tiny-perl' } @TEST
  if eval { require HTTP::Tiny; 1 };

sub on_path {
    my ($prog) = @_;
    for my $dir ( split /:/, $ENV{PATH} // '' ) {
        return "$dir/$prog" if length $dir && -x "$dir/$prog";
    }
    return;
}

sub installed {
    my ($pkg) = @_;
    # Package names are the constants above, so the shell is safe here; it
    # silences dpkg-query's complaint about packages it has never seen.
    my $status = `dpkg-query -W -f='\${Status}' $pkg 2>/dev/null` // '';
    return $status =~ /install ok installed/;
}

# Make sure @packages are installed: as root, apt-get installs the missing
# ones; otherwise print the line to run and exit 1.  $what names the set in
# messages ("run-time", "test").
sub ensure {
    my ( $what, @packages ) = @_;
    if ( !on_path('dpkg-query') ) {
        warn "Not a Debian-based system: make sure these $what packages "
          . "(or their equivalents) are installed: @packages\n";
        return;
    }
    my @missing = grep { !installed($_) } @packages or return;
    if ( $> != 0 ) {
        print "Missing Debian packages ($what). Install them with:\n\n"
          . "    sudo apt-get install -y @missing\n\n"
          . "then run this again.\n";
        exit 1;
    }
    print "Installing missing $what packages: @missing\n";
    system( 'apt-get', 'update' ) == 0 or die "apt-get update failed\n";
    local $ENV{DEBIAN_FRONTEND} = 'noninteractive';
    system( 'apt-get', 'install', '-y', @missing ) == 0
      or die "apt-get install failed\n";
    my @still = grep { !installed($_) } @missing;
    die "Still not installed after apt-get: @still\n" if @still;
}

sub ensure_run  { ensure( 'run-time', @RUN ) }
sub ensure_test { ensure( 'test',     @TEST ) }
sub ensure_bench { ensure( 'benchmark', @TEST, @BENCH ) }
sub ensure_profile { ensure( 'profiling', @TEST, @PROFILE ) }

1;
