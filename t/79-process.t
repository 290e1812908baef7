# Process management: -D/--daemonize (the command returns once the daemon
# serves, with its status), --pid (written by the master, removed on exit;
# a stale file is replaced, a live one refuses the start), --user/--group
# (applied after binding, before the app loads: a privileged port, an app
# running as nobody), and -E/--env (production: no access log unless one is
# named; development: PAGI-Tools' Lint around the app when installed).
use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;
use PagiRS::Workers;
use File::Temp qw(tempdir);
use IO::Socket::INET;
use Time::HiRes qw(time sleep);
use JSON::PP ();

my $dir = tempdir( CLEANUP => 1 );    # 0700, root's

# An app that reports who runs it and in which mode.
my $who_app = write_app(<<'APP');
use strict; use warnings; use Future::AsyncAwait;
async sub {
    my ($scope, $receive, $send) = @_;
    return if $scope->{type} eq 'lifespan';
    await $send->({ type => 'http.response.start', status => 200, headers => [] });
    await $send->({ type => 'http.response.body',
                    body => "pid=$$ uid=$< euid=$> gid=" . (split ' ', $()[0] . " env=" . ($ENV{PAGI_ENV} // '') });
};
APP

sub get { my ( $port, $path ) = @_; my $r = eval { http_request( $port, 'GET', $path // '/' ) }; $r }

subtest '-D with --pid: returns once serving; the daemon is detached' => sub {
    my $pidf = "$dir/d.pid";
    my $port = free_port();
    my $t0 = time;
    my ( $code, $err ) = run_pagi( '-D', '--pid', $pidf, '-p', $port, $who_app );
    is $code, 0, 'the command exits 0';
    like $err, qr/listening on http:\/\/127\.0\.0\.1:$port\//, 'once the daemon is serving (its log went to our stderr file)';
    ok -s $pidf, 'the pid file exists';
    chomp( my $pid = slurp($pidf) );
    ok process_alive($pid), "the daemon ($pid) runs";
    like get($port)->{body}, qr/^pid=$pid /, 'and serves';
    is proc_status_field( $pid, 'PPid' ), 1, 'its parent is init';
    my $session = sub { ( split ' ', slurp("/proc/$_[0]/stat") )[5] };
    isnt $session->($pid), $session->($$), 'in a session of its own';
    is readlink("/proc/$pid/fd/0"), '/dev/null', 'stdin is /dev/null';
    kill 'TERM', $pid;
    ok wait_gone( 10, $pid ), 'TERM stops it';
    ok !-e $pidf, 'and the pid file is removed';
};

subtest '-D with a broken app: the command fails with the error' => sub {
    my $pidf = "$dir/bad.pid";
    my $bad = write_app("die 'no good'\n");
    my ( $code, $err ) = run_pagi( '-D', '--pid', $pidf, '-p', 0, $bad );
    is $code, 1, 'exit status 1';
    like $err, qr/cannot load the application:.*no good/s, "the app's error";
    ok !-e $pidf, 'no pid file left';
};

subtest '-D with workers: the pid file names the master' => sub {
    my $pidf = "$dir/w.pid";
    my $port = free_port();
    my ( $code, $err ) = run_pagi( '-D', '-w', 2, '--pid', $pidf, '-p', $port, $who_app );
    is $code, 0, 'exit 0 once the workers are ready';
    chomp( my $master = slurp($pidf) // '' );
    my @w = wait_workers( $master, 2, 5 );
    is scalar @w, 2, 'the master has two workers';
    my ($pid) = get($port)->{body} =~ /^pid=(\d+)/;
    ok( ( grep { $_ == $pid } @w ), 'a worker answers' );
    kill 'TERM', $master;
    ok wait_gone( 10, $master, @w ), 'TERM stops them all';
    ok !-e $pidf, 'pid file removed';
};

subtest '--pid: a stale file is replaced, a live one refuses' => sub {
    my $pidf = "$dir/s.pid";
    my $dead = fork // die;
    POSIX::_exit(0) unless $dead;
    waitpid $dead, 0;
    open my $fh, '>', $pidf or die;
    print $fh "$dead\n";
    close $fh;
    my $s = start_server( '--pid', $pidf, $who_app );
    like $s->output, qr/pid file \Q$pidf\E was stale \(process $dead is gone\); replacing it/, 'the stale file is noted';
    is slurp($pidf), $s->pid . "\n", 'and replaced';

    my ( $code, $err ) = run_pagi( '--pid', $pidf, '-p', 0, $who_app );
    is $code, 1, 'a second server refuses to start: exit 1';
    like $err, qr/pid file \Q$pidf\E names process ${\ $s->pid }, which is running/, 'saying why';
    is slurp($pidf), $s->pid . "\n", 'the file is untouched';
    is $s->stop('TERM'), 0, 'the first stops';
    ok !-e $pidf, 'removing its pid file';
};

subtest '--user/--group: bound as root, the app runs as nobody' => sub {
    plan skip_all => 'needs root' if $> != 0;
    my $app = readable_by_anyone($who_app);
    # A privileged port: only root can bind it, so serving on it proves the
    # bind came before the drop.
    my $port = free_privileged_port();
    ok $port, "a free privileged port ($port)";
    my $log = "$dir/access.log";    # in a directory only root can enter
    my $s = start_on_port( $port, '-w', 2, '--user', 'nobody', '--group', 'nogroup', '--access-log', $log, $app );
    ok $s, 'started' or return;
    my @w = wait_workers( $s->pid, 2, 5 );
    is proc_status_field( $_, 'Uid' ), "65534\t65534\t65534\t65534", "worker $_ runs as nobody" for @w;
    is proc_status_field( $s->pid, 'Uid' ), "65534\t65534\t65534\t65534", 'so does the master';
    is proc_status_field( $s->pid, 'Groups' ), '65534', 'with nogroup as its only group';
    like get($port)->{body}, qr/ uid=65534 euid=65534 gid=65534 /, 'the app sees uid and gid 65534';
    ok wait_file_lines( $log, 1, 5 ), 'the access log, opened as root, is written';
    is $s->stop('TERM'), 0, 'stops cleanly';
};

subtest '--user errors' => sub {
    my ( $code, $err ) = run_pagi( '-p', 0, '--user', 'no-such-user-pagi', $who_app );
    is $code, 1, 'an unknown user: exit 1';
    like $err, qr/unknown user: no-such-user-pagi/, 'named';
    ( $code, $err ) = run_pagi( '-p', 0, '--group', 'no-such-group-pagi', $who_app );
    is $code, 1, 'an unknown group: exit 1';
    like $err, qr/unknown group: no-such-group-pagi/, 'named';
};

# The server's log lines in $text decoded, one object each; a line that
# is not a JSON object fails the test.
sub json_log {
    my ( $text, $what ) = @_;
    my @lines = grep { length } split /\n/, $text;
    my @bad   = grep { !eval { ref JSON::PP->new->decode($_) eq 'HASH' } } @lines;
    ok @lines && !@bad, "$what: every line is a JSON object" or diag "not JSON: @bad";
    return map { eval { JSON::PP->new->decode($_) } // () } @lines;
}

subtest '-E production: JSON log lines, no access log unless named; PAGI_ENV for the app' => sub {
    my $s = start_server( '-E', 'production', $who_app );
    like get( $s->port, '/prod' )->{body}, qr/ env=production$/, 'the app sees PAGI_ENV=production';
    my @log = json_log( $s->output, 'production' );
    ok( ( grep { ( $_->{message} // '' ) eq 'mode: production (--env)' } @log ),
        'the mode and its source are logged' );
    ok( ( grep { ( $_->{message} // '' ) =~ /listening on / && $_->{level} eq 'info' } @log ),
        'the startup line is a JSON object too' );
    sleep 0.3;
    unlike $s->output, qr{/prod}, 'no access log line';
    is $s->stop('TERM'), 0, 'stops';

    my $log = "$dir/prod.log";
    $s = start_server( '-E', 'production', '--access-log', $log, $who_app );
    get( $s->port, '/named' );
    my $rec = wait_json_record( $log, sub { ( $_[0]{path} // '' ) eq '/named' } );
    ok $rec, 'a named access log is written, in the json preset';
    is $rec && $rec->{status}, 200, 'with the status';
    $s->stop('TERM');

    $s = start_server( '-E', 'production', '--log-format', 'text', '--access-log', "$dir/prod-text.log", $who_app );
    get( $s->port, '/text' );
    like $s->output, qr/^\S+\s+INFO mode: production \(--env\)$/m, '--log-format text: text lines in production';
    ok wait_file_line( "$dir/prod-text.log", qr{"GET /text" 200 }, 5 ), 'and the clf access log';
    $s->stop('TERM');

    $s = start_server( '-E', 'production', '--access-log-format', 'tiny', '--access-log', "$dir/prod-tiny.log",
        $who_app );
    get( $s->port, '/tiny' );
    ok wait_file_line( "$dir/prod-tiny.log", qr{^GET /tiny 200 }, 5 ), 'a format named outright wins';
    $s->stop('TERM');
};

subtest 'the mode from PAGI_ENV, or from the terminal; only production logs JSON' => sub {
    local $ENV{PAGI_ENV} = 'production';
    my $s = start_server($who_app);
    like get( $s->port )->{body}, qr/ env=production$/, 'PAGI_ENV=production';
    ok( ( grep { ( $_->{message} // '' ) eq 'mode: production (PAGI_ENV)' } json_log( $s->output, 'PAGI_ENV' ) ),
        'source PAGI_ENV, in JSON' );
    $s->stop('TERM');
    delete $ENV{PAGI_ENV};
    $s = start_server($who_app);    # stdin is /dev/null: no terminal
    like get( $s->port, '/notty' )->{body}, qr/ env=production$/, 'no terminal: production';
    ok( ( grep { ( $_->{message} // '' ) eq 'mode: production (no tty)' } json_log( $s->output, 'no tty' ) ),
        'source: no tty, in JSON' );
    sleep 0.3;
    unlike $s->output, qr{/notty}, 'and so no access log';
    $s->stop('TERM');
    {
        local $ENV{PAGI_ENV} = 'staging';
        $s = start_server($who_app);
        like get( $s->port, '/staging' )->{body}, qr/ env=none$/, 'PAGI_ENV naming no mode: none';
        like $s->output, qr/^\S+\s+WARN PAGI_ENV=staging is not a mode \(development, production, none\); using none$/m,
          'said once, as a line of the log';
        $s->stop('TERM');
    }
    for my $mode (qw(development none)) {
        $s = start_server( '-E', $mode, $who_app );
        get( $s->port, "/$mode" );
        ok $s->wait_output( qr{"GET /$mode" 200 }, 5 ), "-E $mode: the clf access log on stderr";
        like $s->output, qr/^\S+\s+INFO mode: $mode \(--env\)$/m, "-E $mode: text lines";
        $s->stop('TERM');
    }
};

subtest '-E development: Lint around the app when installed' => sub {
    my $lib = tempdir( CLEANUP => 1 );
    mkdir "$lib/PAGI";
    mkdir "$lib/PAGI/Middleware";
    open my $fh, '>', "$lib/PAGI/Middleware/Lint.pm" or die;
    print $fh <<'LINT';
package PAGI::Middleware::Lint;
use strict; use warnings; use Future::AsyncAwait;
sub new { my ( $class, %o ) = @_; bless {%o}, $class }
sub wrap {
    my ( $self, $app ) = @_;
    my $strict = $self->{strict};
    return async sub {
        my ( $scope, $receive, $send ) = @_;
        await $app->( $scope, $receive, async sub {
            my ($ev) = @_;
            push @{ $ev->{headers} }, [ 'x-lint', "strict=$strict" ] if $ev->{type} eq 'http.response.start';
            await $send->($ev);
        } );
    };
}
1;
LINT
    close $fh;
    my $s = start_server( '-E', 'development', '-I', $lib, $who_app );
    my $r = get( $s->port );
    is $r->{headers}{'x-lint'}[0], 'strict=1', 'the app is wrapped in Lint (strict)';
    like $r->{body}, qr/ env=development$/, 'PAGI_ENV=development';
    like $s->output, qr/development mode: PAGI::Middleware::Lint enabled/, 'logged';
    $s->stop('TERM');

    $s = start_server( '-E', 'development', '--no-default-middleware', '-I', $lib, $who_app );
    ok !exists get( $s->port )->{headers}{'x-lint'}, '--no-default-middleware: not wrapped';
    $s->stop('TERM');

    $s = start_server( '-E', 'development', '--no-default-middleware', '--default-middleware', '-I', $lib, $who_app );
    is get( $s->port )->{headers}{'x-lint'}[0], 'strict=1', '--default-middleware after it: wrapped (the last wins)';
    $s->stop('TERM');

    $s = start_server( '-E', 'development', $who_app );
    is get( $s->port )->{status}, 200, 'without PAGI-Tools the app runs as is';
    like $s->output, qr/Lint unavailable \(install PAGI-Tools\)/, 'and the log says what is missing';
    $s->stop('TERM');

    $s = start_server( '-E', 'none', '-I', $lib, $who_app );
    ok !exists get( $s->port )->{headers}{'x-lint'}, '-E none: no middleware';
    like get( $s->port, '/none' )->{body}, qr/ env=none$/, 'PAGI_ENV=none';
    ok $s->wait_output( qr{"GET /none"}, 5 ), 'and the access log is on';
    $s->stop('TERM');
};

subtest 'a bad -E' => sub {
    my ( $code, $err ) = run_pagi( '-E', 'staging', $who_app );
    is $code, 2, 'exit 2';
    like $err, qr/invalid value 'staging'/, 'names the value';
};

done_testing;
