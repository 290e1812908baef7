package PagiRS::Workers;

# Helpers for the multi-process tests (-w/--workers): the master's worker
# processes, an app that says which process answered, and load runs with
# wrk whose report is parsed.

use strict;
use warnings;
use Exporter 'import';
use Time::HiRes qw(time sleep);
use PagiRS::Test qw(write_app http_request slurp);

our @EXPORT = qw(children worker_pids wait_workers pid_app answering_pid wrk_start wrk_result
  process_alive wait_gone proc_status_field);

# The pids of the direct children of $pid (from /proc, every thread's list).
sub children {
    my ($pid) = @_;
    my %kids;
    for my $f ( glob "/proc/$pid/task/*/children" ) {
        open my $fh, '<', $f or next;
        my $line = <$fh> // '';
        $kids{$_} = 1 for split ' ', $line;
    }
    return sort { $a <=> $b } keys %kids;
}

# The master's worker processes (its children), sorted.
sub worker_pids { children(@_) }

# Wait until the master has exactly $n children and $check->(@pids) (if
# given) holds; returns the pids, or the empty list on timeout.
sub wait_workers {
    my ( $master, $n, $timeout, $check ) = @_;
    my $deadline = time + ( $timeout // 10 );
    while ( time < $deadline ) {
        my @pids = children($master);
        return @pids if @pids == $n && ( !$check || $check->(@pids) );
        sleep 0.05;
    }
    return;
}

# An app whose every response body is "pid=$$" (the process that answered);
# $extra is Perl code run inside the app before it answers (with $path).
sub pid_app {
    my (%o) = @_;
    my $lifespan = $o{lifespan} // '';
    my $extra    = $o{extra}    // '';
    my $top      = $o{top}      // '';
    return write_app(<<"APP");
use strict; use warnings; use Future::AsyncAwait;
$top
my \$app = async sub {
    my (\$scope, \$receive, \$send) = \@_;
    if (\$scope->{type} eq 'lifespan') {
        while (1) {
            my \$ev = await \$receive->();
            if (\$ev->{type} eq 'lifespan.startup') {
                $lifespan
                await \$send->({ type => 'lifespan.startup.complete' });
            }
            elsif (\$ev->{type} eq 'lifespan.shutdown') {
                await \$send->({ type => 'lifespan.shutdown.complete' });
                return;
            }
        }
    }
    my \$path = \$scope->{path};
    $extra
    await \$send->({ type => 'http.response.start', status => 200,
                     headers => [['content-type', 'text/plain']] });
    await \$send->({ type => 'http.response.body', body => "pid=\$\$" });
};
\$app;
APP
}

# The pid that answered GET $path (undef when the request failed).
sub answering_pid {
    my ( $port, $path ) = @_;
    my $res = eval { http_request( $port, 'GET', $path // '/' ) };
    return undef unless $res && ( $res->{status} // 0 ) == 200;
    return ( $res->{body} // '' ) =~ /^pid=(\d+)$/ ? $1 : undef;
}

# Start wrk in the background: wrk_start($url, connections, seconds);
# returns a handle for wrk_result.
sub wrk_start {
    my ( $url, $conns, $secs ) = @_;
    my $out = "/tmp/pagi-rs-wrk-$$-" . int( rand 1e9 ) . '.txt';
    my $pid = fork // die "fork: $!";
    if ( !$pid ) {
        open STDOUT, '>', $out or POSIX::_exit(126);
        open STDERR, '>&', \*STDOUT;
        exec 'wrk', '-t1', "-c$conns", "-d${secs}s", '--timeout', '5s', $url
          or POSIX::_exit(127);
    }
    return { pid => $pid, out => $out };
}

# Wait for wrk and parse its report: { requests, socket_errors => {connect,
# read, write, timeout}, non2xx, text }.
sub wrk_result {
    my ($h) = @_;
    waitpid( $h->{pid}, 0 );
    my $text = slurp( $h->{out} ) // '';
    unlink $h->{out};
    my %r = ( text => $text, non2xx => 0, socket_errors => { connect => 0, read => 0, write => 0, timeout => 0 } );
    ( $r{requests} ) = $text =~ /(\d+) requests in/;
    if ( $text =~ /Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)/ ) {
        @{ $r{socket_errors} }{qw(connect read write timeout)} = ( $1, $2, $3, $4 );
    }
    $r{non2xx} = $1 if $text =~ /Non-2xx or 3xx responses: (\d+)/;
    return \%r;
}

sub process_alive {
    my ($pid) = @_;
    return 0 unless kill 0, $pid;
    # A zombie is gone for our purposes.
    return ( proc_status_field( $pid, 'State' ) // '' ) !~ /^Z/;
}

# Wait until none of @pids is alive; true if so.
sub wait_gone {
    my ( $timeout, @pids ) = @_;
    my $deadline = time + $timeout;
    while ( time < $deadline ) {
        return 1 unless grep { process_alive($_) } @pids;
        sleep 0.05;
    }
    return 0;
}

# A field of /proc/PID/status ("Uid", "State", ...), or undef.
sub proc_status_field {
    my ( $pid, $field ) = @_;
    open my $fh, '<', "/proc/$pid/status" or return undef;
    while ( my $line = <$fh> ) {
        return $1 if $line =~ /^\Q$field\E:\s*(.*?)\s*$/;
    }
    return undef;
}

1;
