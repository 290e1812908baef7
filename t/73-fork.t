use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;
use File::Temp qw(tempdir);
use IO::Socket::INET;
use Time::HiRes qw(time sleep);

# Fork in the app: the exit guard (exit in app code becomes an exception, so
# that an app cannot end the server) applies to the server's own process
# only.  A child the app forks ends when it calls exit, as a forked perl
# would (its Perl handles flushed, its status kept); a double-forked daemon
# exits too; and no forked process keeps the server's port.

my $dir = tempdir( CLEANUP => 1 );

my $app_src = <<'APP';
use strict; use warnings; use Future::AsyncAwait; use Future::IO; use POSIX ();
my $dir = '__DIR__';

# Wait for a child without blocking the loop: its exit status, or 'running'.
async sub reap {
    my ($pid) = @_;
    for my $try (1 .. 100) {
        my $r = waitpid($pid, POSIX::WNOHANG());
        return 'exited ' . ($? >> 8) if $r == $pid;
        await Future::IO->sleep(0.05);
    }
    return 'running';
}
sub spit { my ($file, $text) = @_; open my $fh, '>', "$dir/$file" or return; print $fh $text; close $fh }

my %h;
$h{'/fork-exit'} = async sub {
    my $pid = fork // die "fork: $!";
    if (!$pid) {
        # A package handle: only the exit's cleanup flushes and closes it.
        open our $CHILD_LOG, '>', "$dir/child.log" or POSIX::_exit(99);
        print $CHILD_LOG "child $$ wrote this";
        exit 7;
    }
    return "child $pid: " . await reap($pid);
};
$h{'/daemon'} = async sub {
    my ($query) = @_;
    my ($linger) = $query =~ /linger=([\d.]+)/;
    my $pid = fork // die "fork: $!";
    if (!$pid) {
        my $daemon = fork // POSIX::_exit(98);
        if (!$daemon) {
            spit("daemon.pid", $$);
            select(undef, undef, undef, $linger);    # works a while, then exits
            spit("daemon.done", 'done');
            exit 0;
        }
        exit 0;
    }
    return "child $pid: " . await reap($pid);
};
$h{'/exit'} = async sub { exit 3 };
$h{'/'} = async sub { "pid $$" };

my $app = async sub {
    my ($scope, $receive, $send) = @_;
    return if $scope->{type} eq 'lifespan';
    my $handler = $h{$scope->{path}} or die "no route";
    my $body = await $handler->($scope->{query_string});
    await $send->({ type => 'http.response.start', status => 200,
        headers => [['content-type', 'text/plain'], ['content-length', length $body]] });
    await $send->({ type => 'http.response.body', body => $body });
};
$app;
APP
$app_src =~ s/__DIR__/$dir/g;
my $app = write_app($app_src);

# One request, read until its Content-Length is in: a forked process may
# hold a copy of the connection, so the close can come late.
sub get {
    my ( $port, $path ) = @_;
    my $sock = connect_port($port);
    $sock->syswrite("GET $path HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    my $buf      = '';
    my $deadline = time + 10;
    while (1) {
        my $res = parse_response($buf);
        return $res if $res && !$res->{incomplete} && $res->{headers}{'content-length'};
        my $n = read_some( $sock, \$buf, $deadline );
        return parse_response($buf) // { status => 0, body => '' } unless $n;
    }
}

sub alive {
    my ($pid) = @_;
    return 0 unless $pid && kill 0, $pid;
    # A zombie (exited, not yet reaped by whoever adopted it) is not running.
    open my $fh, '<', "/proc/$pid/stat" or return 0;
    my ($state) = ( <$fh> // '' ) =~ /^\d+ \(.*\) (\S)/;
    return ( $state // 'Z' ) ne 'Z';
}

sub wait_gone {
    my ( $pid, $timeout ) = @_;
    my $deadline = time + $timeout;
    while ( alive($pid) ) {
        return 0 if time > $deadline;
        sleep 0.05;
    }
    return 1;
}

sub port_free {
    my ($port) = @_;
    my $s = IO::Socket::INET->new( LocalAddr => '127.0.0.1', LocalPort => $port, Listen => 1, ReuseAddr => 1 );
    return $s ? 1 : 0;
}

my @strays;    # processes a failing server left behind: killed at the end
END { kill 'KILL', grep { alive($_) } @strays }

subtest 'a child that calls exit exits, with its status, its handles flushed' => sub {
    my $s   = start_server($app);
    my $res = http_request( $s->port, 'GET', '/fork-exit', timeout => 10 );
    my ($child, $outcome) = ( $res->{body} // '' ) =~ /^child (\d+): (.*)$/;
    push @strays, $child if $child;
    is $outcome, 'exited 7', 'the child exited with its status';
    is slurp("$dir/child.log"), "child $child wrote this", "what it printed reached its file";
    ok !alive($child), 'and it is gone';
    my $again = http_request( $s->port, 'GET', '/' );
    is $again->{body}, 'pid ' . $s->pid, 'the server serves on';
    is http_request( $s->port, 'GET', '/exit' )->{status}, 500, "exit in the server's own process is still an error";
    ok $s->is_running, 'and does not end it';
    is $s->stop('TERM'), 0, 'server exits 0';
    ok port_free( $s->port ), 'the port is free';
};

subtest 'a double-forked daemon exits when it is done' => sub {
    my $s    = start_server($app);
    my $port = $s->port;
    unlink "$dir/daemon.pid", "$dir/daemon.done";
    my $res = get( $port, '/daemon?linger=0.3' );
    push @strays, ( $res->{body} // '' ) =~ /^child (\d+)/;
    like $res->{body}, qr/^child \d+: exited 0$/, 'the intermediate child exited';
    ok wait_file_line( "$dir/daemon.done", qr/done/, 5 ), 'the daemon did its work';
    my ($daemon) = slurp("$dir/daemon.pid") =~ /(\d+)/;
    push @strays, $daemon if $daemon;
    ok wait_gone( $daemon, 5 ), 'and exited';
    is $s->stop('TERM'), 0, 'server exits 0';
    ok port_free($port), 'after the server stops the port is free';
    ok !alive($daemon), 'and no child is left running';
};

subtest 'a daemon that outlives the server does not keep its port' => sub {
    my $s    = start_server($app);
    my $port = $s->port;
    unlink "$dir/daemon.pid", "$dir/daemon.done";
    my $res = get( $port, '/daemon?linger=30' );
    push @strays, ( $res->{body} // '' ) =~ /^child (\d+)/;
    like $res->{body}, qr/^child \d+: exited 0$/, 'the intermediate child exited';
    ok wait_file_line( "$dir/daemon.pid", qr/\d/, 5 ), 'the daemon runs';
    my ($daemon) = slurp("$dir/daemon.pid") =~ /(\d+)/;
    push @strays, $daemon if $daemon;
    is $s->stop('TERM'), 0, 'server exits 0';
    ok alive($daemon), 'the daemon still runs';
    ok port_free($port), 'yet the port is free: forked processes do not hold the listening socket';
    kill 'KILL', $daemon;
    ok wait_gone( $daemon, 5 ), 'daemon killed';
};

done_testing;
