use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;
use PagiRS::WS;
use PagiRS::SSE;
use File::Temp qw(tempdir tempfile);
use Fcntl qw(F_DUPFD S_IMODE);
use IO::Socket::INET;
use IO::Socket::IP;
use IO::Socket::UNIX;
use JSON::PP;
use POSIX ();
use Socket qw(SOCK_STREAM);
use Time::HiRes qw(time sleep);

# Listeners: --socket and --socket-mode, repeatable --listen (TCP, IPv6,
# Unix), --reuseport, -b/--listener-backlog, and systemd socket activation
# (LISTEN_FDS/LISTEN_PID), each over real sockets against the real binary.
# On a Unix socket the scope has no client and its server is [path, undef];
# the access log names the peer "unix".

my $dir = tempdir( CLEANUP => 1 );

my $app = write_app( <<'PERL', 'listeners.pl' );
use strict; use warnings; use Future::AsyncAwait; use JSON::PP ();
my $json = JSON::PP->new->canonical->allow_nonref;
sub facts {
    my ($scope) = @_;
    my $child = `sh -c 'echo "\${LISTEN_FDS-unset} \${LISTEN_PID-unset} \${LISTEN_FDNAMES-unset}"'`;
    chomp $child;
    return {
        has_client => exists $scope->{client} ? 1 : 0,
        client     => $scope->{client},
        server     => $scope->{server},
        scheme     => $scope->{scheme},
        http_version => $scope->{http_version},
        pid        => $$,
        env        => join(' ', map { $ENV{$_} // 'unset' } qw(LISTEN_FDS LISTEN_PID LISTEN_FDNAMES)),
        child_env  => $child,
    };
}
async sub {
    my ($scope, $receive, $send) = @_;
    return if $scope->{type} eq 'lifespan';
    if ($scope->{type} eq 'websocket') {
        my $ev = await $receive->();
        await $send->({ type => 'websocket.accept' });
        await $send->({ type => 'websocket.send', text => $json->encode(facts($scope)) });
        while (1) {
            my $m = await $receive->();
            last if $m->{type} eq 'websocket.disconnect';
            await $send->({ type => 'websocket.send', text => "echo: $m->{text}" });
        }
        return;
    }
    if ($scope->{type} eq 'sse') {
        await $send->({ type => 'sse.start' });
        await $send->({ type => 'sse.send', event => 'facts', data => $json->encode(facts($scope)) });
        await $send->({ type => 'sse.send', data => 'second' });
        await $send->({ type => 'sse.close' });
        return;
    }
    my $body = $json->encode(facts($scope));
    await $send->({ type => 'http.response.start', status => 200,
        headers => [['content-type', 'application/json'], ['content-length', length $body]] });
    await $send->({ type => 'http.response.body', body => $body });
}
PERL

# An app whose lifespan startup fails: the server exits after binding.
my $failing = write_app( <<'PERL', 'failing.pl' );
use Future::AsyncAwait;
async sub {
    my ($scope, $receive, $send) = @_;
    if ($scope->{type} eq 'lifespan') {
        await $receive->();
        await $send->({ type => 'lifespan.startup.failed', message => 'no database' });
        return;
    }
}
PERL

sub facts_of {
    my ($res) = @_;
    return eval { decode_json( $res->{body} ) } // { error => $res->{body} // 'no response' };
}

sub get_facts { facts_of( http_request( $_[0], 'GET', $_[1] // '/' ) ) }

sub mode_of { my @st = lstat $_[0] or return undef; S_IMODE( $st[2] ) }

# Whether some process still has a listening Unix socket bound to $path
# (ss lists it by name even once the file is gone).
sub unix_listening {
    my ($path) = @_;
    my $out = `ss -lxn 2>/dev/null`;
    return scalar grep { / \Q$path\E\s/ } split /\n/, $out;
}

# The Send-Q column of ss for a listening socket: its backlog.
sub backlog_of {
    my ( $kind, $where ) = @_;
    for ( split /\n/, `ss -ln$kind 2>/dev/null` ) {
        my @f = split ' ';
        return $f[ $kind eq 'x' ? 3 : 2 ] if /\Q$where\E\s/;
    }
    return undef;
}

subtest '--socket: HTTP, WebSocket and SSE over a Unix socket; scope and access log' => sub {
    my $path = "$dir/app.sock";
    my $log  = "$dir/access-unix.log";
    my $s    = start_server( '--socket', $path, '--access-log', $log, $app );
    is_deeply [ $s->listeners ], ["unix:$path"], 'the startup line names the socket';
    ok -S $path, 'the socket file exists';

    my $f = get_facts("unix:$path");
    is $f->{has_client}, 0, 'http scope: no client key';
    is_deeply $f->{server}, [ $path, undef ], 'server is [path, undef]';
    is $f->{scheme}, 'http', 'cleartext';
    ok wait_file_line( $log, qr{^unix - - \[.*\] "GET /" 200 } ), 'access log names the peer "unix"';

    my $ws = PagiRS::WS->connect( "unix:$path", path => '/ws' );
    ok $ws->upgraded, 'WebSocket handshake over the Unix socket';
    my $wf = decode_json( $ws->recv_message->{data} );
    is $wf->{has_client}, 0, 'websocket scope: no client key';
    is_deeply $wf->{server}, [ $path, undef ], 'websocket server is [path, undef]';
    $ws->send_text('hello');
    is $ws->recv_message->{data}, 'echo: hello', 'messages both ways';
    $ws->close(1000);
    $ws->wait_close;

    my $sse = PagiRS::SSE->open( "unix:$path", '/events' );
    is $sse->status, 200, 'SSE stream starts';
    my @ev = $sse->all_events;
    is scalar @ev, 2, 'both events';
    my $sf = decode_json( $ev[0]{data} );
    is $sf->{has_client}, 0, 'sse scope: no client key';
    is_deeply $sf->{server}, [ $path, undef ], 'sse server is [path, undef]';
    is $ev[1]{data}, 'second', 'then the second event';

    is $s->stop('TERM'), 0, 'server exits 0';
    ok !-e $path, 'the socket file is removed at exit';
};

subtest '--http2 over a Unix socket: h2c with prior knowledge' => sub {
    my $path = "$dir/h2.sock";
    my $s    = start_server( '--socket', $path, '--http2', $app );
    my $out  = `curl -s --max-time 10 --http2-prior-knowledge --unix-socket $path http://localhost/`;
    my $f    = eval { decode_json($out) } // {};
    is $f->{http_version}, '2', 'served over HTTP/2';
    is_deeply $f->{server}, [ $path, undef ], 'server is [path, undef]';
    is facts_of( http_request( "unix:$path", 'GET', '/' ) )->{http_version}, '1.1', 'HTTP/1.1 beside it';
    is $s->stop('TERM'), 0, 'server exits 0';
};

subtest '--socket-mode sets the socket file permissions' => sub {
    my $path = "$dir/mode.sock";
    my $s    = start_server( '--socket', $path, '--socket-mode', '0660', $app );
    is sprintf( '%04o', mode_of($path) ), '0660', 'mode 0660, whatever the umask';
    $s->stop('TERM');
    my $old = umask 0077;
    $s = start_server( '--socket', $path, '--socket-mode', '666', $app );
    umask $old;
    is sprintf( '%04o', mode_of($path) ), '0666', 'the leading 0 may be left out, and the umask does not narrow it';
    is get_facts("unix:$path")->{has_client}, 0, 'and it serves';
    $s->stop('TERM');
    $old = umask 0027;
    $s = start_server( '--socket', $path, $app );
    umask $old;
    is sprintf( '%04o', mode_of($path) ), '0750', 'without --socket-mode: from the umask';
    $s->stop('TERM');

    for my $bad ( '0668', '66', 'rw-rw----', '04660' ) {
        my ( $code, $err ) = run_pagi( '--socket', $path, '--socket-mode', $bad, $app );
        is $code, 2, "--socket-mode $bad is refused";
        like $err, qr/not an octal mode like 0660/, '...saying what is expected';
    }
    my ( $code, $err ) = run_pagi( '--socket-mode', '0660', $app );
    is $code, 2, '--socket-mode without a Unix socket is refused';
    like $err, qr/--socket-mode needs --socket PATH or --listen unix:PATH/, '...saying so';
};

subtest 'a stale socket file is replaced; a live one, or a file that is not a socket, is not' => sub {
    my $path = "$dir/stale.sock";
    {
        my $old = IO::Socket::UNIX->new( Local => $path, Type => SOCK_STREAM, Listen => 1 ) or die "bind: $!";
        close $old;    # the file stays; nobody listens on it
    }
    ok -S $path, 'a stale socket file is there';
    my $s = start_server( '--socket', $path, $app );
    like $s->output, qr/removed the stale socket file \Q$path\E/, 'the server says it removed it';
    is_deeply get_facts("unix:$path")->{server}, [ $path, undef ], 'and serves on a fresh socket';

    my ( $code, $err ) = run_pagi( '--socket', $path, $app );
    is $code, 1, 'a second server on a live socket exits 1';
    like $err, qr/cannot listen on unix:\Q$path\E: another process is accepting connections on it/,
      '...saying the socket is in use';
    ok $s->is_running, 'the first server runs on';
    is get_facts("unix:$path")->{has_client}, 0, 'and still serves';
    $s->stop('TERM');

    my $file = "$dir/precious.txt";
    open my $fh, '>', $file or die $!;
    print $fh "keep me\n";
    close $fh;
    ( $code, $err ) = run_pagi( '--socket', $file, $app );
    is $code, 1, 'a path that is a regular file: exit 1';
    like $err, qr/cannot listen on unix:\Q$file\E: the path exists and is not a socket; refusing to remove it/,
      '...with a message that says why';
    is slurp($file), "keep me\n", 'and the file is untouched';

    mkdir "$dir/adir";
    ( $code, $err ) = run_pagi( '--socket', "$dir/adir", $app );
    is $code, 1, 'a directory: exit 1';
    like $err, qr/is not a socket/, '...likewise';

    ( $code, $err ) = run_pagi( '--socket', "$dir/no/such/dir/x.sock", $app );
    is $code, 1, 'a missing directory: exit 1';
    like $err, qr{cannot listen on unix:\Q$dir\E/no/such/dir/x\.sock: No such file or directory}, '...with the OS error';

    my $long = "$dir/" . ( 'x' x 120 ) . '.sock';
    ( $code, $err ) = run_pagi( '--socket', $long, $app );
    is $code, 1, 'a path too long for a Unix socket: exit 1';
    like $err, qr/a Unix socket path is at most 107/, '...saying the limit';
};

subtest 'the socket file is removed when startup fails after binding, and kept by relative paths' => sub {
    my $path = "$dir/fail.sock";
    my ( $code, $err ) = run_pagi( '--socket', $path, '--lifespan', 'on', $failing );
    is $code, 1, 'lifespan startup fails: exit 1';
    like $err, qr/no database/, "with the app's message";
    ok !-e $path, 'and the socket file it bound is gone';

    # A relative path is shown, and removed, as the absolute path it names.
    mkdir "$dir/rel";
    my $srv = spawn_pagi( { cwd => "$dir/rel" }, '--socket', 'r.sock', $app );
    wait_startup($srv);
    is_deeply [ $srv->listeners ], ["unix:$dir/rel/r.sock"], 'a relative --socket is shown absolute';
    is_deeply get_facts("unix:$dir/rel/r.sock")->{server}, [ "$dir/rel/r.sock", undef ], 'also in the scope';
    is $srv->stop('TERM'), 0, 'exit 0';
    ok !-e "$dir/rel/r.sock", 'removed at exit';
};

subtest 'several --listen at once: two TCP ports and a Unix socket' => sub {
    my $path = "$dir/multi.sock";
    my $s = start_server( '--listen', '127.0.0.1:0', '--listen', '127.0.0.1:0', '--listen', "unix:$path", $app );
    my @l = $s->listeners;
    is scalar @l, 3, 'the startup line names three listeners';
    my @ports = map { m{^http://127\.0\.0\.1:(\d+)/$} ? $1 : () } @l;
    is scalar @ports, 2, 'two TCP ones';
    isnt $ports[0], $ports[1], 'on two ports';
    is $l[2], "unix:$path", 'and the socket, in the order given';
    for my $port (@ports) {
        my $f = get_facts($port);
        is_deeply $f->{server}, [ '127.0.0.1', $port ], "port $port serves, server [host, port]";
        is $f->{has_client}, 1, '...with a client';
        is $f->{client}[0], '127.0.0.1', '...its address';
    }
    is_deeply get_facts("unix:$path")->{server}, [ $path, undef ], 'the socket serves';

    # Open connections on every listener count against one --max-connections.
    $s->stop('TERM');
    $s = start_server( '--listen', '127.0.0.1:0', '--listen', "unix:$path", '--max-connections', '1', $app );
    my $held = connect_port("unix:$path");
    $held->syswrite("GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    my ($first) = read_sock( $held, qr/\}$/, 5 );
    like $first, qr/^HTTP\/1.1 200/, 'a kept-alive connection on the socket';
    is http_request( $s->port, 'GET', '/' )->{status}, 503, 'holds the only place: the TCP listener answers 503';
    close $held;
    my $deadline = time + 5;
    my $status = 0;
    while ( time < $deadline ) {
        $status = http_request( $s->port, 'GET', '/' )->{status};
        last if $status == 200;
        sleep 0.05;
    }
    is $status, 200, 'once it closes, TCP is served again';
    $s->stop('TERM');

    # --listen does not mix with --host, --port or --socket.
    for my $clash ( [ '--port', '1' ], [ '--host', '0.0.0.0' ], [ '--socket', "$dir/x.sock" ] ) {
        my ( $code, $err ) = run_pagi( '--listen', '127.0.0.1:0', @$clash, $app );
        is $code, 2, "--listen with $clash->[0]: exit 2";
        like $err, qr/cannot be used with/, '...naming the clash';
    }
    my ( $code, $err ) = run_pagi( '--socket', "$dir/x.sock", '-p', '0', $app );
    is $code, 2, '--socket with --port: exit 2';
    for my $bad ( '8080', 'localhost', '::1:80', '[::1]', '127.0.0.1:99999', ':80', 'unix:' ) {
        ( $code, $err ) = run_pagi( '--listen', $bad, $app );
        is $code, 2, "--listen '$bad' is refused";
        like $err, qr/invalid value '\Q$bad\E' for '--listen <ADDR>'/, '...naming the value';
    }
    ( $code, $err ) = run_pagi( '--listen', "unix:$path", '--listen', "unix:$path", $app );
    is $code, 2, 'the same socket twice: exit 2';
    like $err, qr/unix:\Q$path\E is named twice/, '...saying so';
    ( $code, $err ) = run_pagi( '--listen', 'no-such-host.invalid:80', $app );
    is $code, 1, 'a host that does not resolve: exit 1';
    like $err, qr/cannot listen on no-such-host\.invalid:80: cannot resolve the host/, '...naming it';
};

subtest 'processes the app forks keep none of the listeners' => sub {
    my $path  = "$dir/fork.sock";
    my $forker = write_app( <<'PERL', 'forker.pl' );
use Future::AsyncAwait; use POSIX ();
async sub {
    my ($scope, $receive, $send) = @_;
    return if $scope->{type} eq 'lifespan';
    my $pid = fork // die "fork: $!";
    if (!$pid) { sleep 30; POSIX::_exit(0) }
    await $send->({ type => 'http.response.start', status => 200,
        headers => [['content-length', length $pid]] });
    await $send->({ type => 'http.response.body', body => $pid });
}
PERL
    # The socket in the reference's form: a path starting with /.
    my $s = start_server( '--listen', '127.0.0.1:0', '--listen', '127.0.0.1:0', '--listen', $path, $forker );
    is( ( $s->listeners )[2], "unix:$path", 'a --listen path starting with / is a Unix socket' );
    my @ports = map { m{:(\d+)/$} ? $1 : () } $s->listeners;
    # Read up to the Content-Length: the child holds a copy of the
    # connection too, so its close would come only when the child ends.
    my ($raw) = raw_request( $ports[1], "GET / HTTP/1.1\r\nHost: x\r\n\r\n", until => qr/\r\n\r\n\d+\z/ );
    my $child = parse_response($raw)->{body};
    like $child, qr/^\d+$/, 'the app forked a child';
    ok kill( 0, $child ), 'which runs';
    is $s->stop('TERM'), 0, 'the server stops';
    ok kill( 0, $child ), 'the child runs on';
    for my $port (@ports) {
        ok !port_listening($port), "nothing listens on port $port any more";
    }
    ok !unix_listening($path), 'nor on the Unix socket';
    kill 'KILL', $child;
};

subtest '[::1]:PORT' => sub {
    my $probe = IO::Socket::IP->new( LocalHost => '::1', LocalPort => 0, Listen => 1 );
    plan skip_all => "no IPv6 on loopback here: $@" unless $probe;
    close $probe;
    my $s = start_server( '--listen', '[::1]:0', $app );
    my ($url) = $s->listeners;
    like $url, qr{^http://\[::1\]:\d+/$}, 'the startup line writes the address in brackets';
    is $s->host, '::1', 'the harness reads it';
    my $sock = IO::Socket::IP->new( PeerHost => '::1', PeerPort => $s->port ) or die "connect: $@";
    $sock->syswrite("GET / HTTP/1.1\r\nHost: [::1]\r\nConnection: close\r\n\r\n");
    my ($raw) = read_sock( $sock, undef, 5 );
    my $f = decode_json( parse_response($raw)->{body} );
    is_deeply $f->{server}, [ '::1', $s->port ], 'served over IPv6, server [::1, port]';
    is $f->{client}[0], '::1', 'client ::1';
    $s->stop('TERM');
};

subtest '--reuseport: two servers on one port' => sub {
    my $first = start_server( '--listen', '127.0.0.1:0', '--reuseport', $app );
    my $port  = $first->port;
    my $second = start_server( '--listen', "127.0.0.1:$port", '--reuseport', $app );
    is $second->port, $port, 'a second server starts on the same port';
    my %pids;
    for ( 1 .. 64 ) {
        $pids{ get_facts($port)->{pid} // 0 }++;
        last if keys %pids == 2;
    }
    is_deeply [ sort keys %pids ], [ sort $first->pid, $second->pid ], 'the kernel gives connections to both';
    $second->stop('TERM');
    $first->stop('TERM');

    $first = start_server( '--listen', '127.0.0.1:0', $app );
    $port  = $first->port;
    my ( $code, $err ) = run_pagi( '--listen', "127.0.0.1:$port", $app );
    is $code, 1, 'without it the second server exits 1';
    like $err, qr/cannot listen on 127\.0\.0\.1:$port: Address (?:already )?in use/, '...with a clear bind error';
    ( $code, $err ) = run_pagi( '--listen', "127.0.0.1:$port", '--reuseport', $app );
    is $code, 1, 'and with it alone too: the first did not ask for it';
    $first->stop('TERM');
};

subtest '-b/--listener-backlog' => sub {
    my $path = "$dir/backlog.sock";
    my $s = start_server( '-b', '17', '--listen', '127.0.0.1:0', '--listen', "unix:$path", $app );
    my $port = $s->port;
    is backlog_of( 't', "127.0.0.1:$port" ), 17, 'the TCP listen queue is 17 (ss Send-Q)';
    is backlog_of( 'x', $path ), 17, 'so is the Unix one';
    is get_facts($port)->{pid}, $s->pid, 'and it serves';
    $s->stop('TERM');
    $s = start_server( '--listener-backlog', '2048', $app );
    is get_facts( $s->port )->{pid}, $s->pid, 'the long name works too';
    $s->stop('TERM');
    $s = start_server($app);
    is backlog_of( 't', '127.0.0.1:' . $s->port ), 2048, 'default: 2048 (the kernel may cap it at somaxconn)'
      if ( `cat /proc/sys/net/core/somaxconn` // 0 ) >= 2048;
    $s->stop('TERM');
    for my $bad ( '0', '-1', 'lots', '2147483648' ) {
        my ( $code, $err ) = run_pagi( "--listener-backlog=$bad", $app );
        is $code, 2, "--listener-backlog $bad is refused";
        like $err, qr/--listener-backlog/, '...naming the option';
    }
    my ( $code, $err ) = run_pagi( '-b', $app );
    is $code, 2, '-b without a value is refused';
};

subtest '--ssl-cert applies to TCP listeners; a Unix socket stays cleartext' => sub {
    plan skip_all => 'openssl not available' unless `openssl version 2>/dev/null` =~ /SSL/;
    system("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=localhost "
          . "-keyout $dir/key.pem -out $dir/cert.pem >/dev/null 2>&1") == 0 or die 'openssl failed';
    my $path = "$dir/tls.sock";
    my $s = start_server( '--listen', '127.0.0.1:0', '--listen', "unix:$path",
        '--ssl-cert', "$dir/cert.pem", '--ssl-key', "$dir/key.pem", $app );
    my @l = $s->listeners;
    like $l[0], qr{^https://127\.0\.0\.1:\d+/$}, 'the TCP listener is https';
    is $l[1], "unix:$path", 'the socket is listed';
    like $s->output, qr/unix:\Q$path\E: served in cleartext \(TLS applies to TCP listeners\)/, 'and said to be cleartext';
    my $f = get_facts("unix:$path");
    is $f->{scheme}, 'http', 'plain HTTP on the socket';
    my $out = `curl -sk --max-time 10 https://127.0.0.1:@{[ $s->port ]}/`;
    is eval { decode_json($out)->{scheme} }, 'https', 'TLS on the port';
    $s->stop('TERM');
};

# ---------------------------------------------------------------------------
# systemd socket activation
# ---------------------------------------------------------------------------

# Start pagi-rs as systemd does: the sockets in @$socks as descriptors 3..,
# LISTEN_FDS counting them, and LISTEN_PID the server's own pid, which a
# wrapper sets before it execs the server (exec keeps the pid).  %$env
# overrides or adds variables (LISTEN_PID => 1: another process's).
sub spawn_activated {
    my ( $socks, $env, @args ) = @_;
    my ( undef, $out ) = tempfile( DIR => $dir );
    my $pid = fork // die "fork: $!";
    if ( !$pid ) {
        open STDIN,  '<',  '/dev/null';
        open STDOUT, '>>', $out;
        open STDERR, '>>', $out;
        # Out of the way first, so that dup2 onto 3.. cannot clobber one.
        my @high = map { fcntl( $_, F_DUPFD, 100 ) // POSIX::_exit(120) } @$socks;
        for my $i ( 0 .. $#high ) {
            # dup2 leaves the new descriptor open across exec.
            defined POSIX::dup2( $high[$i], 3 + $i ) or POSIX::_exit(121);
            POSIX::close( $high[$i] );
        }
        $ENV{LISTEN_FDS} = scalar @$socks;
        delete $ENV{LISTEN_PID};
        delete $ENV{LISTEN_FDNAMES};
        $ENV{$_} = $env->{$_} for keys %$env;
        exec $^X, '-e', '$ENV{LISTEN_PID} = $$ unless exists $ENV{LISTEN_PID}; exec @ARGV or die $!',
          pagi_bin(), @args
          or POSIX::_exit(127);
    }
    return bless { pid => $pid, stderr_file => $out }, 'PagiRS::Test::Server';
}

sub tcp_listener {
    my ($port) = @_;
    return IO::Socket::INET->new( LocalAddr => '127.0.0.1', LocalPort => $port // 0, Listen => 16, ReuseAddr => 1 )
      // die "listen: $!";
}

# fdinfo's flags for descriptor $fd of process $pid (octal text), or ''.
sub fd_flags {
    my ( $pid, $fd ) = @_;
    open my $fh, '<', "/proc/$pid/fdinfo/$fd" or return '';
    local $/;
    return <$fh> =~ /^flags:\s*(\d+)/m ? $1 : '';
}

subtest 'systemd: a TCP socket passed as fd 3 is served; the app does not see LISTEN_*' => sub {
    my $sock = tcp_listener();
    my $port = $sock->sockport;
    my $s    = wait_startup( spawn_activated( [$sock], {}, $app ) );
    close $sock;    # the server holds its own copy now
    is_deeply [ $s->listeners ], ["http://127.0.0.1:$port/"], 'the startup line names the inherited socket alone';
    like $s->output, qr{http://127\.0\.0\.1:$port/: descriptor 3 from systemd}, 'and says where it came from';
    my $f = get_facts($port);
    is $f->{pid}, $s->pid, 'requests on it are served';
    is_deeply $f->{server}, [ '127.0.0.1', $port ], 'server [host, port]';
    is $f->{env}, 'unset unset unset', 'LISTEN_FDS, LISTEN_PID and LISTEN_FDNAMES are not in %ENV';
    is $f->{child_env}, 'unset unset unset', 'nor in the environment of a program the app runs';
    ok oct( fd_flags( $s->pid, 3 ) ) & 02000000, 'the adopted descriptor is close-on-exec';
    is $s->stop('TERM'), 0, 'exit 0';
    ok !port_listening($port), 'and the socket is closed';
};

subtest 'systemd: a Unix socket and a TCP one, named; an explicit matching --listen uses the inherited one' => sub {
    my $path = "$dir/sd.sock";
    my $unix = IO::Socket::UNIX->new( Local => $path, Type => SOCK_STREAM, Listen => 16 ) or die "bind: $!";
    my $tcp  = tcp_listener();
    my $port = $tcp->sockport;
    my $s    = wait_startup(
        spawn_activated( [ $unix, $tcp ], { LISTEN_FDNAMES => 'web:admin' },
            '--listen', "127.0.0.1:$port", '--listen', '127.0.0.1:0', $app )
    );
    close $_ for $unix, $tcp;
    my @l = $s->listeners;
    is scalar @l, 3, 'three listeners: the two named, the other inherited one';
    is $l[0], "http://127.0.0.1:$port/", 'the --listen naming the inherited port is that socket (no second bind)';
    like $l[1], qr{^http://127\.0\.0\.1:\d+/$}, 'a fresh port';
    is $l[2], "unix:$path", 'the inherited Unix socket';
    like $s->output, qr{unix:\Q$path\E: descriptor 3 \(web\) from systemd}, 'LISTEN_FDNAMES names fd 3';
    like $s->output, qr{127\.0\.0\.1:$port/: descriptor 4 \(admin\) from systemd}, '...and fd 4';
    my $f = get_facts("unix:$path");
    is_deeply $f->{server}, [ $path, undef ], 'the Unix socket serves, server [path, undef]';
    is $f->{has_client}, 0, 'no client';
    is get_facts($port)->{pid}, $s->pid, 'the TCP socket serves';
    is $s->stop('TERM'), 0, 'exit 0';
    ok -S $path, "systemd's socket file is left in place";
};

subtest 'systemd: LISTEN_PID of another process means the descriptors are not ours' => sub {
    my $sock = tcp_listener();
    my $port = $sock->sockport;
    my $s    = wait_startup( spawn_activated( [$sock], { LISTEN_PID => 1 }, '-p', '0', $app ) );
    my @l = $s->listeners;
    is scalar @l, 1, 'one listener';
    isnt $l[0], "http://127.0.0.1:$port/", 'its own, not the descriptor';
    unlike $s->output, qr/from systemd/, 'nothing adopted';
    is get_facts( $s->port )->{env}, 'unset unset unset', 'the variables are removed all the same';
    $s->stop('TERM');
    close $sock;
};

# The exit code of a server that is expected to end by itself (undef if it
# is still running after $timeout seconds).
sub exit_code_of {
    my ( $s, $timeout ) = @_;
    my $deadline = time + ( $timeout // 10 );
    while ( $s->is_running ) {
        return undef if time > $deadline;
        sleep 0.05;
    }
    return $s->{exit_code};
}

subtest 'systemd: what cannot be served is refused' => sub {
    my $sock = tcp_listener();
    my $s = spawn_activated( [$sock], { LISTEN_FDS => 'two' }, $app );
    is exit_code_of($s), 1, 'LISTEN_FDS that is not a number: exit 1';
    like $s->output, qr/LISTEN_FDS=two is not a count of descriptors/, '...saying so';

    $s = spawn_activated( [$sock], { LISTEN_FDS => 2 }, $app );
    is exit_code_of($s), 1, 'a descriptor that is not open: exit 1';
    like $s->output, qr/systemd socket activation: descriptor 4 is not open/, '...naming it';

    my $unbound = IO::Socket::INET->new( Proto => 'tcp' ) or die $!;
    $s = spawn_activated( [$unbound], {}, $app );
    is exit_code_of($s), 1, 'a socket that is not listening: exit 1';
    like $s->output, qr/descriptor 3 is not listening/, '...saying so';

    open my $file, '<', $app or die $!;
    $s = spawn_activated( [$file], {}, $app );
    is exit_code_of($s), 1, 'a file, not a socket: exit 1';
    like $s->output, qr/descriptor 3 is not a socket/, '...saying so';
    close $sock;
};

done_testing;
