use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;
use File::Temp qw(tempdir);
use File::Spec;
use IO::Socket::INET;
use IO::Select;
use JSON::PP;
use Time::HiRes qw(time sleep);

# Command-line options, each checked against the running server.

$ENV{PAGI_RS_BIN} = File::Spec->rel2abs( $ENV{PAGI_RS_BIN} ) if defined $ENV{PAGI_RS_BIN};
my $TMP = tempdir( CLEANUP => 1 );

# Poll a file until it matches (the access log is written by a thread).
sub wait_file {
    my ( $file, $re, $secs ) = @_;
    my $t0 = time;
    while ( time - $t0 < ( $secs // 5 ) ) {
        return 1 if slurp($file) =~ $re;
        sleep 0.05;
    }
    return 0;
}

my $app = write_app( <<'PERL', 'options_app.pl' );
use strict; use warnings; use Future::AsyncAwait; use JSON::PP (); use Future::IO;
my $app = async sub {
    my ($scope, $receive, $send) = @_;
    return if $scope->{type} eq 'lifespan';
    my $body = '';
    while (1) {
        my $ev = await $receive->();
        last unless $ev->{type} eq 'http.request';
        $body .= $ev->{body} // '';
        last unless $ev->{more};
    }
    my ($status) = ($scope->{query_string} // '') =~ /status=(\d+)/;
    ($status) = $scope->{path} =~ m{/s(\d{3})\z} unless $status;
    $status ||= 200;
    my $out;
    if ($scope->{path} eq '/scope') {
        $out = JSON::PP->new->canonical->encode({ root_path => $scope->{root_path}, path => $scope->{path} });
    }
    elsif ($scope->{path} =~ m{\A/empty}) {
        $out = '';
    }
    else {
        await Future::IO->sleep(0.2) if $scope->{path} =~ /slow/;
        $out = "got:" . length($body);
    }
    await $send->({type => 'http.response.start', status => $status,
        headers => [['content-type', 'text/plain'], ['content-length', length $out]]});
    await $send->({type => 'http.response.body', body => $out, more => 0});
};
$app;
PERL

# ---------------------------------------------------------------------------

subtest '-v / --version' => sub {
    my ($cargo_version) = slurp("$FindBin::Bin/../Cargo.toml") =~ /^version\s*=\s*"([^"]+)"/m;
    $cargo_version //= '0.1.0';
    for my $flag ( '-v', '--version' ) {
        my ( $code, $err, $out ) = run_pagi($flag);
        is $code, 0, "$flag exits 0";
        like $out, qr/\Apagi-rs \Q$cargo_version\E\s*\z/, "$flag prints 'pagi-rs $cargo_version'";
    }
};

subtest '--help mentions the options' => sub {
    my ( $code, $err, $out ) = run_pagi('--help');
    is $code, 0, '--help exits 0';
    for my $opt (
        qw(--host --port --app --lib --root-path --access-log --no-access-log --access-log-format --log-level
        --quiet --max-body-size --max-header-size --max-header-count --max-receive-queue --shutdown-timeout
        --request-timeout --timeout --lifespan --lifespan-startup-timeout --write-high-watermark
        --write-low-watermark --interpreters --version --help --loop --server --default-middleware
        --no-default-middleware --sync-file-threshold --future-xs --log-format)
      )
    {
        like $out, qr/(?<![\w-])\Q$opt\E(?![\w-])/, "--help mentions $opt";
    }
    for my $short (qw(-o -p -a -I -M -e -q -v -l -s)) {
        like $out, qr/(?<![\w-])\Q$short\E\b/, "--help mentions $short";
    }
};

subtest 'unknown option and bad values exit 2' => sub {
    my ( $code, $err ) = run_pagi( '--frobnicate-xyz', $app );
    is $code, 2, 'unknown option exits 2';
    like $err, qr/--frobnicate-xyz/, 'and names the option';
    ( $code, $err ) = run_pagi( '--port', 'eighty', $app );
    is $code, 2, '--port eighty exits 2';
    like $err, qr/eighty/, '... naming the bad value';
    ( $code, $err ) = run_pagi( '--lifespan', 'sometimes', $app );
    is $code, 2, '--lifespan sometimes exits 2';
    ( $code, $err ) = run_pagi( '--log-level', 'loud', $app );
    is $code, 2, '--log-level loud exits 2';
};

# The reference runner's options that a command line carried over from
# pagi-server may hold: -s/--server (PAGI::Server, which pagi-rs replaces),
# --future-xs (Future::XS is not used, as in the reference), and
# --sync-file-threshold (no effect: files are never read on the loop).
subtest "the reference runner's -s, --future-xs and --sync-file-threshold" => sub {
    my $data = "$TMP/threshold.bin";
    open my $fh, '>', $data or die "$data: $!";
    print $fh join '', map { chr( $_ % 251 ) } 1 .. 200_000;
    close $fh;
    my $env_app = write_app( <<"PERL" . <<'PERL', 'env_app.pl' );
my \$data = '$data';
PERL
use strict; use warnings; use Future::AsyncAwait;
async sub {
    my ($scope, $receive, $send) = @_;
    return if $scope->{type} eq 'lifespan';
    if ($scope->{path} eq '/file') {
        await $send->({ type => 'http.response.start', status => 200, headers => [] });
        await $send->({ type => 'http.response.body', file => $data });
        return;
    }
    my $body = 'PERL_FUTURE_NO_XS=' . ($ENV{PERL_FUTURE_NO_XS} // 'unset');
    await $send->({ type => 'http.response.start', status => 200, headers => [] });
    await $send->({ type => 'http.response.body', body => $body });
};
PERL
    for my $flag ( [ '-s', 'PAGI::Server' ], ['--server=PAGI::Server'] ) {
        my $s = start_server( @$flag, $env_app );
        is http_request( $s->port, 'GET', '/' )->{status}, 200, "@$flag: serves";
        $s->stop('TERM');
    }
    # Getopt::Long, which pagi-server parses with, also reads a long option
    # after one dash.
    my $single = wait_startup( spawn_pagi( '-port', 0, '-host=127.0.0.1', '-no-access-log', '-lib', $TMP, $env_app ) );
    is http_request( $single->port, 'GET', '/' )->{status}, 200, '-port 0 -host=127.0.0.1 -no-access-log -lib DIR: serves';
    sleep 0.2;
    unlike $single->output, qr{"GET / }, 'and -no-access-log was read as --no-access-log';
    $single->stop('TERM');

    my ( $code, $err ) = run_pagi( '-frobnicate', $env_app );
    is $code, 2, 'a single-dash word that is no option: still a usage error';

    ( $code, $err ) = run_pagi( '-s', 'Twiggy::Server', $env_app );
    is $code, 2, '-s naming another class: exit 2';
    like $err, qr/--server Twiggy::Server: pagi-rs takes the place of PAGI::Server/, 'says why';

    my $s = start_server( '--future-xs', $env_app );
    is http_request( $s->port, 'GET', '/' )->{body}, 'PERL_FUTURE_NO_XS=1', 'Future::XS is kept out (PERL_FUTURE_NO_XS=1)';
    like $s->output, qr/WARN --future-xs is unavailable: Future::XS is not used/, '--future-xs: a warning, and it serves';
    $s->stop('TERM');
    {
        local $ENV{PERL_FUTURE_NO_XS} = '0';
        local $ENV{PAGI_FUTURE_XS}    = '1';
        $s = start_server($env_app);
        is http_request( $s->port, 'GET', '/' )->{body}, 'PERL_FUTURE_NO_XS=0', 'a PERL_FUTURE_NO_XS of its own is kept';
        like $s->output, qr/WARN PAGI_FUTURE_XS is ignored/, 'PAGI_FUTURE_XS: a warning';
        $s->stop('TERM');
    }
    $s = start_server($env_app);
    unlike $s->output, qr/WARN/, 'neither: no warning';
    $s->stop('TERM');

    my $file_bytes = slurp($data);
    for my $n ( 0, -1, 1 << 20 ) {
        $s = start_server( '--sync-file-threshold', $n, $env_app );
        my $r = http_request( $s->port, 'GET', '/file' );
        ok( ( $r->{body} // '' ) eq $file_bytes, "--sync-file-threshold $n: a file body is served whole" );
        like $s->output, qr/INFO --sync-file-threshold \Q$n\E has no effect/, 'and the log says it changes nothing';
        $s->stop('TERM');
    }
    ( $code, $err ) = run_pagi( '--sync-file-threshold', 'lots', $env_app );
    is $code, 2, '--sync-file-threshold lots: exit 2';
};

subtest '--host/--port and -o/-p' => sub {
    for my $form ( [ '--host', '--port' ], [ '-o', '-p' ] ) {
        my $port = free_port();
        my $s = spawn_pagi( $form->[0], '127.0.0.1', $form->[1], $port, $app );
        $s->{port} = $port;
        ok $s->wait_output( qr/listening on/, 10 ), "@$form: started";
        like $s->output, qr{listening on http://127\.0\.0\.1:\Q$port\E/}, "@$form: startup line names 127.0.0.1:$port";
        my $res = http_request( $port, 'GET', '/hello' );
        is $res->{status}, 200, "@$form: serves on the chosen port";
        $s->stop('TERM');
    }
};

subtest '-a/--app' => sub {
    for my $flag ( '-a', '--app' ) {
        my $port = free_port();
        my $s = start_on_port( $port, $flag, $app ) or next;
        my $res = http_request( $port, 'POST', '/x', body => 'abc' );
        is $res->{body}, 'got:3', "$flag FILE serves the file's app";
        $s->stop('TERM');
    }
};

subtest '--root-path' => sub {
    my $port = free_port();
    my $s = start_on_port( $port, '--root-path', '/mnt/app', $app ) or return fail('started');
    my $res = http_request( $port, 'GET', '/scope' );
    my $got = eval { decode_json( $res->{body} ) } // {};
    is $got->{root_path}, '/mnt/app', 'scope root_path is the --root-path value';
    is $got->{path}, '/scope', 'path is not altered by the root path';
    $s->stop('TERM');

    $port = free_port();
    $s = start_on_port( $port, $app ) or return fail('started');
    $got = eval { decode_json( http_request( $port, 'GET', '/scope' )->{body} ) } // {};
    ok exists $got->{root_path} && defined $got->{root_path} && $got->{root_path} eq '', 'default root_path is ""';
    $s->stop('TERM');
};

subtest '--log-level and -q' => sub {
    my $port = free_port();
    my $s = start_on_port( $port, '-q', $app ) or return fail('started with -q');
    is http_request( $port, 'GET', '/q' )->{status}, 200, '-q: serves';
    sleep 0.3;
    unlike $s->output, qr/listening on/, '-q: no startup line';
    unlike $s->output, qr/\bINFO\b/, '-q: no INFO lines at all';
    $s->stop('TERM');

    $port = free_port();
    $s = start_on_port( $port, '-q', '--log-level', 'info', $app ) or return fail('started with -q --log-level info');
    ok $s->wait_output( qr/listening on/, 5 ), '-q --log-level info: startup line present (explicit level wins)';
    $s->stop('TERM');

    $port = free_port();
    $s = start_on_port( $port, '--log-level', 'warn', $app ) or return fail('started with --log-level warn');
    sleep 0.3;
    unlike $s->output, qr/listening on/, '--log-level warn: no startup line';
    $s->stop('TERM');

    $port = free_port();
    $s = start_on_port( $port, '--log-level', 'debug', $app ) or return fail('started with --log-level debug');
    ok $s->wait_output( qr/listening on/, 5 ), '--log-level debug: startup line present';
    $s->stop('TERM');
};

subtest '--access-log FILE and --no-access-log' => sub {
    my $log = "$TMP/access.log";
    open my $pre, '>', $log or die;
    print $pre "pre-existing line\n";
    close $pre;
    my $port = free_port();
    my $s = start_on_port( $port, '--access-log', $log, $app ) or return fail('started');
    is http_request( $port, 'GET', '/to-the-file?k=v' )->{status}, 200, 'request ok';
    ok wait_file( $log, qr{"GET /to-the-file\?k=v" 200 }, 5 ), 'the access line is in the file';
    like slurp($log), qr/\Apre-existing line\n/, 'the file was appended to, not truncated';
    sleep 0.2;
    unlike $s->output, qr{/to-the-file}, 'and not on stderr';
    $s->stop('TERM');

    $port = free_port();
    $s = start_on_port( $port, $app ) or return fail('started');
    http_request( $port, 'GET', '/default-dest' );
    ok $s->wait_output( qr{"GET /default-dest" 200 }, 5 ), 'by default the access line goes to stderr';
    $s->stop('TERM');

    $port = free_port();
    $s = start_on_port( $port, '--no-access-log', $app ) or return fail('started');
    is http_request( $port, 'GET', '/not-logged' )->{status}, 200, 'request ok';
    is http_request( $port, 'GET', '/not-logged-2' )->{status}, 200, 'request ok';
    sleep 0.5;
    unlike $s->output, qr{/not-logged}, '--no-access-log: no access line';
    $s->stop('TERM');
};

my $DATE = qr{\d\d/(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)/\d{4}:\d\d:\d\d:\d\d \+0000};

# Run one server with --access-log-format $fmt, send @reqs (raw request
# strings), return the log lines.
my $FMT_LOGS = 0;
sub log_lines_for {
    my ( $fmt, @reqs ) = @_;
    my $log = "$TMP/fmt-" . ( ++$FMT_LOGS ) . ".log";
    my $port = free_port();
    my $s = start_on_port( $port, '--access-log', $log, '--access-log-format', $fmt, $app ) or return;
    for my $r (@reqs) {
        my $raw = raw_request( $port, $r, timeout => 5 );
        my $res = parse_response($raw);
        diag "request failed: $raw" unless $res && $res->{status};
    }
    my $t0 = time;
    my @lines;
    while ( time - $t0 < 5 ) {
        @lines = split /\n/, slurp($log);
        last if @lines >= @reqs;
        sleep 0.05;
    }
    $s->stop('TERM');
    return @lines;
}

subtest '--access-log-format presets' => sub {
    my $req = "GET /fmt/a%20b?x=1&y=2 HTTP/1.1\r\nHost: h\r\nUser-Agent: TestUA/1.0\r\nReferer: http://ref.example/\r\nConnection: close\r\n\r\n";
    my @l = log_lines_for( 'tiny', $req );
    like $l[0] // '', qr{\AGET /fmt/a%20b\?x=1&y=2 200 \d+ms\z}, 'tiny: %m %U%q %s %Dms';

    @l = log_lines_for( 'common', $req );
    like $l[0] // '', qr{\A127\.0\.0\.1 - - \[$DATE\] "GET /fmt/a%20b\?x=1&y=2 HTTP/1\.1" 200 5\z}, 'common layout (body "got:0" = 5 bytes)';

    @l = log_lines_for( 'combined', $req );
    like $l[0] // '',
      qr{\A127\.0\.0\.1 - - \[$DATE\] "GET /fmt/a%20b\?x=1&y=2 HTTP/1\.1" 200 5 "http://ref\.example/" "TestUA/1\.0"\z},
      'combined layout with referer and user agent';

    @l = log_lines_for( 'clf', $req );
    like $l[0] // '', qr{\A127\.0\.0\.1 - - \[$DATE\] "GET /fmt/a%20b\?x=1&y=2" 200 \d+\.\d{3}s\z}, 'clf layout';
};

subtest '--access-log-format custom atoms' => sub {
    my $fmt = '%h|%s|%m|%U|%q|%H|%b|%B|%D|%{User-Agent}i|%l|%u|%%';
    my $body = 'x' x 7;
    my @l = log_lines_for(
        $fmt,
        "PUT /slow/p%20q?a=1&b=2 HTTP/1.1\r\nHost: h\r\nuser-agent: Agent/7\r\nContent-Length: 7\r\nConnection: close\r\n\r\n$body",
        "GET /empty/s203 HTTP/1.0\r\n\r\n",
    );
    is scalar(@l), 2, 'two lines logged';
    my @f = split /\|/, $l[0] // '', -1;
    is $f[0], '127.0.0.1', '%h client ip';
    is $f[1], '200', '%s status';
    is $f[2], 'PUT', '%m method';
    is $f[3], '/slow/p%20q', '%U raw path without query';
    is $f[4], '?a=1&b=2', '%q ?query';
    is $f[5], 'HTTP/1.1', '%H protocol';
    is $f[6], '5', '%b body bytes ("got:7")';
    is $f[7], '5', '%B body bytes';
    ok defined $f[8] && $f[8] =~ /\A\d+\z/ && $f[8] >= 150_000 && $f[8] < 5_000_000,
      '%D is microseconds covering the 0.2 s the app slept' or diag "got %D = " . ( $f[8] // 'undef' );
    is $f[9],  'Agent/7', '%{User-Agent}i matched case-insensitively';
    is $f[10], '-',       '%l is -';
    is $f[11], '-',       '%u is -';
    is $f[12], '%',       '%% is a literal %';

    my @g = split /\|/, $l[1] // '', -1;
    is $g[1], '203',      'second line: %s is the app status 203';
    is $g[3], "/empty/s203", "%U";
    is $g[4], '',         "%q empty when there is no query";
    is $g[5], 'HTTP/1.0', '%H HTTP/1.0';
    is $g[6], '-',        '%b is - for an empty body';
    is $g[7], '0',        '%B is 0 for an empty body';
    is $g[9], '-',        'missing header logs -';
};

subtest 'bad --access-log-format exits 2' => sub {
    my ( $code, $err ) = run_pagi( '--access-log-format', '%h %Z', $app );
    is $code, 2, 'unknown atom: exit 2';
    like $err, qr/Unknown access log format atom '%Z'/, 'names the atom';
    ( $code, $err ) = run_pagi( '--access-log-format', '%{User-Agent', $app );
    is $code, 2, 'unterminated %{: exit 2';
    like $err, qr/Unterminated %\{\.\.\.\} in access log format/, 'says unterminated';
};

subtest '--max-header-count / --max-header-size' => sub {
    my $port = free_port();
    my $s = start_on_port( $port, '--max-header-count', 5, '--max-header-size', 1024, $app ) or return fail('started');
    my $few = http_request( $port, 'GET', '/few', headers => [ [ 'X-A', 1 ] ] );
    is $few->{status}, 200, '3 headers (limit 5): 200';
    my $many = http_request( $port, 'GET', '/many', headers => [ map { [ "X-H$_", $_ ] } 1 .. 8 ] );
    is $many->{status}, 431, '10 headers (limit 5): 431';
    my $big = http_request( $port, 'GET', '/big', headers => [ [ 'X-Big', 'b' x 1500 ] ] );
    is $big->{status}, 431, '1.5 KB header (limit 1024): 431';
    my $ok = http_request( $port, 'GET', '/ok', headers => [ [ 'X-Med', 'm' x 300 ] ] );
    is $ok->{status}, 200, '300-byte header (limit 1024): 200';
    $s->stop('TERM');

    $port = free_port();
    $s = start_on_port( $port, $app ) or return fail('started');
    is http_request( $port, 'GET', '/big', headers => [ [ 'X-Big', 'b' x 1500 ] ] )->{status}, 200,
      'the same 1.5 KB header is fine with the default limit';
    is http_request( $port, 'GET', '/many', headers => [ map { [ "X-H$_", $_ ] } 1 .. 8 ] )->{status}, 200,
      'and 10 headers are fine with the default count';
    $s->stop('TERM');
};

subtest '--max-body-size' => sub {
    my $port = free_port();
    my $s = start_on_port( $port, '--max-body-size', 100, $app ) or return fail('started');
    my $small = http_request( $port, 'POST', '/body', body => 'a' x 50 );
    is $small->{status}, 200, '50-byte body (limit 100): 200';
    is $small->{body}, 'got:50', 'and the app read it';
    my $large = http_request( $port, 'POST', '/body', body => 'a' x 200 );
    is $large->{status}, 413, '200-byte body (limit 100): 413';
    $s->stop('TERM');
};

subtest '--timeout closes an idle keep-alive connection' => sub {
    my $port = free_port();
    my $s = start_on_port( $port, '--timeout', 1, $app ) or return fail('started');
    my $sock = IO::Socket::INET->new( PeerAddr => '127.0.0.1', PeerPort => $port, Proto => 'tcp', Timeout => 5 )
      or return fail("connect: $!");
    $sock->syswrite("GET /ka HTTP/1.1\r\nHost: h\r\n\r\n");
    my $buf = '';
    my $sel = IO::Select->new($sock);
    my $deadline = time + 5;
    while ( time < $deadline && $buf !~ /got:0\z/ ) {
        $sel->can_read( $deadline - time ) or last;
        $sock->sysread( $buf, 65536, length $buf ) or last;
    }
    like $buf, qr{\AHTTP/1\.1 200 .*got:0\z}s, 'keep-alive response received';
    my $t_resp = time;

    # Still open after 0.3 s: nothing readable (no EOF).
    my @r = $sel->can_read(0.3);
    my $early = '';
    my $eof_early = @r ? !$sock->sysread( $early, 1024 ) : 0;
    ok !@r, 'connection still open (nothing to read, no EOF) 0.3 s after the response';

    my ( $closed_at, $n );
    while ( !$eof_early && time - $t_resp < 3 ) {
        my @rr = $sel->can_read( 3 - ( time - $t_resp ) ) or last;
        $n = $sock->sysread( my $chunk, 1024 );
        if ( !$n ) { $closed_at = time - $t_resp; last }
    }
    ok defined $closed_at, 'the server closed the idle connection within 3 s';
    ok defined $closed_at && $closed_at > 0.5, sprintf( 'closed after about 1 s (%.2f s)', $closed_at // -1 );
    $s->stop('TERM');
};

done_testing;
