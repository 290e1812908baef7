use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;

# What the kernel sees of the interpreter threads, in
# /proc/PID/task/TID/stat: their names (perl-N; the process keeps its own,
# though Perl renames a thread whenever $0 is assigned), and their policy
# (--interpreter-scheduling: field 41, 0 SCHED_OTHER, 3 SCHED_BATCH; batch
# always with `batch`, never with `normal`, and by default while requests
# arrive together; the network's threads keep the default), and how many
# network threads there are (--network-threads).

plan skip_all => 'needs /proc' unless -d "/proc/$$/task";

# Where the kernel (or a container's seccomp) refuses SCHED_BATCH to an
# unprivileged process, pagi-rs keeps the default and says so at debug
# level: the policy checks below cannot pass there.
my $batch_allowed = system( 'chrt -b 0 true >/dev/null 2>&1' ) == 0;

my $app = write_app( <<'PERL', 'sched_app.pl' );
use strict; use warnings; use Future::AsyncAwait;
async sub {
    my ($scope, $receive, $send) = @_;
    return if $scope->{type} eq 'lifespan';
    await $send->({ type => 'http.response.start', status => 200, headers => [] });
    await $send->({ type => 'http.response.body', body => 'ok' });
};
PERL

# thread name => [ policies ], for every thread of $pid.
sub policies {
    my ($pid) = @_;
    my %by_name;
    for my $task ( glob "/proc/$pid/task/*" ) {
        open my $fh, '<', "$task/stat" or next;
        my $stat = <$fh>;
        # The name is in parentheses and may hold spaces: split after it.
        my ( $name, $rest ) = $stat =~ /\((.*)\)\s+(.*)/s or next;
        my @fields = split ' ', $rest;    # field 3 (state) is $fields[0]
        push @{ $by_name{$name} }, $fields[ 41 - 3 ];
    }
    return \%by_name;
}

for my $case ( [ [ '--interpreter-scheduling', 'batch' ], 3, 1, 'with batch' ],
    [ [ '--interpreter-scheduling', 'normal' ], 0, 1, 'with normal' ],
    [ [ '--interpreter-scheduling', 'batch', '--interpreters', 2 ], 3, 2, 'every interpreter of several' ],
    [ [], 0, 1, 'by default, while requests come one at a time' ] )
{
    my ( $args, $want, $count, $what ) = @$case;
    subtest $what => sub {
        plan skip_all => 'this kernel refuses SCHED_BATCH (chrt -b failed)' if $want == 3 && !$batch_allowed;
        my $s = start_server( @$args, $app );
        is http_request( $s->port, 'GET', '/' )->{status}, 200, 'serves';
        my $p = policies( $s->pid );
        my @perl = map { @{ $p->{$_} } } grep { /^perl-\d+$/ } keys %$p;
        is scalar @perl, $count, "found the $count interpreter thread(s)" or diag explain $p;
        is scalar( grep { $_ != $want } @perl ), 0, "interpreter threads have policy $want"
          or diag explain $p;
        my @network = @{ $p->{'tokio-rt-worker'} // [] };
        ok scalar @network, 'found the network threads';
        is scalar( grep { $_ != 0 } @network ), 0, 'network threads keep the default';
        $s->stop;
    };
}

# The default follows the load: several requests at once, again and
# again, turn the interpreter batch; requests one at a time turn it back.
sub interpreter_policy {
    my ($pid) = @_;
    my $p = policies($pid);
    return $p->{'perl-0'}[0];
}

sub burst {
    my ( $port, $n ) = @_;
    my @socks = map { connect_port($port) } 1 .. $n;
    $_->syswrite( "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" ) for @socks;
    read_sock( $_, qr/ok\z/, 5 ) for @socks;
    close $_ for @socks;
}

subtest 'by default, batch while requests arrive together, and back' => sub {
    plan skip_all => 'this kernel refuses SCHED_BATCH (chrt -b failed)' unless $batch_allowed;
    my $s = start_server($app);
    is interpreter_policy( $s->pid ), 0, 'idle: the default policy';
    my $rounds = 0;
    while ( $rounds++ < 100 ) {
        burst( $s->port, 20 );
        last if interpreter_policy( $s->pid ) == 3;
    }
    is interpreter_policy( $s->pid ), 3, "batch after bursts of 20 requests ($rounds rounds)";
    my $requests = 0;
    while ( $requests++ < 400 ) {
        http_request( $s->port, 'GET', '/' );
        last if interpreter_policy( $s->pid ) == 0;
    }
    is interpreter_policy( $s->pid ), 0, "the default again after requests one at a time ($requests)";
    $s->stop;
};

# What ps, top, pkill and killall show: the executable's name, cut to the
# kernel's 15 bytes.
( my $comm = ( split m{/}, pagi_bin() )[-1] ) =~ s/^(.{15}).*/$1/s;
for my $args ( [], [ '-w', 2 ] ) {
    subtest "the process keeps its name (@$args)" => sub {
        my $s = start_server( @$args, $app );
        is http_request( $s->port, 'GET', '/' )->{status}, 200, 'serves';
        my $pid = $s->pid;
        my @family = ( $pid, grep { ( ( split ' ', ( slurp("/proc/$_/stat") =~ /\)\s+(.*)/s )[0] )[1] // 0 ) == $pid }
              map { m{/proc/(\d+)$} ? $1 : () } glob '/proc/[0-9]*' );
        is scalar @family, 1 + ( @$args ? 2 : 0 ), 'found the process (and its workers)';
        is slurp("/proc/$_/comm"), "$comm\n", "process $_ is named $comm" for @family;
        $s->stop;
    };
}

# --network-threads: how many network threads each process runs.  The
# default is the CPUs the interpreters leave over, at least one; tokio's
# own TOKIO_WORKER_THREADS is honoured when the option is not given.
sub network_thread_count {
    my ($pid) = @_;
    return scalar @{ policies($pid)->{'tokio-rt-worker'} // [] };
}

sub workers_of {
    my ($pid) = @_;
    return grep { ( ( split ' ', ( slurp("/proc/$_/stat") =~ /\)\s+(.*)/s )[0] )[1] // 0 ) == $pid }
      map { m{/proc/(\d+)$} ? $1 : () } glob '/proc/[0-9]*';
}

chomp( my $cpus = `nproc 2>/dev/null` // '' );
my $left_over = sub {
    my ($interpreters) = @_;
    return if $cpus !~ /^\d+$/;
    return $cpus > $interpreters ? $cpus - $interpreters : 1;
};
for my $case (
    [ [], {}, $left_over->(1), 'by default, the CPUs the interpreter leaves over' ],
    [ [ '--interpreters', 4 ], {}, $left_over->(4), 'the CPUs four interpreters leave over, at least one' ],
    [ [ '--network-threads', 3 ], {}, 3, 'as many as asked' ],
    [ [ '--network-threads', 1 ], { TOKIO_WORKER_THREADS => 4 }, 1, 'the option wins over TOKIO_WORKER_THREADS' ],
    [ [], { TOKIO_WORKER_THREADS => 4 }, 4, 'TOKIO_WORKER_THREADS without the option' ],
  )
{
    my ( $args, $env, $want, $what ) = @$case;
    subtest "network threads: $what" => sub {
        plan skip_all => 'nproc is not available' unless defined $want;
        local @ENV{ keys %$env } = values %$env;
        my $s = start_server( @$args, $app );
        is http_request( $s->port, 'GET', '/' )->{status}, 200, 'serves';
        is network_thread_count( $s->pid ), $want, "$want network thread(s)";
        $s->stop;
    };
}

subtest 'network threads: each worker process runs as many as asked' => sub {
    my $s = start_server( '-w', 2, '--network-threads', 2, $app );
    is http_request( $s->port, 'GET', '/' )->{status}, 200, 'serves';
    my @workers = workers_of( $s->pid );
    is scalar @workers, 2, 'two workers';
    is network_thread_count($_), 2, "worker $_ runs 2" for @workers;
    $s->stop;
};

for my $bad ( 0, 257 ) {
    my ( $code, $err ) = run_pagi( '--network-threads', $bad, $app );
    is $code, 2, "--network-threads $bad is a usage error";
    like $err, qr/--network-threads/, '...naming the option';
}

my ( $code, $err ) = run_pagi( '--interpreter-scheduling', 'fifo', $app );
is $code, 2, 'an unknown policy is a usage error';
like $err, qr/batch.*normal|possible values/si, '...naming the choices';

done_testing;
