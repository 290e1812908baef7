use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;
use PagiRS::SSE;
use File::Temp qw(tempdir);
use Fcntl qw(O_RDONLY O_NONBLOCK);
use POSIX qw(mkfifo WNOHANG);
use IO::Select;
use JSON::PP ();
use Time::HiRes qw(time sleep);

# Logs for production: whole access-log lines when several processes share
# one log, and the last lines written before the server exits.

my $dir = tempdir( CLEANUP => 1 );
umask 022;
my $JSON = JSON::PP->new->utf8;    # strict: the bytes must be UTF-8
my $TIME = qr/\A\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\z/;

my $app = write_app( <<'PERL', 'logs_app.pl' );
use strict; use warnings; use Future::AsyncAwait;
warn "load-warning-marker-5150\n";
my $app = async sub {
    my ($scope, $receive, $send) = @_;
    return if $scope->{type} eq 'lifespan';
    my $path = $scope->{path};
    if ($scope->{type} eq 'sse') {
        await $send->({ type => 'sse.start' });
        await $send->({ type => 'sse.close', reason => "done\n\"quoted\"\x01" });
        return;
    }
    warn "runtime-warning-marker-7731\n" if $path eq '/warn';
    print STDERR "raw-stderr-marker-9090\n" if $path eq '/stderr';
    die "app-die-marker-4242\n" if $path eq '/die';
    await $send->({ type => 'http.response.start', status => 200, headers => [['content-length', 2]] });
    await $send->({ type => 'http.response.body', body => 'ok' });
};
$app;
PERL

# A server on a port of its own whose stderr may be empty (--error-log):
# waits for the port instead of the startup line.  Dies if it does not
# start, as start_server does.
sub start_quiet {
    my (@args) = @_;
    my $port = free_port();
    my $s    = start_on_port( $port, @args ) or die "server did not start\n";
    return $s;
}

# Run one subtest's body; a server that does not start fails that subtest
# and leaves the others to run.
sub check {
    my ( $name, $body ) = @_;
    subtest $name => sub { eval { $body->(); 1 } or fail("the subtest died: $@") };
}

# ---------------------------------------------------------------------------
# Several processes, one log; the last lines at exit
# ---------------------------------------------------------------------------

# $clients processes each sending $n keep-alive requests for paths made by
# $path->($client, $i) to $port; returns their pids.
sub load {
    my ( $port, $clients, $n, $path ) = @_;
    my @pids;
    for my $c ( 1 .. $clients ) {
        my $pid = fork // die "fork: $!";
        if ( !$pid ) {
            my $sock = connect_port($port);
            for my $i ( 1 .. $n ) {
                print $sock "GET " . $path->( $c, $i ) . " HTTP/1.1\r\nHost: x\r\n\r\n";
                my $buf = '';
                while ( $buf !~ /\r\n\r\nok\z/ ) {
                    sysread( $sock, $buf, 4096, length $buf ) or POSIX::_exit(1);
                }
            }
            POSIX::_exit(0);
        }
        push @pids, $pid;
    }
    return @pids;
}

sub wait_pids {
    my $ok = 1;
    for (@_) { waitpid( $_, 0 ); $ok &&= $? == 0 }
    return $ok;
}

# A FIFO with its read end open (a pipe, as stdout to a log shipper is):
# returns (path, read handle).
sub fifo {
    my ($name) = @_;
    my $path = "$dir/$name";
    mkfifo( $path, 0600 ) or die "mkfifo: $!";
    sysopen( my $fh, $path, O_RDONLY | O_NONBLOCK ) or die "open fifo: $!";
    return ( $path, $fh );
}

# Read $fh until EOF after all @servers have exited.
sub drain {
    my ( $fh, @servers ) = @_;
    my $sel = IO::Select->new($fh);
    my $data = '';
    my $deadline = time + 30;
    while ( time < $deadline ) {
        my $running = grep { $_->is_running } @servers;
        if ( $sel->can_read(0.05) ) {
            my $n = sysread( $fh, $data, 4096, length $data );
            last if defined $n && $n == 0 && !$running;
        }
    }
    return $data;
}

my $PAD = 'x' x 1500;    # long lines, each well under PIPE_BUF (4096)
my $LINE_A = qr{\A127\.0\.0\.1 - - \[[^\]]+\] "GET /(a|b)/(\d+)/(\d+)/$PAD HTTP/1\.1" 200 2 "-" "-"\z};

check 'two processes, one pipe: every access line whole' => sub {
    my ( $path, $fh ) = fifo('shared.fifo');
    my @servers = map { start_quiet( '--access-log', $path, '--access-log-format', 'combined', $app ) } 1 .. 2;
    my @pids;
    for my $k ( 0, 1 ) {
        my $tag = $k ? 'b' : 'a';
        push @pids, load( $servers[$k]->port, 3, 150, sub { "/$tag/$_[0]/$_[1]/$PAD" } );
    }
    my $data = '';
    my $sel  = IO::Select->new($fh);
    # Read slowly while the clients run, so that the pipe is often full.
    while ( grep { waitpid( $_, WNOHANG ) == 0 } @pids ) {
        if ( $sel->can_read(0.05) ) { sysread( $fh, $data, 4096, length $data ); sleep 0.002 }
    }
    kill 'TERM', map { $_->pid } @servers;
    $data .= drain( $fh, @servers );
    is_deeply [ map { $_->stop } @servers ], [ 0, 0 ], 'both exited 0';
    my @lines = split /\n/, $data;
    my @broken = grep { $_ !~ $LINE_A } @lines;
    is scalar(@broken), 0, 'no line is torn or mixed with another' or diag "first: " . substr( $broken[0], 0, 300 );
    my %seen;
    for (@lines) { $seen{"$1/$2/$3"}++ if $_ =~ $LINE_A }
    is scalar( keys %seen ), 900, 'all 900 requests logged, once each' or diag scalar(@lines) . " lines";
};

check 'two processes, one file: every access line whole' => sub {
    my $log = "$dir/shared.log";
    my @servers = map { start_quiet( '--access-log', $log, '--access-log-format', 'combined', $app ) } 1 .. 2;
    my @pids;
    for my $k ( 0, 1 ) {
        my $tag = $k ? 'b' : 'a';
        push @pids, load( $servers[$k]->port, 3, 150, sub { "/$tag/$_[0]/$_[1]/$PAD" } );
    }
    ok wait_pids(@pids), 'the clients got every response';
    $_->stop('TERM') for @servers;
    my @lines = file_lines($log);
    is scalar(@lines), 900, '900 lines';
    my @bad = grep { $_ !~ $LINE_A } @lines;
    is scalar(@bad), 0, 'each parses whole' or diag substr( $bad[0], 0, 300 );
};

check 'a burst, then SIGTERM at once: every line reaches the log' => sub {
    my ( $path, $fh ) = fifo('burst.fifo');
    my $s = start_quiet( '--access-log', $path, '--access-log-format', 'combined', $app );
    # More than the pipe holds (64 KiB): the rest waits in the server.
    ok wait_pids( load( $s->port, 1, 400, sub { "/a/1/$_[1]/$PAD" } ) ), '400 requests answered';
    kill 'TERM', $s->pid;
    my $data  = drain( $fh, $s );
    my @lines = split /\n/, $data;
    is scalar( grep { $_ =~ $LINE_A } @lines ), 400, 'all 400 lines, after the server exited';
    is $s->stop, 0, 'exit 0';

    my $log = "$dir/burst.log";
    $s = start_quiet( '--access-log', $log, $app );
    ok wait_pids( load( $s->port, 2, 300, sub { "/b/$_[0]/$_[1]/$PAD" } ) ), '600 requests to a file';
    is $s->stop('TERM'), 0, 'SIGTERM right after';
    is scalar( file_lines($log) ), 600, 'all 600 lines in the file';
};

done_testing;
