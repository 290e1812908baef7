# Worker processes (-w N): a master loads the app once and forks N workers,
# each running lifespan startup and serving the shared listener.  A worker
# killed under load is replaced at once (only its own in-flight requests
# may fail); a worker whose lifespan startup fails exits 2 and is not
# restarted (all failing: the master exits 1 with the app's message); a
# crash loop backs off instead of spinning.
use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;
use PagiRS::Workers;
use File::Temp qw(tempdir);
use Time::HiRes qw(time sleep);

my $dir = tempdir( CLEANUP => 1 );

subtest 'two workers serve; the master does not' => sub {
    my $s = start_server( '-w', 2, pid_app() );
    like $s->output, qr/listening on http:\/\/127\.0\.0\.1:\d+\/ \(pid \d+, workers: 2, interpreters: 1/,
      'the startup line names the workers';
    my @w = wait_workers( $s->pid, 2, 5 );
    is scalar @w, 2, 'two worker processes';
    is proc_status_field( $s->pid, 'Threads' ), 1, 'the master has one thread (it forks before any other exists)';
    my %seen;
    for ( 1 .. 40 ) {
        my $pid = answering_pid( $s->port );
        $seen{ $pid // 'failed' }++;
    }
    ok !$seen{failed}, 'every request answered';
    my %workers = map { $_ => 1 } @w;
    is_deeply [ grep { !$workers{$_} } keys %seen ], [], 'only workers answer (never the master)';
    is $s->stop('TERM'), 0, 'TERM stops the master, exit 0';
    ok wait_gone( 5, @w ), 'and its workers';
};

subtest 'kill -9 of a worker under load: a new one serves within a second' => sub {
    my $s = start_server( '-w', 2, pid_app() );
    my @before = wait_workers( $s->pid, 2, 5 );
    is scalar @before, 2, 'two workers';
    my $conns = 8;
    my $wrk   = wrk_start( $s->url('/'), $conns, 4 );
    sleep 1.5;
    my $victim = $before[0];
    my $killed = time;
    kill 'KILL', $victim;
    my @after = wait_workers( $s->pid, 2, 3, sub { !grep { $_ == $victim } @_ } );
    is scalar @after, 2, 'the master forked a replacement';
    my ($new) = grep { $_ != $before[1] } @after;
    my $ready = $s->wait_output( qr/worker \d+ \(pid \Q$new\E\) ready/, 3 ) ? time : undef;
    ok defined $ready && $ready - $killed < 1.0,
      sprintf( 'the replacement finished its startup %.2fs after the kill', ( $ready // time ) - $killed );
    my $r = wrk_result($wrk);
    ok $r->{requests} > 100, "load ran ($r->{requests} requests)" or diag $r->{text};
    is $r->{socket_errors}{connect}, 0, 'no connection refused';
    is $r->{non2xx}, 0, 'no error status';
    my $lost = $r->{socket_errors}{read} + $r->{socket_errors}{write} + $r->{socket_errors}{timeout};
    ok $lost <= $conns, "at most the killed worker's in-flight requests failed ($lost)" or diag $r->{text};
    like $s->output, qr/worker \d+ \(pid \Q$victim\E\) exited unexpectedly \(killed by SIGKILL \(9\)\); starting it again/,
      'the crash is logged';
    my %answered;
    for ( 1 .. 30 ) { my $p = answering_pid( $s->port ); $answered{ $p // 'failed' }++ }
    ok !$answered{failed} && !$answered{$victim}, 'serving afterwards, never from the dead worker';
    is $s->stop('TERM'), 0, 'stops cleanly';
};

subtest 'a master killed with SIGKILL: its workers notice and stop' => sub {
    my $s = start_server( '-w', 2, pid_app() );
    my @w = wait_workers( $s->pid, 2, 5 );
    kill 'KILL', $s->pid;
    $s->stop( 'CHLD', 5 );
    ok wait_gone( 10, @w ), 'no orphaned worker keeps serving';
    like $s->output, qr/the master process is gone: stopping/, 'they say why';
};

subtest 'lifespan startup failing in every worker: master exits 1 with the message' => sub {
    my $app = pid_app( lifespan => q{await $send->({ type => 'lifespan.startup.failed', message => 'the database is down' }); return;} );
    my ( $code, $err ) = run_pagi( '-p', 0, '-w', 2, $app );
    is $code, 1, 'exit status 1';
    like $err, qr/pagi-rs: lifespan startup failed: the database is down/, "the app's message ends the output";
    my @failed = $err =~ /worker \d \(pid \d+\) failed lifespan startup; not starting it again: the database is down/g;
    is scalar @failed, 2, 'each worker failed once and was not started again' or diag $err;
    unlike $err, qr/listening on/, 'never announced as listening';
};

subtest 'lifespan startup failing in one worker: it is not restarted, the other serves' => sub {
    my $flag = "$dir/first";
    my $app = pid_app(
        top      => 'use Fcntl;',
        lifespan => qq{
            unless (sysopen my \$fh, '$flag', O_CREAT | O_EXCL | O_WRONLY) {
                await \$send->({ type => 'lifespan.startup.failed', message => 'only one may start' });
                return;
            }
        },
    );
    my $s = spawn_pagi( '-p', 0, '-w', 2, $app );
    ok $s->wait_output( qr/failed lifespan startup; not starting it again: only one may start/, 10 ),
      'the failure is logged';
    ok $s->wait_output( qr/listening on http:\/\/127\.0\.0\.1:(\d+)\//, 10 ), 'the server still announces itself';
    my ($port) = $s->output =~ m{listening on http://127\.0\.0\.1:(\d+)/};
    my @w = wait_workers( $s->pid, 1, 5 );
    is scalar @w, 1, 'one worker left';
    sleep 1;
    is scalar( () = children( $s->pid ) ), 1, 'and no second one is started again';
    is answering_pid($port), $w[0], 'the remaining worker serves';
    is $s->stop('TERM'), 0, 'stops cleanly';
};

subtest 'a worker that keeps crashing is restarted with a growing delay' => sub {
    # Each worker kills itself a moment after its startup.
    my $app = pid_app(
        lifespan => q{
            $main::suicide = Future::IO->sleep(0.1)->on_done(sub { kill 'KILL', $$ });
        },
    );
    my $s = spawn_pagi( '-p', 0, '-w', 2, $app );
    my $t0 = time;
    sleep 4;
    my $out = $s->output;
    my $starts = () = $out =~ /worker 1 \(pid \d+\) ready/g;
    ok $starts >= 2 && $starts <= 8, "worker 1 started $starts times in 4s (without a delay: over 20)" or diag $out;
    like $out, qr/worker 1 \(pid \d+\) exited \(killed by SIGKILL \(9\)\) 2 times in a row within 5s of starting: crash loop; next start in 0\.5s/,
      'the loop is logged with its delay';
    like $out, qr/3 times in a row within 5s of starting: crash loop; next start in 1\.0s/, 'and the delay grows';
    is $s->stop('TERM'), 0, 'TERM still stops it';
};

subtest 'workers serve a Unix socket and a TCP port; JSON lines name the worker' => sub {
    require JSON::PP;
    my $sock = "$dir/workers.sock";
    my $port = free_port();
    my $s    = start_server( '-w', 2, '--log-format', 'json', '--listen', "unix:$sock", '--listen', "127.0.0.1:$port",
        pid_app() );
    my @w = wait_workers( $s->pid, 2, 5 );
    is scalar @w, 2, 'two worker processes';
    my %workers = map { $_ => 1 } @w;
    my %seen;
    for ( 1 .. 20 ) {
        for my $where ( "unix:$sock", $port ) {
            my $pid = answering_pid($where);
            $seen{ $pid // 'failed' }++;
        }
    }
    ok !$seen{failed}, 'every request answered, on both listeners';
    is_deeply [ grep { !$workers{$_} } keys %seen ], [], 'by the workers only';
    is $s->stop('TERM'), 0, 'TERM: exit 0';
    ok !-e $sock, 'the socket file is removed at exit';
    my @records = map { JSON::PP->new->decode($_) } grep {/^\{/} split /\n/, $s->output;
    my @server_lines = grep { exists $_->{level} } @records;
    cmp_ok scalar @server_lines, '>', 4, 'server log lines are JSON';
    my %numbers;
    for my $r (@server_lines) {
        if ( $r->{pid} == $s->pid ) {
            $numbers{master}++ if !exists $r->{worker};
        }
        elsif ( $workers{ $r->{pid} } && defined $r->{worker} && $r->{worker} =~ /^[12]$/ ) {
            $numbers{ $r->{worker} }{ $r->{pid} }++;
        }
        else {
            fail "a line with an unexpected pid/worker: pid $r->{pid}, worker " . ( $r->{worker} // 'null' );
        }
    }
    ok $numbers{master}, "the master's lines have no worker key";
    is scalar( keys %{ $numbers{1} // {} } ) + scalar( keys %{ $numbers{2} // {} } ), 2,
      'each worker numbers its lines (1 and 2, one pid each)';
};

done_testing;
