# A renewed TLS certificate is taken up on HUP, as with `systemctl reload`
# from certbot's deploy hook: with workers, the master reads the files again
# before it forks the new ones; in a single process, the connections that
# follow use it.  Files that cannot be used (a renewal half done, a key gone)
# are an error in the log, and the certificate in force stays: the server
# never ends up without one.  (USR2 reads the files too: t/78-upgrade.t.)
use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;
use PagiRS::Workers;
use File::Copy qw(copy);
use File::Temp qw(tempdir);
use IO::Socket::SSL;

my $dir = tempdir( CLEANUP => 1 );
for my $name (qw(first renewed)) {
    my $out = `openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=$name -keyout $dir/$name.key -out $dir/$name.pem 2>&1`;
    die "openssl failed: $out" if $?;
}

# Put certificate $cert and key $key (names above) where the server reads them.
sub install {
    my ( $cert, $key ) = @_;
    copy( "$dir/$cert.pem", "$dir/current.pem" ) or die "copy: $!";
    copy( "$dir/$key.key",  "$dir/current.key" ) or die "copy: $!";
}

# A new TLS connection: the common name of the certificate it was served.
sub served_name {
    my ($port) = @_;
    my $c = IO::Socket::SSL->new( PeerAddr => '127.0.0.1', PeerPort => $port, Timeout => 5,
        SSL_verify_mode => SSL_VERIFY_NONE ) or return "no handshake: $IO::Socket::SSL::SSL_ERROR";
    my $cn = $c->peer_certificate('cn');
    close $c;
    return $cn;
}

# One request on an open TLS connection (kept alive): the body, or undef
# (an error, or no whole response within 5 s).
sub ask {
    my ($c) = @_;
    print {$c} "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n" or return undef;
    my $response = '';
    local $SIG{ALRM} = sub { die "timed out\n" };
    alarm 5;
    my $whole = eval {
        while ( $response !~ /\r\n\r\n(.*)\z/s || length($1) < 2 ) {
            sysread( $c, my $buf, 4096 ) or die "closed\n";
            $response .= $buf;
        }
        1;
    };
    alarm 0;
    return $whole ? ( split /\r\n\r\n/, $response, 2 )[1] : undef;
}

my $app = write_app(<<'APP');
use strict; use warnings; use Future::AsyncAwait;
async sub {
    my ($scope, $receive, $send) = @_;
    return if $scope->{type} eq 'lifespan';
    await $send->({ type => 'http.response.start', status => 200, headers => [['content-length', 2]] });
    await $send->({ type => 'http.response.body', body => 'ok' });
};
APP
my @tls = ( '--ssl-cert', "$dir/current.pem", '--ssl-key', "$dir/current.key" );
my $reloaded = qr/Received HUP: TLS certificate reloaded \(CN=(\w+), valid until 20\d\d-[^)]*\); /;
my $refused  = qr/Received HUP: TLS certificate not reloaded, the one in force stays \(CN=(\w+), [^)]*\): (.*)/;

subtest 'workers: HUP forks the new ones with the renewed certificate' => sub {
    install(qw(first first));
    my $s = start_server( '-w', 2, @tls, $app );
    wait_workers( $s->pid, 2, 5 );
    is served_name( $s->port ), 'first', 'serving the first certificate';

    # A renewal half done: the new certificate is there, its key is not.
    install(qw(renewed first));
    my @old = worker_pids( $s->pid );
    is scalar @old, 2, "two workers before the HUP";
    kill 'HUP', $s->pid;
    ok $s->wait_output( qr/HUP: the new workers are ready; the old ones retire/, 10 ), 'the workers restart anyway';
    ok wait_gone( 10, @old ), 'the old ones are gone';
    my ( $kept, $why ) = $s->output =~ $refused;
    is $kept, 'first', 'the log says the files were not used and which certificate stays';
    like $why, qr{--ssl-key \Q$dir\E/current\.key does not match the certificate in --ssl-cert}, 'and why';
    unlike $s->output, $reloaded, 'nothing was reloaded';
    is served_name( $s->port ), 'first', 'the new workers serve the certificate in force';

    install(qw(renewed renewed));
    @old = worker_pids( $s->pid );
    is scalar @old, 2, "two workers before the second HUP";
    kill 'HUP', $s->pid;
    ok $s->wait_output( qr/(?:the new workers are ready.*){2}/s, 10 ), 'the second HUP restarts the workers';
    ok wait_gone( 10, @old ), 'the old ones are gone';
    my ($name) = $s->output =~ $reloaded;
    is $name, 'renewed', 'the log names the renewed certificate';
    like $s->output, qr/TLS certificate reloaded \([^)]*\); the new workers use it/, 'and who uses it';
    is served_name( $s->port ), 'renewed', 'the new workers serve it';
    is $s->stop( 'TERM', 15 ), 0, 'stops cleanly';
};

subtest 'one process: HUP puts the renewed certificate in force for the connections that follow' => sub {
    install(qw(first first));
    my $s = start_server( @tls, $app );
    my $open = IO::Socket::SSL->new( PeerAddr => '127.0.0.1', PeerPort => $s->port, Timeout => 5,
        SSL_verify_mode => SSL_VERIFY_NONE ) or die "connect: $IO::Socket::SSL::SSL_ERROR";
    is ask($open), 'ok', 'a kept-alive connection before the renewal';

    install(qw(renewed renewed));
    unlink "$dir/current.key";    # the key not yet in place
    kill 'HUP', $s->pid;
    ok $s->wait_output( $refused, 5 ), 'a key that cannot be read is refused';
    my ( $kept, $why ) = $s->output =~ $refused;
    is $kept, 'first', 'the certificate in force stays';
    like $why, qr{--ssl-key \Q$dir\E/current\.key: cannot read the file}, 'the log says which file and why';
    is served_name( $s->port ), 'first', 'new connections still get it';

    install(qw(renewed renewed));
    kill 'HUP', $s->pid;
    ok $s->wait_output( $reloaded, 5 ), 'the renewed files are read';
    like $s->output, qr/TLS certificate reloaded \(CN=renewed, [^)]*\); the next connections use it/,
      'the log names it and who uses it';
    is served_name( $s->port ), 'renewed', 'a new connection gets the renewed certificate';
    is $open->peer_certificate('cn'), 'first', 'the open connection keeps the one it was accepted with';
    is ask($open), 'ok', 'and goes on serving requests';
    close $open;
    is $s->stop( 'TERM', 15 ), 0, 'stops cleanly';
};

subtest 'one process without TLS: HUP is logged and ignored' => sub {
    my $s = start_server($app);
    kill 'HUP', $s->pid;
    ok $s->wait_output( qr/Received HUP: ignored \(restarts and upgrades need --workers 2 or more\)/, 5 ),
      'the log says why';
    my $r = http_request( $s->port, 'GET', '/' );
    is $r->{body}, 'ok', 'still serving';
    is $s->stop( 'TERM', 15 ), 0, 'stops cleanly';
};

done_testing;
