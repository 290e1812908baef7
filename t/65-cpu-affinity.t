use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;
use PagiRS::Workers;

# --cpu-affinity N: each serving process (the whole server, or each worker)
# keeps every one of its threads on N CPUs of the set the server was
# started with, worker k on the k-th N of them; off by default.  What the
# kernel holds is read back from /proc/PID/task/TID/status.

plan skip_all => 'needs /proc' unless -d "/proc/$$/task";

# "0-2,5" => (0, 1, 2, 5)
sub expand {
    my ($list) = @_;
    return map { /^(\d+)-(\d+)$/ ? ( $1 .. $2 ) : $_ } split /,/, $list;
}

sub allowed_list {
    my ($status_file) = @_;
    open my $fh, '<', $status_file or return undef;
    while ( my $line = <$fh> ) {
        return $1 if $line =~ /^Cpus_allowed_list:\s*(\S+)/;
    }
    return undef;
}

# The distinct CPU lists of every thread of $pid.
sub thread_lists {
    my ($pid) = @_;
    my %lists;
    for my $task ( glob "/proc/$pid/task/*" ) {
        my $list = allowed_list("$task/status") // next;
        $lists{$list}++;
    }
    return sort keys %lists;
}

my @allowed = expand( allowed_list("/proc/$$/status") // '' );
my $all     = allowed_list("/proc/$$/status");
plan skip_all => 'needs at least two CPUs' if @allowed < 2;

my $app = "$FindBin::Bin/../examples/hello/app.pl";

subtest 'off by default: the threads may run on every allowed CPU' => sub {
    my $s = start_server($app);
    is http_request( $s->port, 'GET', '/' )->{status}, 200, 'serves';
    is_deeply [ thread_lists( $s->pid ) ], [$all], "every thread on $all";
    unlike $s->output, qr/cpu-affinity/, 'and nothing is said about it';
    $s->stop;
};

subtest 'one process: every thread on the first allowed CPU' => sub {
    my $s = start_server( '--cpu-affinity', 1, '--interpreters', 2, $app );
    is http_request( $s->port, 'GET', '/' )->{status}, 200, 'serves';
    my @tasks = glob "/proc/" . $s->pid . "/task/*";
    cmp_ok scalar @tasks, '>=', 4, 'main thread, network thread, two interpreters';
    is_deeply [ thread_lists( $s->pid ) ], ["$allowed[0]"], "every thread on CPU $allowed[0]";
    like $s->output, qr/threads kept on CPU $allowed[0] \(--cpu-affinity 1\)/, 'the log says where';
    $s->stop;
};

subtest 'workers: worker k on the k-th CPU, a replacement on its slot\'s' => sub {
    my $s = start_server( '-w', 2, '--cpu-affinity', 1, $app );
    is http_request( $s->port, 'GET', '/' )->{status}, 200, 'serves';
    ok $s->wait_output( qr/worker 2 \(pid \d+\) ready/, 10 ), 'both workers ready';
    my %worker;
    my $log = $s->output;
    while ( $log =~ /worker (\d+) \(pid (\d+)\) ready/g ) { $worker{$1} = $2 }
    is_deeply [ sort keys %worker ], [ 1, 2 ], 'found workers 1 and 2';
    is_deeply [ thread_lists( $worker{1} ) ], ["$allowed[0]"], "worker 1's threads on CPU $allowed[0]";
    is_deeply [ thread_lists( $worker{2} ) ], ["$allowed[1]"], "worker 2's threads on CPU $allowed[1]";
    is_deeply [ thread_lists( $s->pid ) ], [$all], 'the master stays unbound';

    my $old = $worker{2};
    kill 'KILL', $old;
    ok wait_gone( 10, $old ), 'worker 2 killed';
    ok $s->wait_output( qr/worker 2 \(pid (?!$old\))\d+\) ready/, 15 ), 'a new worker 2 is ready';
    my ($new) = grep { $_ != $old } $s->output =~ /worker 2 \(pid (\d+)\) ready/g;
    ok $new, "the new worker 2 is pid $new";
    is_deeply [ thread_lists($new) ], ["$allowed[1]"], "its threads on CPU $allowed[1], as before";
    $s->stop;
};

subtest 'asking for every allowed CPU binds nothing, and says so' => sub {
    my $n = scalar @allowed;
    my $s = start_server( '--cpu-affinity', $n, $app );
    is http_request( $s->port, 'GET', '/' )->{status}, 200, 'serves';
    is_deeply [ thread_lists( $s->pid ) ], [$all], "every thread on $all";
    like $s->output, qr/--cpu-affinity $n: the server may use only $n CPU\(s\)/, 'a warning says why';
    $s->stop;
};

SKIP: {
    skip 'needs taskset (util-linux)', 1 if system('taskset -p $$ >/dev/null 2>&1') != 0;
    subtest 'the set the server was started with is what is divided' => sub {
        # Start the server as `taskset -c <second allowed CPU>` would.
        my $only = $allowed[-1];
        is system("taskset -p -c $only $$ >/dev/null"), 0, "this test narrowed to CPU $only";
        my $s = start_server( '-w', 2, '--cpu-affinity', 1, $app );
        system("taskset -p -c $all $$ >/dev/null");
        is http_request( $s->port, 'GET', '/' )->{status}, 200, 'serves';
        my @workers = wait_workers( $s->pid, 2, 10 );
        is scalar @workers, 2, 'two workers';
        is_deeply [ thread_lists($_) ], ["$only"], "worker $_ stays on CPU $only" for @workers;
        like $s->output, qr/the server may use only 1 CPU\(s\)/, 'with one CPU allowed there is nothing to divide';
        $s->stop;
    };
}

for my $bad ( 1025, -1, 'two' ) {
    my ( $code, $err ) = run_pagi( "--cpu-affinity=$bad", $app );
    is $code, 2, "--cpu-affinity $bad is a usage error";
    like $err, qr/--cpu-affinity/, '...naming the option';
}

done_testing;
