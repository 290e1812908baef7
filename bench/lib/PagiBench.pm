package PagiBench;

# What the newer bench/bin scripts share: starting servers on ephemeral
# ports (and stopping them on any exit), and running wrk.  The older
# scripts carry their own copies of these.

use strict;
use warnings;
use Exporter 'import';
use File::Temp ();
use POSIX qw(WNOHANG);
use Time::HiRes qw(time sleep);

our @EXPORT_OK = qw(start_server stop_servers run_wrk rss_kb slurp);

use constant {
    STARTUP_TIMEOUT => 20,    # seconds for a server to print its port
    STOP_TIMEOUT    => 5,     # seconds between SIGTERM and SIGKILL
    WRK_SLACK       => 30,    # seconds a wrk run may exceed its -d
};

my @servers;
my $main_pid = $$;

sub slurp {
    my ($f) = @_;
    open my $fh, '<', $f or return '';
    local $/;
    return <$fh> // '';
}

# Start a server (argv @cmd, which prints "listening on http://host:port/");
# its output goes to a temp file.  Returns { name, pid, port, log }.
sub start_server {
    my ( $name, @cmd ) = @_;
    my $log = File::Temp->new( TEMPLATE => "bench-$name-XXXXXX", TMPDIR => 1 );
    my $pid = fork // die "bench: fork: $!\n";
    if ( $pid == 0 ) {
        open STDIN,  '<',  '/dev/null';
        open STDOUT, '>&', $log;
        open STDERR, '>&', $log;
        exec { $cmd[0] } @cmd or print STDERR "exec $cmd[0]: $!\n";
        POSIX::_exit(127);    # skip END blocks in the child
    }
    my $server = { name => $name, pid => $pid, log => $log };
    push @servers, $server;
    my $deadline = time + STARTUP_TIMEOUT;
    while (1) {
        my $text = slurp( $log->filename );
        if ( $text =~ m{listening on http://[^:]+:(\d+)} ) {
            $server->{port} = $1;
            return $server;
        }
        if ( waitpid( $pid, WNOHANG ) == $pid ) {
            $server->{pid} = 0;
            die "bench: $name exited (wait status $?) before listening:\n$text";
        }
        die "bench: $name did not report a port within " . STARTUP_TIMEOUT . " s:\n$text" if time > $deadline;
        sleep 0.05;
    }
}

sub stop_servers {
    return unless $$ == $main_pid;
    my @live = grep { $_->{pid} } @servers;
    kill 'TERM', map { $_->{pid} } @live;
    my $deadline = time + STOP_TIMEOUT;
    for my $s (@live) {
        while ( waitpid( $s->{pid}, WNOHANG ) == 0 ) {
            if ( time > $deadline ) {
                kill 'KILL', $s->{pid};
                waitpid( $s->{pid}, 0 );
                last;
            }
            sleep 0.05;
        }
        $s->{pid} = 0;
    }
}

END {
    my $status = $?;
    stop_servers();
    $? = $status;
}

# wrk -tT -cC -dD --latency against a port; returns { rps, p99_ms, errors, raw }.
sub run_wrk {
    my (%o) = @_;
    my @cmd = ( 'wrk', "-t$o{threads}", "-c$o{connections}", "-d$o{duration}s", '--latency',
        "http://127.0.0.1:$o{port}$o{path}" );
    my $pid = open( my $fh, '-|', @cmd ) // die "bench: cannot run wrk: $!\n";
    my $out = eval {
        local $SIG{ALRM} = sub { die "timeout\n" };
        alarm( $o{duration} + WRK_SLACK );
        local $/;
        my $text = <$fh>;
        alarm 0;
        $text;
    };
    if ( !defined $out ) {
        kill 'KILL', $pid;
        close $fh;
        die "bench: wrk did not finish in time\n";
    }
    close $fh;
    die "bench: wrk failed (status $?):\n$out" if $?;
    my ($rps) = $out =~ m{^Requests/sec:\s*([\d.]+)}m or die "bench: no Requests/sec in wrk output:\n$out";
    my ( $p99, $unit ) = $out =~ m{^\s*99%\s+([\d.]+)(us|ms|s|m|h)\s*$}m
      or die "bench: no 99% latency in wrk output:\n$out";
    my %to_ms = ( us => 0.001, ms => 1, s => 1000, m => 60_000, h => 3_600_000 );
    my @errors;
    push @errors, "$1 non-2xx/3xx" if $out =~ /Non-2xx or 3xx responses:\s*(\d+)/;
    push @errors, "socket errors ($1)" if $out =~ /Socket errors:\s*(.+)/;
    return { rps => $rps, p99_ms => $p99 * $to_ms{$unit}, errors => \@errors, raw => $out };
}

# Resident set size of a process in kB, from /proc.
sub rss_kb {
    my ($pid) = @_;
    open my $fh, '<', "/proc/$pid/status" or return undef;
    while (<$fh>) { return $1 if /^VmRSS:\s+(\d+)\s+kB/ }
    return undef;
}

1;
