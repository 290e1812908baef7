use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;
use PagiRS::SSE;
use File::Temp qw(tempdir);
use Fcntl qw(O_RDONLY O_NONBLOCK);
use POSIX qw(mkfifo WNOHANG);
use IO::Select;
use JSON::PP ();
use Time::HiRes qw(time sleep);

# Logs for production: --log-format json (every server line one JSON object
# with time, level, message, pid, worker), the json access-log preset (wire
# bytes escaped so they read back exactly), --error-log (the server's lines
# and the interpreter's STDERR, from before the app loads), whole access-log
# lines when several processes share one log, and the last lines written
# before the server exits.

my $dir = tempdir( CLEANUP => 1 );
umask 022;
my $JSON = JSON::PP->new->utf8;    # strict: the bytes must be UTF-8
my $TIME = qr/\A\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\z/;

my $app = write_app( <<'PERL', 'logs_app.pl' );
use strict; use warnings; use Future::AsyncAwait;
warn "load-warning-marker-5150\n";
my $app = async sub {
    my ($scope, $receive, $send) = @_;
    return if $scope->{type} eq 'lifespan';
    my $path = $scope->{path};
    if ($scope->{type} eq 'sse') {
        await $send->({ type => 'sse.start' });
        await $send->({ type => 'sse.close', reason => "done\n\"quoted\"\x01" });
        return;
    }
    warn "runtime-warning-marker-7731\n" if $path eq '/warn';
    print STDERR "raw-stderr-marker-9090\n" if $path eq '/stderr';
    die "app-die-marker-4242\n" if $path eq '/die';
    $scope->{'pagi.connection'}->on_complete(sub { die "complete-callback-marker-2718\n" })
        if $path eq '/callback-dies';
    await $send->({ type => 'http.response.start', status => 200, headers => [['content-length', 2]] });
    await $send->({ type => 'http.response.body', body => 'ok' });
};
$app;
PERL

my $dies_at_load = write_app( <<'PERL', 'dies_at_load.pl' );
warn "warning-before-the-die-3131\n";
die "load-die-marker-6262\n";
PERL

# Each line of $text decoded as JSON; a line that is not is reported and
# given as undef.
sub json_lines {
    my ( $text, $what ) = @_;
    my @out;
    for my $line ( split /\n/, $text ) {
        my $obj = eval { $JSON->decode($line) };
        ok( 0, "$what: a line that is not JSON: $line" ) unless ref $obj eq 'HASH';
        push @out, $obj;
    }
    return @out;
}

# Undo the json preset's escaping of wire bytes: a byte that is not UTF-8
# is \xhh and a backslash is doubled.
sub wire_bytes {
    my ($s) = @_;
    utf8::encode($s);
    $s =~ s/\\(\\|x([0-9a-f]{2}))/defined $2 ? chr hex $2 : '\\'/ge;
    return $s;
}

# A request on its own connection; returns the status.
sub send_raw {
    my ( $port, $bytes ) = @_;
    my $res = parse_response( raw_request( $port, $bytes ) );
    return $res ? $res->{status} : 0;
}

# A server on a port of its own whose stderr may be empty (--error-log):
# waits for the port instead of the startup line.  Dies if it does not
# start, as start_server does.
sub start_quiet {
    my (@args) = @_;
    my $port = free_port();
    my $s    = start_on_port( $port, @args ) or die "server did not start\n";
    return $s;
}

# Run one subtest's body; a server that does not start fails that subtest
# and leaves the others to run.
sub check {
    my ( $name, $body ) = @_;
    subtest $name => sub { eval { $body->(); 1 } or fail("the subtest died: $@") };
}

check '--log-format json: every server line is an object with the common keys' => sub {
    my $s    = start_server( '--log-format', 'json', $app );
    my $port = $s->port;
    is http_request( $port, 'GET', '/warn' )->{status}, 200, 'a request that warns';
    is http_request( $port, 'GET', '/die' )->{status},  500, 'a request that dies';
    is http_request( $port, 'GET', '/callback-dies' )->{status}, 200, 'a request whose on_complete callback dies';
    is http_request( $port, 'GET', '/ok?a=1', headers => [ [ 'User-Agent', 'ua/1' ] ] )->{status}, 200,
      'a plain request';
    ok $s->wait_output( qr{"path":"/ok"}, 5 ), 'its access line is out';
    is $s->stop('TERM'), 0, 'the server stops cleanly';

    my @all    = json_lines( $s->output, 'stderr' );
    my @server = grep { $_ && exists $_->{level} } @all;
    my @access = grep { $_ && exists $_->{method} } @all;
    is scalar(@server) + scalar(@access), scalar(@all), 'every line is a server line or an access line';
    ok @server >= 7, scalar(@server) . ' server lines';
    my @bad = grep {
        !(     ( $_->{time} // '' ) =~ $TIME
            && ( $_->{level} // '' ) =~ /\A(?:debug|info|warn|error)\z/
            && defined $_->{message}
            && ( $_->{category} // '' ) =~ /\APAGI::Server(?:::Connection(?:State)?)?\z/
            && ( $_->{pid} // 0 ) == $s->pid
            && !exists $_->{worker} )
    } @server;
    is scalar(@bad), 0,
      'each has time (RFC 3339 UTC), level, category, message, pid (the server\'s), and no worker (one process)'
      or diag explain $bad[0];
    my @order = grep { /^\{"time":/ } split /\n/, $s->output;
    is scalar( grep { !/^\{"time":"[^"]+","level":"\w+","category":"[\w:]+","message":/ } grep { /"level"/ } @order ), 0,
      'keys in the reference\'s order: time, level, category, message';
    my %by = map { ( $_->{message} => $_ ) } @server;
    my ($startup) = grep { /listening on http:\/\/127\.0\.0\.1:\Q$port\E\// } keys %by;
    ok $startup, 'the startup line';
    is $by{$startup // ''}{level}, 'info', 'at info';
    is $by{'load-warning-marker-5150'}{level}, 'warn', 'a warning while the app loads is a warn line';
    is $by{'runtime-warning-marker-7731'}{level}, 'warn', 'a warning from a request is a warn line';
    is $by{'PAGI application error: app-die-marker-4242'}{level}, 'error', 'an app error is an error line';
    is $by{'PAGI application error: app-die-marker-4242'}{category}, 'PAGI::Server::Connection',
      '... about the connection';
    is $by{$startup // ''}{category}, 'PAGI::Server', 'the startup line is the server\'s';
    my ($callback) = grep { /callback error: complete-callback-marker-2718/ } keys %by;
    is $by{ $callback // '' }{category}, 'PAGI::Server::ConnectionState', 'a callback that died: about the connection state';
    ok $by{'Received TERM, shutting down'} && $by{'Shutdown complete'}, 'and the shutdown lines';

    is scalar(@access), 4, 'the access log (json by default with --log-format json): four lines';
    my ($ok) = grep { $_->{path} eq '/ok' } @access;
    is_deeply [ @{$ok}{qw(client method query protocol status size user_agent referer reason)} ],
      [ '127.0.0.1', 'GET', 'a=1', 'HTTP/1.1', 200, 2, 'ua/1', undef, undef ], 'its fields';
    is $ok->{pid}, $s->pid, 'its pid';
    ok !exists $ok->{worker}, 'no worker (one process)';
};

check '--log-format json: a startup error is a JSON error line' => sub {
    my ( $code, $err ) = run_pagi( '--log-format', 'json', $dies_at_load );
    is $code, 1, 'exit 1';
    my @lines = json_lines( $err, 'stderr' );
    ok @lines >= 2, 'lines on stderr';
    my ($fatal) = grep { $_ && $_->{level} eq 'error' } @lines;
    like $fatal->{message} // '', qr/\Acannot load the application:\n.*load-die-marker-6262/s,
      'an error line says the app did not load, and why';
    my ($warning) = grep { $_ && ( $_->{message} // '' ) =~ /warning-before-the-die-3131/ } @lines;
    is $warning->{level}, 'warn', 'the warning before the die is a warn line';

    ( $code, $err ) = run_pagi( '--log-format', 'json', '--error-log', "$dir/no/such/dir/err.log", $app );
    is $code, 1, 'an error log that cannot be opened: exit 1';
    ($fatal) = json_lines( $err, 'stderr' );
    like $fatal->{message} // '', qr{\Acannot open error log \Q$dir\E/no/such/dir/err\.log: No such file or directory},
      'reported as JSON on stderr';
};

check 'the json access log: awkward bytes read back exactly' => sub {
    my $log = "$dir/access.json";
    my $s   = start_server( '--access-log', $log, '--access-log-format', 'json', $app );
    my $ua  = "t\tab\xfe\"q\\x41\\";
    my $ref = "\xc3\xa9t\xe9";
    is send_raw( $s->port,
        "GET /a\\b/%ff%00%22?q=%22x%22&y=1 HTTP/1.1\r\nHost: x\r\nUser-Agent: $ua\r\nReferer: $ref\r\n"
          . "Connection: close\r\n\r\n" ), 200, 'a request with a backslash in its path, control and non-UTF-8 bytes in its headers';
    my $c = PagiRS::SSE->open( $s->port, '/events' );
    ok $c->wait_eof(5), 'an SSE stream the app closes with a reason of quotes and control characters';
    my @lines = wait_file_lines( $log, 2 );
    is scalar(@lines), 2, 'two lines';
    my ( $req, $sse ) = json_lines( join( "\n", @lines ), $log );
    like $req->{time}, $TIME, 'time';
    is $req->{path},  "/a\\\\b/%ff%00%22", 'the path as sent, its backslash doubled';
    is wire_bytes( $req->{path} ), "/a\\b/%ff%00%22", '...reading back to the bytes sent';
    is $req->{query}, 'q=%22x%22&y=1', 'the query as sent';
    is wire_bytes( $req->{user_agent} ), $ua, 'the user agent reads back to its bytes (tab, \xfe, quote, backslashes)';
    is $req->{user_agent}, "t\tab\\xfe\"q\\\\x41\\\\", '...a literal \x41 cannot pass for a byte';
    is wire_bytes( $req->{referer} ), $ref, 'the referer: UTF-8 kept, a stray byte escaped';
    is_deeply [ @{$req}{qw(method protocol status size client reason)} ], [ 'GET', 'HTTP/1.1', 200, 2, '127.0.0.1', undef ],
      'method, protocol, status, size, client, no reason';
    ok $req->{duration} >= 0 && $req->{duration} < 5, "duration in seconds: $req->{duration}";
    is $sse->{path},   '/events', 'the stream\'s line';
    is $sse->{reason}, "done\n\"quoted\"\x01", 'its reason, newline, quotes and control character included';
    is $s->stop, 0, 'stopped';
};

check '--error-log FILE: the server\'s lines and the interpreter\'s STDERR' => sub {
    my $elog = "$dir/error.log";
    open my $fh, '>', $elog or die;
    print $fh "kept-from-before\n";
    close $fh;
    chmod 0600, $elog;
    my $s    = start_quiet( '--error-log', $elog, $app );
    my $port = $s->port;
    is http_request( $port, 'GET', '/warn' )->{status},   200, 'a request that warns';
    is http_request( $port, 'GET', '/stderr' )->{status}, 200, 'a request that prints to STDERR';
    ok wait_file_line( $elog, qr/raw-stderr-marker-9090/ ), 'the app\'s STDERR is in the error log';
    ok wait_file_line( $elog, qr{"GET /stderr" 200} ), 'so is the access log, which follows stderr without --access-log';
    is $s->stop('TERM'), 0, 'stopped';
    my $text = slurp($elog);
    like $text, qr/\Akept-from-before\n/, 'appended: what was there stays';
    like $text, qr/^load-warning-marker-5150$/m,        'a warning while the app loaded';
    like $text, qr/^runtime-warning-marker-7731$/m,     'a warning from a request';
    like $text, qr/\bINFO pagi-rs \S+ listening on http:\/\/127\.0\.0\.1:\Q$port\E\//, 'the startup line';
    like $text, qr/\bINFO Shutdown complete$/m, 'the last line';
    is $s->output, '', 'nothing on the terminal';
    is( ( stat $elog )[2] & 07777, 0600, 'an existing file keeps its mode' );

    my $alog = "$dir/separate-access.log";
    $s = start_quiet( '--error-log', $elog, '--access-log', $alog, $app );
    is http_request( $s->port, 'GET', '/apart' )->{status}, 200, 'with --access-log too';
    ok wait_file_line( $alog, qr{"GET /apart" 200} ), 'the access line is in the access log';
    $s->stop('TERM');
    unlike slurp($elog), qr{/apart}, '...and not in the error log';
};

check '--error-log FILE: created 0644, and the app\'s load error goes there' => sub {
    my $elog = "$dir/load-error.log";
    my ( $code, $err ) = run_pagi( '--error-log', $elog, $dies_at_load );
    is $code, 1, 'exit 1';
    is $err,  '', 'nothing on the terminal';
    my $text = slurp($elog);
    like $text, qr/^warning-before-the-die-3131$/m, 'the warning before the die';
    like $text, qr/^pagi-rs: cannot load the application:\n.*load-die-marker-6262/ms, 'the load error';
    is( ( stat $elog )[2] & 07777, 0644, 'created 0644' );

    ( $code, $err ) = run_pagi( '--error-log', "$dir/no/such/dir/err.log", $app );
    is $code, 1, 'a path that cannot be opened: exit 1';
    like $err, qr{\Apagi-rs: cannot open error log \Q$dir\E/no/such/dir/err\.log: No such file or directory},
      'and a message that names it, on stderr';
    ( $code, $err ) = run_pagi( '--error-log', $dir, $app );
    is $code, 1, 'a directory: exit 1';
    like $err, qr{cannot open error log \Q$dir\E: Is a directory}, 'named too';
};

# ---------------------------------------------------------------------------
# Several processes, one log; the last lines at exit
# ---------------------------------------------------------------------------

# $clients processes each sending $n keep-alive requests for paths made by
# $path->($client, $i) to $port; returns their pids.
sub load {
    my ( $port, $clients, $n, $path ) = @_;
    my @pids;
    for my $c ( 1 .. $clients ) {
        my $pid = fork // die "fork: $!";
        if ( !$pid ) {
            my $sock = connect_port($port);
            for my $i ( 1 .. $n ) {
                print $sock "GET " . $path->( $c, $i ) . " HTTP/1.1\r\nHost: x\r\n\r\n";
                my $buf = '';
                while ( $buf !~ /\r\n\r\nok\z/ ) {
                    sysread( $sock, $buf, 4096, length $buf ) or POSIX::_exit(1);
                }
            }
            POSIX::_exit(0);
        }
        push @pids, $pid;
    }
    return @pids;
}

sub wait_pids {
    my $ok = 1;
    for (@_) { waitpid( $_, 0 ); $ok &&= $? == 0 }
    return $ok;
}

# A FIFO with its read end open (a pipe, as stdout to a log shipper is):
# returns (path, read handle).
sub fifo {
    my ($name) = @_;
    my $path = "$dir/$name";
    mkfifo( $path, 0600 ) or die "mkfifo: $!";
    sysopen( my $fh, $path, O_RDONLY | O_NONBLOCK ) or die "open fifo: $!";
    return ( $path, $fh );
}

# Read $fh until EOF after all @servers have exited.
sub drain {
    my ( $fh, @servers ) = @_;
    my $sel = IO::Select->new($fh);
    my $data = '';
    my $deadline = time + 30;
    while ( time < $deadline ) {
        my $running = grep { $_->is_running } @servers;
        if ( $sel->can_read(0.05) ) {
            my $n = sysread( $fh, $data, 4096, length $data );
            last if defined $n && $n == 0 && !$running;
        }
    }
    return $data;
}

my $PAD = 'x' x 1500;    # long lines, each well under PIPE_BUF (4096)
my $LINE_A = qr{\A127\.0\.0\.1 - - \[[^\]]+\] "GET /(a|b)/(\d+)/(\d+)/$PAD HTTP/1\.1" 200 2 "-" "-"\z};

check 'two processes, one pipe: every access line whole' => sub {
    my ( $path, $fh ) = fifo('shared.fifo');
    my @servers = map { start_quiet( '--access-log', $path, '--access-log-format', 'combined', $app ) } 1 .. 2;
    my @pids;
    for my $k ( 0, 1 ) {
        my $tag = $k ? 'b' : 'a';
        push @pids, load( $servers[$k]->port, 3, 150, sub { "/$tag/$_[0]/$_[1]/$PAD" } );
    }
    my $data = '';
    my $sel  = IO::Select->new($fh);
    # Read slowly while the clients run, so that the pipe is often full.
    while ( grep { waitpid( $_, WNOHANG ) == 0 } @pids ) {
        if ( $sel->can_read(0.05) ) { sysread( $fh, $data, 4096, length $data ); sleep 0.002 }
    }
    kill 'TERM', map { $_->pid } @servers;
    $data .= drain( $fh, @servers );
    is_deeply [ map { $_->stop } @servers ], [ 0, 0 ], 'both exited 0';
    my @lines = split /\n/, $data;
    my @broken = grep { $_ !~ $LINE_A } @lines;
    is scalar(@broken), 0, 'no line is torn or mixed with another' or diag "first: " . substr( $broken[0], 0, 300 );
    my %seen;
    for (@lines) { $seen{"$1/$2/$3"}++ if $_ =~ $LINE_A }
    is scalar( keys %seen ), 900, 'all 900 requests logged, once each' or diag scalar(@lines) . " lines";
};

check 'two processes, one file: every access line a whole JSON object' => sub {
    my $log = "$dir/shared.json";
    my @servers = map { start_quiet( '--access-log', $log, '--access-log-format', 'json', $app ) } 1 .. 2;
    my @pids;
    for my $k ( 0, 1 ) {
        my $tag = $k ? 'b' : 'a';
        push @pids, load( $servers[$k]->port, 3, 150, sub { "/$tag/$_[0]/$_[1]/$PAD" } );
    }
    ok wait_pids(@pids), 'the clients got every response';
    $_->stop('TERM') for @servers;
    my @lines = file_lines($log);
    is scalar(@lines), 900, '900 lines';
    my @bad = grep { my $o = eval { $JSON->decode($_) }; !( $o && $o->{path} =~ m{\A/[ab]/\d+/\d+/$PAD\z} ) } @lines;
    is scalar(@bad), 0, 'each parses whole' or diag substr( $bad[0], 0, 300 );
};

check 'a burst, then SIGTERM at once: every line reaches the log' => sub {
    my ( $path, $fh ) = fifo('burst.fifo');
    my $s = start_quiet( '--access-log', $path, '--access-log-format', 'combined', $app );
    # More than the pipe holds (64 KiB): the rest waits in the server.
    ok wait_pids( load( $s->port, 1, 400, sub { "/a/1/$_[1]/$PAD" } ) ), '400 requests answered';
    kill 'TERM', $s->pid;
    my $data  = drain( $fh, $s );
    my @lines = split /\n/, $data;
    is scalar( grep { $_ =~ $LINE_A } @lines ), 400, 'all 400 lines, after the server exited';
    is $s->stop, 0, 'exit 0';

    my $log = "$dir/burst.log";
    $s = start_quiet( '--access-log', $log, $app );
    ok wait_pids( load( $s->port, 2, 300, sub { "/b/$_[0]/$_[1]/$PAD" } ) ), '600 requests to a file';
    is $s->stop('TERM'), 0, 'SIGTERM right after';
    is scalar( file_lines($log) ), 600, 'all 600 lines in the file';
};

done_testing;
