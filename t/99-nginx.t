use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;
use PagiRS::WS;
use PagiRS::SSE;
use File::Temp qw(tempdir);
use POSIX qw(WNOHANG);
use Time::HiRes qw(time sleep);

# nginx in front: Debian's nginx as a reverse proxy over a Unix socket to
# pagi-rs, the way the README's deployment section sets it up.  HTTP,
# WebSocket and SSE go through it; pagi-rs believes the proxy's
# X-Forwarded-* headers because the proxy's Unix socket is trusted, and
# ignores the same headers from a TCP client it does not trust.

my $NGINX = -x '/usr/sbin/nginx' ? '/usr/sbin/nginx' : undef;
plan skip_all => 'nginx is not installed (Debian nginx-light; `make test` installs it)' unless $NGINX;

my $dir  = tempdir( CLEANUP => 1 );
my $sock = "$dir/app.sock";

my $app = write_app(<<'APP');
use strict; use warnings; use Future::AsyncAwait; use Future::IO;
sub facts {
    my ($scope) = @_;
    my ($host) = map { $_->[1] } grep { $_->[0] eq 'host' } @{ $scope->{headers} };
    my $client = $scope->{client} ? join(':', map { $_ // '' } @{ $scope->{client} }) : '-';
    my $server = $scope->{server} ? join(':', map { $_ // 'undef' } @{ $scope->{server} }) : '-';
    return "client=$client scheme=$scope->{scheme} host=" . ($host // '-') . " server=$server";
}
my $app = async sub {
    my ($scope, $receive, $send) = @_;
    return if $scope->{type} eq 'lifespan';
    if ($scope->{type} eq 'websocket') {
        await $receive->();
        await $send->({ type => 'websocket.accept' });
        await $send->({ type => 'websocket.send', text => facts($scope) });
        while (1) {
            my $ev = await $receive->();
            last if $ev->{type} eq 'websocket.disconnect';
            await $send->({ type => 'websocket.send', text => "echo $ev->{text}" });
        }
        return;
    }
    if ($scope->{type} eq 'sse') {
        await $send->({ type => 'sse.start', status => 200 });
        await $send->({ type => 'sse.send', data => facts($scope) });
        for my $n (1 .. 3) {
            await Future::IO->sleep(0.3);
            await $send->({ type => 'sse.send', event => 'tick', data => $n });
        }
        return;
    }
    my $body = facts($scope);
    await $send->({ type => 'http.response.start', status => 200,
        headers => [['content-type', 'text/plain'], ['content-length', length $body]] });
    await $send->({ type => 'http.response.body', body => $body });
};
$app;
APP

my $direct_port = free_port();
my $s = start_server(
    '--no-access-log',
    '--listen', "unix:$sock",
    '--listen', "127.0.0.1:$direct_port",
    '--proxy-headers', '--forwarded-allow-ips', 'unix:',
    $app
);
ok -S $sock, 'pagi-rs listens on its Unix socket';

# nginx as the test's own unprivileged single process: no master, no
# daemon, every path in the temporary directory.
my $nginx_port = free_port();
mkdir "$dir/$_" for qw(body proxy fastcgi uwsgi scgi);
open my $conf, '>', "$dir/nginx.conf" or die $!;
print $conf <<"CONF";
daemon off;
master_process off;
pid $dir/nginx.pid;
error_log $dir/nginx-error.log info;
events { worker_connections 256; }
http {
    access_log off;
    client_body_temp_path $dir/body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fastcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;
    map \$http_upgrade \$connection_upgrade { default upgrade; '' close; }
    upstream pagi { server unix:$sock; }
    server {
        listen 127.0.0.1:$nginx_port;
        location / {
            proxy_pass http://pagi;
            proxy_http_version 1.1;
            proxy_set_header Host backend.internal;
            proxy_set_header X-Forwarded-Host \$http_host;
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
            # As a proxy that terminates TLS would say.
            proxy_set_header X-Forwarded-Proto https;
            proxy_set_header Upgrade \$http_upgrade;
            proxy_set_header Connection \$connection_upgrade;
            proxy_buffering off;
            proxy_read_timeout 30s;
        }
    }
}
CONF
close $conf;

my $nginx = fork // die "fork: $!";
if ( !$nginx ) {
    open STDERR, '>>', "$dir/nginx-stderr.log";
    exec( $NGINX, '-p', $dir, '-c', "$dir/nginx.conf" ) or POSIX::_exit(127);
}
my $deadline = time + 10;
sleep 0.05 until port_listening($nginx_port) || time > $deadline || waitpid( $nginx, WNOHANG ) == $nginx;
ok port_listening($nginx_port), 'nginx started'
  or diag slurp("$dir/nginx-error.log") . slurp("$dir/nginx-stderr.log");

subtest 'HTTP through nginx: the proxy is trusted' => sub {
    my $r = http_request( $nginx_port, 'GET', '/', headers => [ [ 'X-Forwarded-For', '203.0.113.7' ] ] );
    is $r->{status}, 200, 'served';
    # nginx appended the address it saw (127.0.0.1) to the client's own
    # claim: the rightmost untrusted entry is the client.
    like $r->{body}, qr/^client=127\.0\.0\.1:\d+ /, 'client is the address nginx saw, not the forged claim';
    like $r->{body}, qr/ scheme=https /, 'scheme from X-Forwarded-Proto';
    like $r->{body}, qr/ host=127\.0\.0\.1:$nginx_port /, 'host from X-Forwarded-Host';
    like $r->{body}, qr/ server=\Q$sock\E:undef$/, 'server is the Unix socket path';
};

subtest 'WebSocket through nginx' => sub {
    my $ws = PagiRS::WS->connect( $nginx_port, path => '/ws' );
    ok $ws->upgraded, 'upgraded through the proxy' or return;
    my $facts = $ws->recv_message;
    like $facts->{data}, qr/ scheme=wss /, 'scheme wss from X-Forwarded-Proto https';
    $ws->send_text("m$_") for 1 .. 3;
    is join( ',', map { $ws->recv_message->{data} } 1 .. 3 ), 'echo m1,echo m2,echo m3', 'messages echo';
    $ws->close;
    ok $ws->wait_close, 'closing handshake completes';
};

subtest 'SSE through nginx streams event by event' => sub {
    my $t0  = time;
    my $sse = PagiRS::SSE->open( $nginx_port, '/events' );
    is $sse->status, 200, 'stream opened';
    my $facts = $sse->next_event;
    like $facts->{data}, qr/ scheme=https /, 'the SSE scope sees the forwarded scheme';
    my $first = $sse->next_event;
    is $first->{data}, 1, 'first tick';
    cmp_ok time - $t0, '<', 0.9, 'the first tick came before the app had sent the last (not buffered)';
    is join( ',', map { $sse->next_event->{data} } 1 .. 2 ), '2,3', 'the rest follow';
};

subtest 'forged headers from an untrusted peer are ignored' => sub {
    my $r = http_request(
        $direct_port, 'GET', '/',
        headers => [
            [ 'X-Forwarded-For',   '203.0.113.7' ],
            [ 'X-Forwarded-Proto', 'https' ],
            [ 'X-Forwarded-Host',  'evil.example' ],
        ]
    );
    is $r->{status}, 200, 'served directly';
    like $r->{body}, qr/^client=127\.0\.0\.1:\d+ scheme=http host=127\.0\.0\.1:$direct_port /,
      'client, scheme and host are the connection\'s own';
};

kill 'QUIT', $nginx;
waitpid $nginx, 0;
is $s->stop('TERM'), 0, 'pagi-rs exits 0';
ok !-e $sock, 'the socket file is gone';

done_testing;
