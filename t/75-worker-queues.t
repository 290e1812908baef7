# --reuseport with workers: each worker accepts from a listening socket of
# its own (an accept queue the kernel fills by a hash of the connection),
# where without it every worker accepts from the one socket the master
# bound.  The master binds and holds the queues: a replacement worker takes
# over its slot's queue, a queue whose slot will have no worker soon
# (TTOU, failed lifespan startup, a crash loop's delay) is closed so that
# nothing waits in it, and USR2 hands every queue to the new master.  Unix
# sockets stay shared.
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

# Socket inodes of the TCP sockets listening on 127.0.0.1:$port.
sub listening_inodes {
    my ($port) = @_;
    my $want = sprintf '0100007F:%04X', $port;
    open my $fh, '<', '/proc/net/tcp' or die "/proc/net/tcp: $!";
    my @inodes;
    while ( my $line = <$fh> ) {
        my @f = split ' ', $line;
        push @inodes, $f[9] if ( $f[1] // '' ) eq $want && ( $f[3] // '' ) eq '0A';
    }
    @inodes = sort { $a <=> $b } @inodes;
    return @inodes;
}

# Which of @inodes process $pid holds open.
sub held_by {
    my ( $pid, @inodes ) = @_;
    my %want = map { $_ => 1 } @inodes;
    my %held;
    for my $fd ( glob "/proc/$pid/fd/*" ) {
        my $target = readlink($fd) // next;
        $held{$1} = 1 if $target =~ /^socket:\[(\d+)\]$/ && $want{$1};
    }
    my @held = sort { $a <=> $b } keys %held;
    return @held;
}

# Wait until $check->() is true; true if it became so within $timeout.
sub eventually {
    my ( $timeout, $check ) = @_;
    my $deadline = time + $timeout;
    while ( time < $deadline ) {
        return 1 if $check->();
        sleep 0.05;
    }
    return $check->();
}

# $n requests, each on a fresh connection (so each lands in the queue its
# source port hashes to), answered within $timeout seconds each:
# { answered => { pid => count }, failed => count }.
sub spread {
    my ( $port, $n, $timeout ) = @_;
    my %r = ( answered => {}, failed => 0 );
    for ( 1 .. $n ) {
        my $res = eval { http_request( $port, 'GET', '/', timeout => $timeout // 3 ) };
        if ( $res && ( $res->{status} // 0 ) == 200 && ( $res->{body} // '' ) =~ /^pid=(\d+)$/ ) {
            $r{answered}{$1}++;
        }
        else { $r{failed}++ }
    }
    return \%r;
}

# The inode each worker accepts from: { pid => [inodes] }.
sub queues_of {
    my ( $master, $port ) = @_;
    my @inodes = listening_inodes($port);
    return { map { $_ => [ held_by( $_, @inodes ) ] } children($master) };
}

subtest 'two workers, two accept queues at one address' => sub {
    my $s = start_server( '-w', 2, '--reuseport', pid_app() );
    my @w = wait_workers( $s->pid, 2, 5 );
    is scalar @w, 2, 'two workers';
    ok $s->wait_output( qr/--reuseport: each worker accepts from an accept queue of its own/, 2 ),
      'the master says so';
    my @inodes = listening_inodes( $s->port );
    is scalar @inodes, 2, 'two sockets listen on the port';
    is_deeply [ held_by( $s->pid, @inodes ) ], \@inodes, 'the master holds both';
    my @mine = map { [ held_by( $_, @inodes ) ] } @w;
    is scalar @{ $mine[0] }, 1, 'worker 1 holds one of them';
    is scalar @{ $mine[1] }, 1, 'worker 2 holds one of them';
    isnt $mine[0][0], $mine[1][0], '... not the same one';
    my $r = spread( $s->port, 40 );
    is $r->{failed}, 0, '40 requests on fresh connections, all answered';
    is_deeply [ sort keys %{ $r->{answered} } ], [ sort @w ], 'both workers answered some'
      or diag explain $r;
    is $s->stop('TERM'), 0, 'stops cleanly';
};

subtest 'without --reuseport the workers share one socket' => sub {
    my $s = start_server( '-w', 2, pid_app() );
    my @w = wait_workers( $s->pid, 2, 5 );
    my @inodes = listening_inodes( $s->port );
    is scalar @inodes, 1, 'one socket listens on the port';
    is_deeply [ held_by( $_, @inodes ) ], \@inodes, "worker $_ holds it" for @w;
    unlike $s->output, qr/accept queue of its own/, 'and no word of queues';
    is $s->stop('TERM'), 0, 'stops cleanly';
};

subtest 'a worker killed: its replacement takes over its queue and what waits in it' => sub {
    my $s = start_server( '-w', 2, '--reuseport', pid_app() );
    my @w = wait_workers( $s->pid, 2, 5 );
    my $before = queues_of( $s->pid, $s->port );
    my $victim = $w[0];
    my $queue  = $before->{$victim}[0];
    kill 'STOP', $victim;
    # Connections the kernel puts in the stopped worker's queue wait there.
    my @socks;
    for ( 1 .. 24 ) {
        my $sock = connect_port( $s->port );
        $sock->syswrite( "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" );
        push @socks, $sock;
    }
    kill 'KILL', $victim;
    kill 'CONT', $victim;
    my @after = wait_workers( $s->pid, 2, 5, sub { !grep { $_ == $victim } @_ } );
    is scalar @after, 2, 'the master started a replacement';
    my ($new) = grep { $_ != $w[1] } @after;
    ok eventually( 5, sub { ( held_by( $new, $queue ) )[0] } ), 'the replacement accepts from the same socket';
    my ( $answered, $failed ) = ( 0, 0 );
    for my $sock (@socks) {
        my ($buf) = PagiRS::Test::read_sock( $sock, undef, 5 );
        ( defined $buf && $buf =~ m{^HTTP/1\.1 200} ) ? $answered++ : $failed++;
    }
    # The killed worker may have accepted some before it stopped (its own
    # in-flight requests); what waited in the queue is served.
    ok $answered >= 12, "connections made while it was stopped are answered ($answered of 24, $failed lost)";
    is scalar listening_inodes( $s->port ), 2, 'still two sockets';
    is $s->stop('TERM'), 0, 'stops cleanly';
};

subtest 'TTOU closes the removed worker\'s queue; TTIN binds one again' => sub {
    my $s = start_server( '-w', 2, '--reuseport', pid_app() );
    my @w = wait_workers( $s->pid, 2, 5 );
    kill 'TTOU', $s->pid;
    ok scalar wait_workers( $s->pid, 1, 10 ), 'one worker left';
    ok eventually( 5, sub { listening_inodes( $s->port ) == 1 } ), 'one socket listens';
    my $r = spread( $s->port, 30 );
    is $r->{failed}, 0, '30 requests on fresh connections, all answered';
    kill 'TTIN', $s->pid;
    my @two = wait_workers( $s->pid, 2, 10 );
    is scalar @two, 2, 'two workers again';
    ok eventually( 5, sub { listening_inodes( $s->port ) == 2 } ), 'two sockets listen again';
    my $q = queues_of( $s->pid, $s->port );
    my %distinct = map { ( $q->{$_}[0] // 'none' ) => 1 } @two;
    is scalar keys %distinct, 2, 'each worker on its own';
    $r = spread( $s->port, 30 );
    is $r->{failed}, 0, '30 more, all answered';
    is $s->stop('TERM'), 0, 'stops cleanly';
};

subtest 'a worker that fails lifespan startup: its queue is closed' => sub {
    my $app = pid_app( lifespan => q{
        if ( ( $scope->{pagi}{worker_num} // 0 ) == 2 ) {
            await $send->({ type => 'lifespan.startup.failed', message => 'worker 2 cannot start' });
            next;
        }
    } );
    my $s = start_server( '-w', 2, '--reuseport', $app );
    ok $s->wait_output( qr/worker 2 \(pid \d+\) failed lifespan startup; not starting it again/, 5 ),
      'worker 2 fails and is not started again';
    ok eventually( 5, sub { listening_inodes( $s->port ) == 1 } ), 'its socket is closed: one listens';
    my $r = spread( $s->port, 30, 2 );
    is $r->{failed}, 0, '30 requests on fresh connections: none waits for a worker that will not come';
    is $s->stop('TERM'), 0, 'stops cleanly';
};

subtest "a crash loop's delay: the slot's queue is closed meanwhile" => sub {
    my $app = pid_app( lifespan => q{
        POSIX::_exit(3) if ( $scope->{pagi}{worker_num} // 0 ) == 2;
    }, top => 'use POSIX ();' );
    # Worker 2 never becomes ready, so the startup line never comes.
    my $s = start_on_port( free_port(), '-w', 2, '--reuseport', $app );
    ok $s->wait_output( qr/worker 2 \(pid \d+\) exited \(status 3\) 5 times in a row .* next start in 4\.0s/, 20 ),
      'worker 2 crash-loops; its next start is 4 s away';
    ok eventually( 1, sub { listening_inodes( $s->port ) == 1 } ), 'its socket is closed: one listens';
    my $r = spread( $s->port, 20, 1.5 );
    is $r->{failed}, 0, '20 requests on fresh connections during the delay: all answered at once';
    is $s->stop('TERM'), 0, 'stops cleanly';
};

subtest 'a Unix socket stays shared; the TCP port gets queues' => sub {
    my $path = "$dir/q.sock";
    my $s = start_server( '-w', 2, '--reuseport', '--listen', '127.0.0.1:0', '--listen', "unix:$path", pid_app() );
    my $port = $s->port;
    my @w = wait_workers( $s->pid, 2, 5 );
    is scalar listening_inodes($port), 2, 'two sockets on the TCP port';
    my ($unix_inode) = map { ( split ' ' )[6] } grep { /\Q$path\E$/ } do {
        open my $fh, '<', '/proc/net/unix' or die $!;
        <$fh>;
    };
    ok $unix_inode, 'the Unix socket is listed';
    is_deeply [ held_by( $_, $unix_inode ) ], [$unix_inode], "worker $_ accepts from the Unix socket" for @w;
    my $res = http_request( "unix:$path", 'GET', '/' );
    is $res->{status}, 200, 'served over the Unix socket';
    is $s->stop('TERM'), 0, 'stops cleanly';
};

subtest 'USR2: the new master takes over every queue' => sub {
    my $s = start_server( '-w', 2, '--reuseport', pid_app() );
    my @old_workers = wait_workers( $s->pid, 2, 5 );
    my @inodes = listening_inodes( $s->port );
    is scalar @inodes, 2, 'two sockets';
    my $wrk = wrk_start( $s->url('/'), 20, 4 );
    sleep 1;
    kill 'USR2', $s->pid;
    ok $s->wait_output( qr/the new master \(pid (\d+)\) is serving/, 15 ), 'the new master serves';
    my ($new) = $s->output =~ /the new master \(pid (\d+)\) is serving/;
    is $s->stop( 'CHLD', 15 ), 0, 'the old master exits by itself';
    my $r = wrk_result($wrk);
    ok $r->{requests} > 200, "load ran through the upgrade ($r->{requests} requests)" or diag $r->{text};
    is_deeply $r->{socket_errors}, { connect => 0, read => 0, write => 0, timeout => 0 },
      'no socket error: no queue was closed under the load' or diag $r->{text};
    my @new_workers = wait_workers( $new, 2, 5 );
    is_deeply [ listening_inodes( $s->port ) ], \@inodes, 'the same two sockets listen';
    my %held = map { ( held_by( $_, @inodes ) )[0] // 'none' => 1 } @new_workers;
    is_deeply [ sort keys %held ], \@inodes, "the new master's workers accept from one each";
    kill 'TERM', $new;
    ok wait_gone( 10, $new, @new_workers ), 'TERM stops the new master';
};

subtest '--user on a privileged port: queues bound as root; one that cannot be bound again is shared' => sub {
    plan skip_all => 'needs root' if $> != 0;
    my $app  = readable_by_anyone( pid_app() );
    my $port = free_privileged_port();
    my $s = start_on_port( $port, '-w', 2, '--reuseport', '--user', 'nobody', $app );
    ok $s, "started on port $port" or return;
    my @w = wait_workers( $s->pid, 2, 5 );
    is scalar listening_inodes($port), 2, 'two sockets on a port below 1024: bound before the drop';
    # As nobody, the master can neither bind a privileged port nor join
    # root's sockets: the slot TTOU removed shares the queue left.
    kill 'TTOU', $s->pid;
    ok eventually( 5, sub { listening_inodes($port) == 1 } ), 'TTOU: one socket';
    kill 'TTIN', $s->pid;
    my @two = wait_workers( $s->pid, 2, 10 );
    is scalar @two, 2, 'TTIN: two workers';
    ok $s->wait_output( qr/worker 2 shares another worker's accept queue: cannot bind its own/, 5 ),
      'the new one shares, saying why';
    is scalar listening_inodes($port), 1, 'still one socket';
    my $r = spread( $port, 30 );
    is $r->{failed}, 0, '30 requests on fresh connections, all answered';
    is scalar keys %{ $r->{answered} }, 2, 'by both workers';
    is $s->stop('TERM'), 0, 'stops cleanly';
};

done_testing;
