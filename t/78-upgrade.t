# USR2: binary upgrade.  The master runs its binary again, handing over its
# listening socket (PAGI_RS_INHERIT); the new master loads the app afresh
# (new code is picked up), starts its workers, and once they are ready the
# old master retires its own and exits.  No connection is refused on the
# way; the pid file ends up naming the new master.  A new master that
# cannot start leaves the old one serving.  The new master reads the TLS
# files afresh, as HUP does (t/91-tls-renewal.t).
use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;
use PagiRS::Workers;
use File::Temp qw(tempdir);
use Time::HiRes qw(time sleep);
use IO::Socket::SSL;

my $dir = tempdir( CLEANUP => 1 );

sub versioned_app {
    my ( $path, $version ) = @_;
    open my $fh, '>', $path or die "$path: $!";
    print $fh <<"APP";
use strict; use warnings; use Future::AsyncAwait;
async sub {
    my (\$scope, \$receive, \$send) = \@_;
    return if \$scope->{type} eq 'lifespan';
    await \$send->({ type => 'http.response.start', status => 200, headers => [] });
    await \$send->({ type => 'http.response.body', body => "$version" });
};
APP
    close $fh;
}

sub body_of { my ($port) = @_; my $r = eval { http_request( $port, 'GET', '/' ) }; return $r ? $r->{body} : undef }

subtest 'USR2 under load: the new master takes over, nothing refused' => sub {
    my $app = "$dir/app.pl";
    my $pidf = "$dir/server.pid";
    versioned_app( $app, 'v1' );
    my $s = start_server( '-w', 2, '--pid', $pidf, $app );
    my $old = $s->pid;
    is slurp($pidf), "$old\n", 'the pid file names the master';
    my @old_workers = wait_workers( $old, 2, 5 );
    is body_of( $s->port ), 'v1', 'serving v1';
    versioned_app( $app, 'v2' );
    my $wrk = wrk_start( $s->url('/'), 20, 5 );
    sleep 1;
    kill 'USR2', $old;
    ok $s->wait_output( qr/Received USR2: started a new master \(pid (\d+)\)/, 5 ), 'a new master is started';
    my ($new) = $s->output =~ /started a new master \(pid (\d+)\)/;
    ok $s->wait_output( qr/the new master \(pid \Q$new\E\) is serving: retiring this master's workers/, 10 ),
      'it reports ready; the old master retires';
    is $s->stop( 'CHLD', 15 ), 0, 'the old master exits by itself, status 0';
    ok wait_gone( 5, @old_workers ), 'with its workers';
    my $r = wrk_result($wrk);
    ok $r->{requests} > 500, "load ran through the upgrade ($r->{requests} requests)" or diag $r->{text};
    is $r->{socket_errors}{connect}, 0, 'no connection refused';
    is_deeply $r->{socket_errors}, { connect => 0, read => 0, write => 0, timeout => 0 }, 'no socket error at all'
      or diag $r->{text};
    is $r->{non2xx}, 0, 'no error status';
    ok process_alive($new), 'the new master runs';
    is body_of( $s->port ), 'v2', 'serving v2: the app was loaded afresh';
    my @new_workers = wait_workers( $new, 2, 5 );
    is scalar @new_workers, 2, 'the new master has its two workers';
    is slurp($pidf), "$new\n", 'the pid file names the new master';
    my $listening = () = $s->output =~ /listening on http:\/\/127\.0\.0\.1:\d+\//g;
    is $listening, 2, 'the new master announced the same address';
    kill 'TERM', $new;
    ok wait_gone( 10, $new, @new_workers ), 'TERM stops the new master';
    ok !-e $pidf, 'which removes the pid file';
};

subtest 'USR2 whose new master cannot load the app: the old one keeps serving' => sub {
    my $app = "$dir/app2.pl";
    versioned_app( $app, 'good' );
    my $s = start_server( '-w', 2, $app );
    my @w = wait_workers( $s->pid, 2, 5 );
    open my $fh, '>', $app or die;
    print $fh "this is not perl {{{\n";
    close $fh;
    kill 'USR2', $s->pid;
    ok $s->wait_output( qr/the new master \(pid \d+\) (?:exited \(status 1\)|did not start); this master keeps serving/, 10 ),
      'the failed upgrade is logged';
    like $s->output, qr/cannot load the application/, "the new master said why";
    is_deeply [ wait_workers( $s->pid, 2, 2 ) ], [ sort { $a <=> $b } @w ], 'the old workers still serve';
    is body_of( $s->port ), 'good', 'the old code answers';
    is $s->stop('TERM'), 0, 'stops cleanly';
};

subtest 'a renewed TLS certificate: the new master reads the files again' => sub {
    for my $name (qw(first renewed)) {
        my $out = `openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=$name -keyout $dir/$name.key -out $dir/$name.pem 2>&1`;
        die "openssl failed: $out" if $?;
    }
    my $install = sub {
        my ($name) = @_;
        for my $ext (qw(pem key)) {
            open my $in,  '<', "$dir/$name.$ext"   or die;
            open my $out, '>', "$dir/current.$ext" or die;
            print {$out} do { local $/; <$in> };
            close $out;
        }
    };
    my $served = sub {
        my ($port) = @_;
        my $c = IO::Socket::SSL->new( PeerAddr => '127.0.0.1', PeerPort => $port, Timeout => 5,
            SSL_verify_mode => IO::Socket::SSL::SSL_VERIFY_NONE() ) or return "no handshake: $IO::Socket::SSL::SSL_ERROR";
        my $cn = $c->peer_certificate('cn');
        close $c;
        return $cn;
    };
    my $app = "$dir/tls_app.pl";
    versioned_app( $app, 'tls' );
    $install->('first');
    my $s = start_server( '-w', 2, '--ssl-cert', "$dir/current.pem", '--ssl-key', "$dir/current.key", $app );
    wait_workers( $s->pid, 2, 5 );
    is $served->( $s->port ), 'first', 'serving the first certificate';
    $install->('renewed');
    kill 'USR2', $s->pid;
    ok $s->wait_output( qr/the new master \(pid (\d+)\) is serving: retiring this master's workers/, 10 ),
      'USR2: a new master';
    my ($new) = $s->output =~ /the new master \(pid (\d+)\) is serving/;
    is $s->stop( 'CHLD', 15 ), 0, 'the old master exits';
    is $served->( $s->port ), 'renewed', 'the new master serves the renewed certificate';
    kill 'TERM', $new;
    ok wait_gone( 10, $new ), 'TERM stops the new master';
};

done_testing;
