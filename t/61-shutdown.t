use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;
use File::Temp qw(tempdir);
use IO::Socket::INET;
use IO::Select;
use Time::HiRes qw(time sleep);

# Graceful shutdown: in-flight requests finish, the listener closes at once,
# and --shutdown-timeout cuts stragglers (their apps hear server_shutdown).

my $TMP = tempdir( CLEANUP => 1 );

sub wait_for_file {
    my ( $f, $secs ) = @_;
    my $t0 = time;
    while ( time - $t0 < $secs ) {
        return 1 if -s $f;
        sleep 0.02;
    }
    return 0;
}

# Wait for the process to exit without signalling it again.
sub wait_exit {
    my ( $s, $secs ) = @_;
    my $t0 = time;
    while ( time - $t0 < $secs ) {
        return $s->{exit_code} unless $s->is_running;
        sleep 0.02;
    }
    return undef;
}

sub app_source {
    my ( $started, $reason_file ) = @_;
    return <<"PERL";
use strict; use warnings; use Future::AsyncAwait; use Future::IO;
my \$app = async sub {
    my (\$scope, \$receive, \$send) = \@_;
    return if \$scope->{type} eq 'lifespan';
    my (\$secs) = \$scope->{path} =~ m{/sleep/([\\d.]+)};
    if (defined \$secs) {
        \$scope->{'pagi.connection'}->on_disconnect(sub {
            my (\$reason) = \@_;
            open my \$fh, '>', '$reason_file' or die; print \$fh \$reason // 'undef'; close \$fh;
        });
        \$scope->{'pagi.connection'}->on_complete(sub {
            open my \$fh, '>', '$reason_file.complete' or die; print \$fh 'complete'; close \$fh;
        });
        open my \$fh, '>', '$started' or die; print \$fh "started"; close \$fh;
        await Future::IO->sleep(\$secs);
    }
    my \$body = "done:\$scope->{path}";
    await \$send->({type => 'http.response.start', status => 200,
        headers => [['content-type', 'text/plain'], ['content-length', length \$body]]});
    await \$send->({type => 'http.response.body', body => \$body, more => 0});
};
\$app;
PERL
}

subtest 'SIGTERM with a request in flight' => sub {
    my ( $started, $reason ) = ( "$TMP/started-1", "$TMP/reason-1" );
    my $app = write_app( app_source( $started, $reason ), 'inflight.pl' );
    my $s = start_server($app);
    my $port = $s->port;

    my $c = IO::Socket::INET->new( PeerAddr => '127.0.0.1', PeerPort => $port, Proto => 'tcp', Timeout => 5 )
      or return fail("connect: $!");
    my $t_req = time;
    $c->syswrite("GET /sleep/1.5 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n");
    ok wait_for_file( $started, 3 ), 'the app is running the request';

    kill 'TERM', $s->pid;
    my $t_sig = time;
    my $sel = IO::Select->new($c);

    # New connections must be refused while the in-flight request still runs.
    my ( $refused_at, $inflight_answered_before_refusal );
    while ( time - $t_sig < 1.0 ) {
        my $probe = IO::Socket::INET->new( PeerAddr => '127.0.0.1', PeerPort => $port, Proto => 'tcp', Timeout => 0.5 );
        if ( !$probe ) {
            $refused_at = time;
            $inflight_answered_before_refusal = $sel->can_read(0) ? 1 : 0;
            last;
        }
        close $probe;
        sleep 0.03;
    }
    ok defined $refused_at, 'new connections are refused after the signal'
      and diag sprintf( 'refused %.3f s after TERM', $refused_at - $t_sig );
    is $inflight_answered_before_refusal, 0, 'the refusal happened while the in-flight request was still running';

    my $buf = '';
    my $deadline = time + 5;
    while ( time < $deadline ) {
        $sel->can_read( $deadline - time ) or last;
        $c->sysread( $buf, 65536, length $buf ) or last;
    }
    my $res = parse_response($buf) // {};
    is $res->{status}, 200, 'the in-flight request completed with 200';
    is $res->{body}, 'done:/sleep/1.5', 'with its full body';
    ok time - $t_req >= 1.4, 'after its 1.5 s sleep';
    my $code = wait_exit( $s, 10 );
    is $code, 0, 'server exits 0';
    ok !-e $reason, 'on_disconnect did not fire for the completed request'
      or diag 'on_disconnect fired with reason: ' . ( slurp($reason) // '' );
    is slurp("$reason.complete"), 'complete', 'on_complete fired for the completed request';
    like $s->output, qr/Received TERM, shutting down/, 'shutdown logged';
};

subtest 'idle keep-alive connections do not hold up shutdown' => sub {
    my $app = write_app( app_source( "$TMP/started-2", "$TMP/reason-2" ), 'idle.pl' );
    my $s = start_server($app);
    my $c = IO::Socket::INET->new( PeerAddr => '127.0.0.1', PeerPort => $s->port, Proto => 'tcp', Timeout => 5 )
      or return fail("connect: $!");
    $c->syswrite("GET /quick HTTP/1.1\r\nHost: h\r\n\r\n");
    my $buf = '';
    my $sel = IO::Select->new($c);
    my $deadline = time + 5;
    while ( time < $deadline && $buf !~ m{done:/quick\z} ) {
        $sel->can_read( $deadline - time ) or last;
        $c->sysread( $buf, 65536, length $buf ) or last;
    }
    like $buf, qr{done:/quick\z}, 'keep-alive response received; connection left idle';
    my $t0 = time;
    kill 'TERM', $s->pid;
    my $code = wait_exit( $s, 10 );
    is $code, 0, 'exit 0';
    ok time - $t0 < 2, sprintf( 'exited promptly (%.2f s) despite the idle connection and a 30 s shutdown timeout', time - $t0 );
};

subtest '--shutdown-timeout cuts a long request; the app hears server_shutdown' => sub {
    my ( $started, $reason ) = ( "$TMP/started-3", "$TMP/reason-3" );
    my $app = write_app( app_source( $started, $reason ), 'long.pl' );
    my $s = start_server( '--shutdown-timeout', 1, $app );
    my $c = IO::Socket::INET->new( PeerAddr => '127.0.0.1', PeerPort => $s->port, Proto => 'tcp', Timeout => 5 )
      or return fail("connect: $!");
    $c->syswrite("GET /sleep/10 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n");
    ok wait_for_file( $started, 3 ), 'the app is running the 10 s request';

    my $t0 = time;
    kill 'TERM', $s->pid;
    my $code = wait_exit( $s, 8 );
    my $took = time - $t0;
    is $code, 0, 'server exits 0';
    ok $took >= 0.9 && $took < 3.5, sprintf( 'after about the 1 s shutdown timeout (%.2f s)', $took );
    is slurp($reason), 'server_shutdown', "the app's on_disconnect saw reason server_shutdown";
    ok !-e "$reason.complete", 'on_complete did not fire for the cut request';

    my $buf = '';
    my $sel = IO::Select->new($c);
    while ( $sel->can_read(2) ) {
        $c->sysread( $buf, 65536, length $buf ) or last;
    }
    unlike $buf, qr{\AHTTP/1\.1 200}, 'the cut request did not get a 200';
    like $s->output, qr/Shutdown timeout/i, 'the forced close is logged';
};

done_testing;
