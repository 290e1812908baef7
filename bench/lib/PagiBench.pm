package PagiBench;

# What the newer bench/bin scripts share: starting servers on ephemeral
# ports (and stopping them on any exit), running wrk and h2load, a
# throw-away TLS certificate, and the figures and machine facts of a
# report.  The older scripts carry their own copies of some of these.

use strict;
use warnings;
use Exporter 'import';
use File::Temp ();
use POSIX qw(WNOHANG uname);
use Time::HiRes qw(time sleep);

our @EXPORT_OK = qw(start_server stop_servers run_wrk run_h2load rss_kb listening_port slurp
  make_cert median commify find_in_path first_line_of machine_info
  cpu_ticks steal_percent with_steal steal_limit clean_ratios alternate_rounds steal_text);

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

# Start a server (argv @cmd, which prints "listening on http://host:port/",
# or https://); its output goes to a temp file.  Returns { name, pid, port,
# log }.  Dies with the server's output if it exits or stays silent.
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
        if ( $text =~ m{listening on https?://[^:]+:(\d+)} ) {
            $server->{port} = $1;
            return $server;
        }
        if ( waitpid( $pid, WNOHANG ) == $pid ) {
            $server->{pid} = 0;
            my $how = $? & 127 ? 'was killed by signal ' . ( $? & 127 ) : 'exited with code ' . ( $? >> 8 );
            die "bench: $name did not start: it $how before listening.  Its output:\n$text";
        }
        if ( time > $deadline ) {
            kill 'KILL', $pid;
            waitpid( $pid, 0 );
            $server->{pid} = 0;
            die "bench: $name did not start: no port reported within " . STARTUP_TIMEOUT . " s.  Its output:\n$text";
        }
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

# Run a load generator for about $duration seconds and return its output;
# dies if it cannot start, fails, or outlives the duration by WRK_SLACK.
sub run_load_tool {
    my ( $name, $duration, @cmd ) = @_;
    my $pid = open( my $fh, '-|', @cmd ) // die "bench: cannot run $name: $!\n";
    my $out = eval {
        local $SIG{ALRM} = sub { die "timeout\n" };
        alarm( $duration + WRK_SLACK );
        local $/;
        my $text = <$fh>;
        alarm 0;
        $text;
    };
    if ( !defined $out ) {
        kill 'KILL', $pid;
        close $fh;
        die "bench: $name did not finish in time\n";
    }
    close $fh;
    die "bench: $name failed (status $?):\n$out" if $?;
    return $out;
}

# wrk -tT -cC -dD --latency against a port (with `script`, a wrk Lua script:
# -s); returns { rps, p99_ms, errors, raw }.
sub run_wrk {
    my (%o) = @_;
    my @cmd = ( 'wrk', "-t$o{threads}", "-c$o{connections}", "-d$o{duration}s", '--latency',
        ( $o{script} ? ( '-s', $o{script} ) : () ), "http://127.0.0.1:$o{port}$o{path}" );
    my $out = run_load_tool( 'wrk', $o{duration}, @cmd );
    my ($rps) = $out =~ m{^Requests/sec:\s*([\d.]+)}m or die "bench: no Requests/sec in wrk output:\n$out";
    my ( $p99, $unit ) = $out =~ m{^\s*99%\s+([\d.]+)(us|ms|s|m|h)\s*$}m
      or die "bench: no 99% latency in wrk output:\n$out";
    my %to_ms = ( us => 0.001, ms => 1, s => 1000, m => 60_000, h => 3_600_000 );
    my @errors;
    push @errors, "$1 non-2xx/3xx" if $out =~ /Non-2xx or 3xx responses:\s*(\d+)/;
    push @errors, "socket errors ($1)" if $out =~ /Socket errors:\s*(.+)/;
    return { rps => $rps, p99_ms => $p99 * $to_ms{$unit}, errors => \@errors, raw => $out };
}

# h2load -cC -mM -tT -DD against a URL (h2c with prior knowledge for
# http://, ALPN h2 for https://), POSTing the file `data` if given; returns
# { rps, p99_ms, mean_ms, errors, protocol, raw }.  p99 comes from h2load's
# per-request log.
sub run_h2load {
    my (%o) = @_;
    my $log = File::Temp->new( TEMPLATE => 'bench-h2load-XXXXXX', TMPDIR => 1 );
    my @cmd = ( 'h2load', "-c$o{connections}", "-m$o{streams}", "-t$o{threads}", "-D$o{duration}",
        "--log-file=" . $log->filename, ( defined $o{data} ? ( '-d', $o{data} ) : () ), $o{url} );
    my $out = run_load_tool( 'h2load', $o{duration}, @cmd );
    my ($rps) = $out =~ m{^finished in [\d.]+m?s, ([\d.]+) req/s}m
      or die "bench: no req/s in h2load output:\n$out";
    my ( $mean, $unit ) = $out =~ m{^time for request:\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)\s}m;
    my %to_ms = ( us => 0.001, ms => 1, s => 1000 );
    my ($protocol) = $out =~ m{^Application protocol: (\S+)}m;

    # Anything but 2xx answers, or requests that failed, make a run suspect.
    my @errors;
    if ( $out =~ m{^requests: .*?(\d+) failed, (\d+) errored, (\d+) timeout}m ) {
        push @errors, "$1 failed"  if $1;
        push @errors, "$2 errored" if $2;
        push @errors, "$3 timeout" if $3;
    }
    if ( $out =~ m{^status codes: \d+ 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx}m ) {
        my $bad = $1 + $2 + $3;
        push @errors, "$bad non-2xx" if $bad;
    }
    push @errors, "negotiated $protocol, not h2" if $protocol && $protocol !~ /^h2c?$/;

    my @times;
    open my $lf, '<', $log->filename or die "bench: h2load log: $!\n";
    while ( my $line = <$lf> ) { push @times, $1 if $line =~ /^\d+\t\d+\t(\d+)/ }
    close $lf;
    @times = sort { $a <=> $b } @times;
    my $p99_us = @times ? $times[ POSIX::ceil( 0.99 * @times ) - 1 ] : 0;
    return {
        rps      => $rps,
        p99_ms   => $p99_us / 1000,
        mean_ms  => defined $mean ? $mean * $to_ms{$unit} : 0,
        errors   => \@errors,
        protocol => $protocol // '?',
        raw      => $out,
    };
}

# A throw-away self-signed certificate for 127.0.0.1 and localhost, made by
# openssl in $dir: key type 'ec' (P-256, the default) or 'rsa' (2048 bits).
# Returns (cert path, key path); the key is PKCS#8 PEM.
sub make_cert {
    my ( $dir, $type ) = @_;
    $type //= 'ec';
    my @key = $type eq 'rsa' ? ( '-newkey', 'rsa:2048' )
      : $type eq 'ec' ? ( '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1' )
      : die "bench: unknown key type '$type' (ec or rsa)\n";
    my ( $cert, $key, $log ) = ( "$dir/cert.pem", "$dir/key.pem", "$dir/openssl.log" );
    my @cmd = ( 'openssl', 'req', '-x509', @key, '-nodes', '-days', 2, '-subj', '/CN=localhost',
        '-addext', 'subjectAltName=DNS:localhost,IP:127.0.0.1', '-keyout', $key, '-out', $cert );
    my $pid = fork // die "bench: fork: $!\n";
    if ( $pid == 0 ) {
        open STDIN,  '<',  '/dev/null';
        open STDOUT, '>',  $log;
        open STDERR, '>&', \*STDOUT;
        exec {'openssl'} @cmd or print STDERR "exec openssl: $!\n";
        POSIX::_exit(127);
    }
    waitpid( $pid, 0 );
    die "bench: openssl could not make a certificate (is openssl installed?):\n" . slurp($log)
      if $? || !-s $cert || !-s $key;
    return ( $cert, $key );
}

sub median {
    my @v = sort { $a <=> $b } @_;
    return 0 unless @v;
    return $v[ $#v / 2 ] if @v % 2;
    return ( $v[ @v / 2 - 1 ] + $v[ @v / 2 ] ) / 2;
}

sub commify {
    my $n = sprintf '%.0f', shift;
    1 while $n =~ s/^(\d+)(\d{3})/$1,$2/;
    return $n;
}

sub find_in_path {
    my ($prog) = @_;
    for my $dir ( split /:/, $ENV{PATH} // '' ) {
        return "$dir/$prog" if length $dir && -x "$dir/$prog";
    }
    return;
}

# The first line of a command's output (stdout) that matches $re, chomped.
sub first_line_of {
    my ( $re, @cmd ) = @_;
    open( my $fh, '-|', @cmd ) or return;
    my ($line) = grep { /$re/ } <$fh>;
    close $fh;
    return unless defined $line;
    chomp $line;
    return $line;
}

# [ label, value ] rows describing the machine, for a report's table.
sub machine_info {
    my $cpuinfo = slurp('/proc/cpuinfo');
    my $ncpu    = () = $cpuinfo =~ /^processor\s*:/mg;
    my ($model) = $cpuinfo =~ /^model name\s*:\s*(.+)$/m;
    my $nproc   = first_line_of( qr/\d/, 'nproc' ) // $ncpu;
    my ( $sys, undef, $release ) = uname();
    my $perl = first_line_of( qr/This is perl/, $^X, '-v' ) // "perl $^V";
    $perl =~ s/^This is //;
    my $rustc = find_in_path('rustc')
      // ( -x "$ENV{HOME}/.cargo/bin/rustc" ? "$ENV{HOME}/.cargo/bin/rustc" : undef );
    my $rustv = $rustc ? first_line_of( qr/rustc/, $rustc, '--version' ) : undef;
    return (
        [ 'CPUs (nproc)', $nproc ],
        [ 'CPU model',    $model // 'unknown' ],
        [ 'Kernel',       "$sys $release" ],
        [ 'Perl',         $perl ],
        [ 'Rust',         $rustv // 'rustc not found' ],
    );
}

# ---- the host's share of the CPUs ---------------------------------------------
#
# On a virtual machine the hypervisor may run other guests on the CPUs this
# one believes it has; the time it takes is the kernel's "steal" (the eighth
# figure of /proc/stat's cpu line).  On the 2-core test machine it came and
# went in spells of minutes, from 0 to over 25 % of the CPUs, and each
# spell cut pagi-rs's hello-world rate by three to four times what it cut
# plain hyper's (bench/README.md, "Host steal", session 27): a ratio
# measured then says more about the host than about the server.  So each
# measurement records the steal while it ran, and the reports judge the
# ratio over the rounds in which neither server lost more than
# `steal_limit` percent.

# The aggregate cpu line of /proc/stat: [ user, nice, system, idle, iowait,
# irq, softirq, steal, ... ] in clock ticks; an empty list where there is
# none (not Linux).
sub cpu_ticks {
    open my $fh, '<', '/proc/stat' or return [];
    while (<$fh>) {
        return [ split ' ', $1 ] if /^cpu\s+(.*)$/;
    }
    return [];
}

# Percent of all CPU time between two cpu_ticks samples that the host
# took (steal); undef when it cannot tell (no /proc/stat, no ticks passed).
sub steal_percent {
    my ( $before, $after ) = @_;
    return undef unless @$before >= 8 && @$after >= 8;
    my $total = 0;
    # guest and guest_nice (9th, 10th) are already counted in user and nice.
    $total += $after->[$_] - $before->[$_] for 0 .. 7;
    return undef if $total <= 0;
    return 100 * ( $after->[7] - $before->[7] ) / $total;
}

# Run $code and return ( its result, the steal percent while it ran ).
# $sampler (cpu_ticks unless given) takes the samples.
sub with_steal {
    my ( $code, $sampler ) = @_;
    $sampler //= \&cpu_ticks;
    my $before = $sampler->();
    my $result = $code->();
    return ( $result, steal_percent( $before, $sampler->() ) );
}

# Above this percent of steal a round is called disturbed: BENCH_MAX_STEAL,
# or 5 (the steady level of the test machine was under 1 %).
sub steal_limit {
    my $limit = $ENV{BENCH_MAX_STEAL};
    return defined $limit && $limit =~ /^\d+(?:\.\d+)?$/ ? $limit : 5;
}

# The per-round ratios whose two measurements both ran with at most
# steal_limit percent of steal: ( \@ratios, \@steal_pairs ) in,
# the clean ratios out.  A round whose steal is unknown counts as clean.
sub clean_ratios {
    my ( $ratios, $steals ) = @_;
    my $limit = steal_limit();
    return map { $ratios->[$_] }
      grep {
        my $pair = $steals->[$_] // [];
        !grep { defined && $_ > $limit } @$pair
      } 0 .. $#$ratios;
}

sub steal_text {
    my ($pct) = @_;
    return defined $pct ? sprintf( '%.1f %%', $pct ) : '?';
}

# Measure each of @servers in turn, round after round, until `rounds`
# rounds ran with no more than steal_limit percent of steal, or `rounds`
# plus `extra` rounds ran in all.  `measure` takes a server and returns a
# hash of its figures, to which the steal is added (`steal`); `progress`,
# if given, is told (round number, server, figures) after each;
# `sampler` replaces cpu_ticks (for tests).
# Returns ( { server name => [ figures per round ] }, [ [ steal per
# server ] per round ] ).
sub alternate_rounds {
    my (%o) = @_;
    my %runs = map { $_->{name} => [] } @{ $o{servers} };
    my @steals;
    my ( $run, $clean ) = ( 0, 0 );
    while ( $clean < $o{rounds} && $run < $o{rounds} + ( $o{extra} // 0 ) ) {
        $run++;
        my @pair;
        for my $s ( @{ $o{servers} } ) {
            my ( $r, $steal ) = with_steal( sub { $o{measure}->($s) }, $o{sampler} );
            $r->{steal} = $steal;
            push @pair, $steal;
            push @{ $runs{ $s->{name} } }, $r;
            $o{progress}->( $run, $s, $r ) if $o{progress};
        }
        push @steals, \@pair;
        $clean++ if clean_ratios( [1], [ \@pair ] );
    }
    return ( \%runs, \@steals );
}

# The loopback TCP port a process listens on, from its sockets' inodes in
# /proc (for a server started with -p 0 and a log level that hides its
# startup line); undef while it listens on none.
sub listening_port {
    my ($pid) = @_;
    my %inode;
    opendir my $d, "/proc/$pid/fd" or return undef;
    for ( readdir $d ) {
        my $l = readlink "/proc/$pid/fd/$_" // next;
        $inode{$1} = 1 if $l =~ /^socket:\[(\d+)\]/;
    }
    open my $t, '<', '/proc/net/tcp' or return undef;
    while (<$t>) {
        my @f = split;
        next unless @f > 9 && $f[3] eq '0A' && $inode{ $f[9] };
        return hex( ( split /:/, $f[1] )[1] );
    }
    return undef;
}

# Resident set size of a process in kB, from /proc.
sub rss_kb {
    my ($pid) = @_;
    open my $fh, '<', "/proc/$pid/status" or return undef;
    while (<$fh>) { return $1 if /^VmRSS:\s+(\d+)\s+kB/ }
    return undef;
}

1;
