use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;
use File::Spec;
use Time::Local qw(timegm);
use Time::HiRes qw(time sleep);

# Diagnostics on stderr: the startup line, the default (clf) access log, app
# warnings and app errors, and what -q keeps.

$ENV{PAGI_RS_BIN} = File::Spec->rel2abs( $ENV{PAGI_RS_BIN} ) if defined $ENV{PAGI_RS_BIN};

my $app = write_app( <<'PERL', 'logging_app.pl' );
use strict; use warnings; use Future::AsyncAwait; use Future::IO;
my $app = async sub {
    my ($scope, $receive, $send) = @_;
    return if $scope->{type} eq 'lifespan';
    my $path = $scope->{path};
    if ($path eq '/warn') {
        warn "app-warning-marker-7731\n";
    }
    elsif ($path eq '/die') {
        die "app-die-marker-4242\n";
    }
    elsif ($path eq '/noresponse') {
        return;
    }
    elsif ($path eq '/slow') {
        await Future::IO->sleep(0.5);
    }
    await $send->({type => 'http.response.start', status => 200, headers => [['content-type', 'text/plain']]});
    await $send->({type => 'http.response.body', body => "ok $path", more => 0});
};
$app;
PERL

my $TS = qr/\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z/;
my %MON = ( Jan => 0, Feb => 1, Mar => 2, Apr => 3, May => 4, Jun => 5, Jul => 6, Aug => 7, Sep => 8, Oct => 9, Nov => 10, Dec => 11 );

my $s = start_server($app);
my $port = $s->port;

subtest 'startup line' => sub {
    my ($line) = grep { /listening on/ } split /\n/, $s->output;
    ok defined $line, 'a startup line was printed';
    $line //= '';
    my $pid = $s->pid;
    like $line,
      qr{\A$TS\s+INFO pagi-rs \d+\.\d+\.\d+ listening on http://127\.0\.0\.1:(\d+)/ \(pid \Q$pid\E, interpreters: 1, loop: IO::Async::Loop::Poll\)\z},
      'layout: "<timestamp>  INFO pagi-rs X listening on http://127.0.0.1:PORT/ (pid N, interpreters: 1, loop: IO::Async::Loop::Poll)"';
    my ($named) = $line =~ m{:(\d+)/};
    ok $named && port_listening($named), "the named port ($named) really accepts connections";
    is http_request( $named, 'GET', '/' )->{status}, 200, 'and serves';
};

subtest 'access log (clf) for a request with a query string' => sub {
    my $before = time;
    my $res = http_request( $port, 'GET', '/some/pa%20th?x=1&y=two' );
    is $res->{status}, 200, 'request ok';
    ok $s->wait_output( qr{"GET /some/pa%20th\?x=1&y=two"}, 5 ), 'access line appeared';
    my ($line) = grep { m{/some/pa%20th} } split /\n/, $s->output;
    $line //= '';
    like $line,
      qr{\A127\.0\.0\.1 - - \[\d\d/(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)/\d{4}:\d\d:\d\d:\d\d \+0000\] "GET /some/pa%20th\?x=1&y=two" 200 \d+\.\d{3}s\z},
      'exact clf layout: IP - - [DD/Mon/YYYY:HH:MM:SS +0000] "METHOD RAWPATH?QUERY" STATUS SECONDS.mmms';
    if ( $line =~ m{\[(\d\d)/(\w{3})/(\d{4}):(\d\d):(\d\d):(\d\d) \+0000\]} ) {
        my $t = timegm( $6, $5, $4, $1, $MON{$2}, $3 );
        ok abs( $t - $before ) < 120, 'the timestamp is the current UTC time' or diag "log time $t vs now $before";
    }
    else {
        fail 'timestamp parsed';
    }
};

subtest 'access log duration and timing' => sub {
    my $res = http_request( $port, 'GET', '/slow?d=1' );
    is $res->{status}, 200, 'slow request ok';
    ok $s->wait_output( qr{"GET /slow\?d=1" 200 }, 5 ), 'access line for the slow request';
    my ($dur) = $s->output =~ m{"GET /slow\?d=1" 200 (\d+\.\d{3})s};
    ok defined $dur && $dur >= 0.45 && $dur < 5, 'duration covers the 0.5 s the app slept' or diag "duration: " . ( $dur // 'none' );
};

subtest 'app warn() reaches stderr' => sub {
    is http_request( $port, 'GET', '/warn' )->{status}, 200, 'request ok';
    ok $s->wait_output( qr/app-warning-marker-7731/, 5 ), 'the warning text is on stderr';
};

subtest 'app errors are logged' => sub {
    my $res = http_request( $port, 'GET', '/die' );
    is $res->{status}, 500, 'dying app: 500';
    ok $s->wait_output( qr/PAGI application error: app-die-marker-4242/, 5 ), 'stderr: "PAGI application error: <message>"';
    my ($line) = grep { /app-die-marker-4242/ } split /\n/, $s->output;
    like $line // '', qr/\A$TS\s+ERROR /, 'logged at ERROR level';
    $res = http_request( $port, 'GET', '/noresponse' );
    is $res->{status}, 500, 'app returning without a response: 500';
    ok $s->wait_output( qr/PAGI application returned without starting a response/, 5 ), 'and that is logged';
};

is $s->stop('TERM'), 0, 'server exits 0';

subtest '-q suppresses info but still logs errors' => sub {
    my $qport = free_port();
    my $q = start_on_port( $qport, '-q', $app ) or return fail('started with -q');
    is http_request( $qport, 'GET', '/die' )->{status}, 500, 'dying app under -q: 500';
    ok $q->wait_output( qr/PAGI application error: app-die-marker-4242/, 5 ), 'the application error is still logged';
    is http_request( $qport, 'GET', '/ok' )->{status}, 200, 'normal request ok';
    sleep 0.3;
    my $out = $q->output;
    unlike $out, qr/listening on/, 'no startup line';
    unlike $out, qr/Lifespan not supported/, 'no info-level lifespan notice';
    unlike $out, qr/\bINFO\b/, 'no INFO lines at all';
    $q->stop('TERM');
    unlike $q->output, qr/Shutdown complete|Received TERM/, 'no info-level shutdown lines either';
};

done_testing;
