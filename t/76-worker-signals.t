# Signals to the master: HUP replaces every worker without failing a
# request (the new ones finish lifespan startup before the old ones are
# asked to stop), TTIN/TTOU add and remove a worker, TERM stops every
# worker gracefully (lifespan shutdown in each), a second INT stops at once.
# And an app that sets $SIG{TERM} keeps graceful shutdown: its handler runs
# and the server still stops.
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

subtest 'HUP under load: new workers, no failed request' => sub {
    # A startup that takes a while: the old workers must keep serving meanwhile.
    my $app = pid_app( lifespan => q{await Future::IO->sleep(0.3);} );
    my $s = start_server( '-w', 2, $app );
    my @old = wait_workers( $s->pid, 2, 5 );
    is scalar @old, 2, 'two workers';
    my $wrk = wrk_start( $s->url('/'), 50, 5 );
    sleep 1.5;
    kill 'HUP', $s->pid;
    ok $s->wait_output( qr/HUP: the new workers are ready; the old ones retire/, 5 ), 'the new workers became ready';
    ok wait_gone( 8, @old ), 'the old workers exited';
    my $r = wrk_result($wrk);
    ok $r->{requests} > 500, "load ran through the restart ($r->{requests} requests)" or diag $r->{text};
    is_deeply $r->{socket_errors}, { connect => 0, read => 0, write => 0, timeout => 0 }, 'no socket error'
      or diag $r->{text};
    is $r->{non2xx}, 0, 'no error status';
    my @new = wait_workers( $s->pid, 2, 5 );
    my %old = map { $_ => 1 } @old;
    is scalar( grep { $old{$_} } @new ), 0, 'the worker pids changed';
    is $s->stop('TERM'), 0, 'stops cleanly';
};

subtest 'HUP whose new workers fail lifespan startup keeps the old ones' => sub {
    my $flag = "$dir/fail-now";
    my $app = pid_app( lifespan => qq{
        if (-e '$flag') {
            await \$send->({ type => 'lifespan.startup.failed', message => 'config broken' });
            return;
        }
        open my \$up, '>', "$dir/up-\$\$" or die; close \$up;
    } );
    my $s = start_server( '-w', 2, $app );
    my @old = wait_workers( $s->pid, 2, 5 );
    # The flag is for the new workers: a first worker still starting (under
    # load) would see it too, and fail in their place.
    my $until = time + 10;
    sleep 0.05 while time < $until && grep { !-e "$dir/up-$_" } @old;
    is scalar( grep { -e "$dir/up-$_" } @old ), 2, 'the first workers are past their lifespan startup';
    open my $fh, '>', $flag or die;
    close $fh;
    kill 'HUP', $s->pid;
    ok $s->wait_output( qr/HUP: new worker \d \(pid \d+\) failed lifespan startup: config broken; keeping the old workers/, 10 ),
      'the failure is logged';
    sleep 0.5;
    my @now = wait_workers( $s->pid, 2, 5 );
    is_deeply [ sort @now ], [ sort @old ], 'the old workers still serve';
    ok defined answering_pid( $s->port ), 'requests are answered';
    unlink $flag;
    is $s->stop('TERM'), 0, 'stops cleanly';
};

subtest 'TTIN and TTOU' => sub {
    my $s = start_server( '-w', 2, pid_app() );
    is scalar( wait_workers( $s->pid, 2, 5 ) ), 2, 'two workers';
    kill 'TTIN', $s->pid;
    is scalar( wait_workers( $s->pid, 3, 5 ) ), 3, 'TTIN: three';
    kill 'TTOU', $s->pid;
    is scalar( wait_workers( $s->pid, 2, 8 ) ), 2, 'TTOU: two';
    kill 'TTOU', $s->pid;
    is scalar( wait_workers( $s->pid, 1, 8 ) ), 1, 'TTOU: one';
    kill 'TTOU', $s->pid;
    ok $s->wait_output( qr/Received TTOU: ignored, one worker is the minimum/, 5 ), 'never below one';
    sleep 0.5;
    is scalar( () = children( $s->pid ) ), 1, 'still one';
    ok defined answering_pid( $s->port ), 'serving';
    is $s->stop('TERM'), 0, 'stops cleanly';
};

subtest 'TERM: every worker runs lifespan shutdown; in-flight requests finish' => sub {
    my $app = write_app(<<"APP");
use strict; use warnings; use Future::AsyncAwait;
async sub {
    my (\$scope, \$receive, \$send) = \@_;
    if (\$scope->{type} eq 'lifespan') {
        while (1) {
            my \$ev = await \$receive->();
            if (\$ev->{type} eq 'lifespan.startup') { await \$send->({ type => 'lifespan.startup.complete' }) }
            else {
                open my \$fh, '>', "$dir/shutdown.\$\$" or die; close \$fh;
                await \$send->({ type => 'lifespan.shutdown.complete' });
                return;
            }
        }
    }
    await Future::IO->sleep(1) if \$scope->{path} eq '/slow';
    await \$send->({ type => 'http.response.start', status => 200, headers => [] });
    await \$send->({ type => 'http.response.body', body => "done" });
};
APP
    my $s = start_server( '-w', 2, $app );
    my @w = wait_workers( $s->pid, 2, 5 );
    my $sock = connect_port( $s->port );
    print $sock "GET /slow HTTP/1.1\r\nHost: x\r\n\r\n";
    sleep 0.3;
    kill 'TERM', $s->pid;
    my ($buf) = read_sock( $sock, qr/done/, 5 );
    like $buf, qr/^HTTP\/1\.1 200.*done/s, 'the in-flight request finished';
    is $s->stop( 'TERM', 10 ), 0, 'exit 0';
    ok -e "$dir/shutdown.$_", "worker $_ ran lifespan shutdown" for @w;
};

subtest 'a second INT stops at once' => sub {
    my $app = pid_app( extra => q{await Future::IO->sleep(30) if $path eq '/hang';} );
    my $s = start_server( '-w', 2, '--shutdown-timeout', 60, $app );
    my @w = wait_workers( $s->pid, 2, 5 );
    my $sock = connect_port( $s->port );
    print $sock "GET /hang HTTP/1.1\r\nHost: x\r\n\r\n";
    sleep 0.3;
    kill 'INT', $s->pid;
    sleep 1;
    ok $s->is_running, 'the first INT waits for the request';
    my $t0 = time;
    kill 'INT', $s->pid;
    is $s->stop( 'CHLD', 10 ), 0, 'the second INT stops the server, exit 0';
    ok time - $t0 < 5, sprintf( 'within %.1fs', time - $t0 );
    like $s->output, qr/Received INT again: stopping the workers now/, 'logged';
    ok wait_gone( 3, @w ), 'no worker left';
};

# The app sets $SIG{TERM} while it answers a request: Perl's handler then
# takes the signal from the server's (on the thread of the interpreter).
my $sig_app = sub {
    my ($tag) = @_;
    write_app(<<"APP");
use strict; use warnings; use Future::AsyncAwait;
async sub {
    my (\$scope, \$receive, \$send) = \@_;
    return if \$scope->{type} eq 'lifespan';
    \$SIG{TERM} = sub { open my \$fh, '>>', "$dir/$tag.\$\$" or die; print \$fh "TERM\\n"; close \$fh };
    await Future::IO->sleep(1) if \$scope->{path} eq '/slow';
    await \$send->({ type => 'http.response.start', status => 200, headers => [] });
    await \$send->({ type => 'http.response.body', body => "pid=\$\$" });
};
APP
};

subtest 'one process: an app that set $SIG{TERM} still stops gracefully' => sub {
    my $s = start_server( $sig_app->('single') );
    is http_request( $s->port, 'GET', '/' )->{status}, 200, 'the app set its handler';
    my $sock = connect_port( $s->port );
    print $sock "GET /slow HTTP/1.1\r\nHost: x\r\n\r\n";
    sleep 0.3;
    kill 'TERM', $s->pid;
    my ($buf) = read_sock( $sock, qr/pid=/, 5 );
    like $buf, qr/^HTTP\/1\.1 200/, 'the in-flight request finished';
    is $s->stop( 'CHLD', 10 ), 0, 'the server stopped by itself, exit 0';
    ok -s "$dir/single." . $s->pid, "the app's handler ran too";
};

subtest 'a worker sent TERM itself, with the app handling TERM, stops gracefully' => sub {
    my $s = start_server( '-w', 2, $sig_app->('worker') );
    my @w = wait_workers( $s->pid, 2, 5 );
    # Reach both workers so that both apps set their handler.
    my %set;
    for ( 1 .. 50 ) {
        my $pid = answering_pid( $s->port );
        $set{$pid} = 1 if $pid;
        last if keys %set == 2;
    }
    my ($victim) = keys %set;
    ok $victim, 'a worker answered' or return diag $s->output;
    kill 'TERM', $victim;
    ok wait_gone( 5, $victim ), 'the worker exited';
    ok -s "$dir/worker.$victim", "its app's handler ran";
    like $s->output, qr/worker \d \(pid \Q$victim\E\) exited unexpectedly \(status 0\)/, 'it stopped cleanly (status 0)';
    is scalar( wait_workers( $s->pid, 2, 5 ) ), 2, 'and the master replaced it';
    is $s->stop('TERM'), 0, 'stops cleanly';
};

done_testing;
